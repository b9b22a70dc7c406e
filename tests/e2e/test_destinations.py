"""ClaraDestinations against a real kube-apiserver and the operator process: the CEL rule
for C-STORE vs DICOMweb destinations, Secret references rendered without Secret data, and
the CannotServe condition from what the adapter's export agent publishes (key
``destinationProblems`` of ``clara-dicom-adapter-status``, written by the adapter's own
KubeBridge)."""
from __future__ import annotations

import pytest

from test_operator import (  # noqa: F401 - fixtures used by name
    CONFIG_MAP,
    STATUS_CONFIG_MAP,
    adapter,
    apply,
    is_ready,
    ns,
    operator,
    rest,
    wait_for,
)

pytestmark = pytest.mark.e2e


def dst_yaml(name: str, spec: str) -> str:
    return f"apiVersion: dicom.clara.io/v1alpha1\nkind: ClaraDestination\nmetadata: {{name: {name}}}\nspec:\n{spec}"


def test_dicomweb_destinations_and_the_cannot_serve_condition(k8s_cluster, rest, ns, operator, adapter,
                                                               tmp_path):
    rejected = {
        "both": dst_yaml("both", "  dicomweb: {url: 'http://pacs/dicom-web'}\n  aeTitle: PACS\n  host: pacs\n"
                                 "  port: 104\n"),
        "neither": dst_yaml("neither", "  aeTitle: PACS\n"),
        "tls on dicomweb": dst_yaml("tlsweb", "  dicomweb: {url: 'http://pacs/dicom-web'}\n"
                                              "  tls: {secretRef: {name: certs}}\n"),
    }
    for what, manifest in rejected.items():
        res = apply(k8s_cluster, ns, manifest, check=False)
        assert res.returncode != 0, what
        assert "set either aeTitle, host and port" in res.stderr, (what, res.stderr)

    apply(k8s_cluster, ns, dst_yaml("pacs-web", "  dicomweb:\n    url: https://pacs.example.org/dicom-web\n"
                                                "    tokenSecretRef: {name: pacs-token}\n"))
    apply(k8s_cluster, ns, dst_yaml("pacs-tls", "  aeTitle: PACS\n  host: pacs.example.org\n  port: 2762\n"
                                                "  tls: {secretRef: {name: pacs-certs}}\n"))
    for name in ("pacs-web", "pacs-tls"):
        wait_for(lambda: is_ready(rest, ns, "dst", name), 15, f"{name} Ready")
    rendered = rest.config(ns)["destinations"]
    assert rendered["pacs-web"]["dicomweb"]["tokenSecretRef"] == {"name": "pacs-token", "key": "token"}

    # The adapter's own publisher (what its export agent calls when the problems change).
    from clara_adapter.k8s import KubeBridge

    bridge = KubeBridge(ns, CONFIG_MAP, STATUS_CONFIG_MAP, tmp_path / "applied-config.json",
                        str(k8s_cluster.kubeconfig))
    bridge.start(lambda config: None)
    try:
        bridge.publish_destination_problems(
            {"pacs-tls": "Secret pacs-certs not found (expected the folder /var/lib/clara-dicom/secrets/pacs-certs)"})
        cond = wait_for(lambda: is_ready(rest, ns, "dst", "pacs-tls", "CannotServe", "False"), 15, "CannotServe")
        assert "Secret pacs-certs not found" in cond["message"]
        assert is_ready(rest, ns, "dst", "pacs-web")  # the other destination is unaffected
        status_cm = rest.get(f"/api/v1/namespaces/{ns}/configmaps/{STATUS_CONFIG_MAP}")
        assert status_cm["data"]["appliedVersion"]  # the stand-in's key is kept (merge patch)
        bridge.publish_destination_problems({})
        wait_for(lambda: is_ready(rest, ns, "dst", "pacs-tls"), 15, "Ready again")
    finally:
        bridge.stop()
