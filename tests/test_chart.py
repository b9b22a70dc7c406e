"""The Helm chart without a cluster: CRD copies, values schema, rendered manifests.

Rendering needs the `helm` binary e2e/build.sh builds (or one on PATH); those
tests skip without it. The cluster-side checks are in tests/e2e/test_helm.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clara_adapter.settings import AdapterSettings, env_name

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "clara-dicom"
sys.path.insert(0, str(REPO / "e2e"))

# Settings the chart sets itself (flags, Secret, PVC path): not in values.
CHART_MANAGED = {"storageDir", "dicomPort", "httpPort", "host", "resultsUrl", "resultsToken", "resultsTokenFile",
                 "stowToken", "namespace", "configMap", "statusConfigMap",
                 "journal"}


def _helm() -> str | None:
    try:
        import k8s_cluster as kc

        candidate = kc.default_bin_dir() / "helm"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    except Exception:  # noqa: BLE001
        pass
    return shutil.which("helm")


HELM = _helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not built (bash e2e/build.sh)")


def render(*args: str) -> list[dict]:
    res = subprocess.run([HELM, "template", "rel", str(CHART), "-n", "imaging", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_crds_are_the_repository_crds():
    ours = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    theirs = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert ours == theirs
    for name in theirs:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/clara-dicom/crds/{name} is stale: cp crds/*.yaml charts/clara-dicom/crds/")


def _objects(schema: dict, path: str = ""):
    if schema.get("type") == "object" and "properties" in schema:
        yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _objects(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _objects(schema["items"], f"{path}[]")


def test_values_schema_is_closed_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, obj in _objects(schema):
        assert obj.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"


def test_values_schema_matches_adapter_settings():
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["properties"]["adapter"]["properties"]["settings"]["properties"]
    fields = AdapterSettings.model_json_schema()["properties"]
    expected = {name: {k: v for k, v in prop.items() if k not in ("title", "default")}
                for name, prop in fields.items() if name not in CHART_MANAGED}
    assert settings == expected, "values.schema.json adapter.settings differs from clara_adapter.settings"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name, value in values["adapter"]["settings"].items():
        assert AdapterSettings.model_fields[name].default == value, f"values.yaml default of {name}"


@needs_helm
def test_every_setting_becomes_its_environment_variable():
    values = {"watermarkPercent": 80, "reserveSpaceGB": 2, "scuAeTitle": "MYSCU", "maxPduSize": 0,
              "rejectUnknownSources": False, "exportConcurrency": 4, "tlsCaFile": "/tls/ca.pem"}
    args = [a for k, v in values.items() for a in ("--set-json", f"adapter.settings.{k}={json.dumps(v)}")]
    adapter = next(d for d in by_kind(render(*args), "Deployment") if d["metadata"]["name"].endswith("-adapter"))
    env = {e["name"]: e.get("value") for e in adapter["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, value in values.items():
        expected = str(value).lower() if isinstance(value, bool) else str(value)
        assert env[env_name(name)] == expected, name


@needs_helm
@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer", "ClusterIP"])
def test_rendered_defaults(service_type):
    docs = render("--set", f"adapter.dicom.service.type={service_type}")
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel", doc["metadata"]["name"]
    deployments = {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in by_kind(docs, "Deployment")}
    assert set(deployments) == {"operator", "adapter", "results"}
    for name, dep in deployments.items():
        spec = dep["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", name
        pod = spec["template"]["spec"]
        # a Service named like a setting (e.g. "clara-results") must not inject CLARA_RESULTS_PORT=tcp://…
        assert pod["enableServiceLinks"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert "livenessProbe" in c
            for env in c.get("env", []):  # tokens only by reference
                if "TOKEN" in env["name"] or "DATABASE" in env["name"]:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    adapter = deployments["adapter"]["spec"]["template"]["spec"]
    container = adapter["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "storage")["mountPath"]
    assert f"--storage={mount}" in container["args"]
    assert deployments["results"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    dicom = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "rel-clara-dicom-adapter")
    assert dicom["spec"]["type"] == service_type and dicom["spec"]["ports"][0]["port"] == 104
    assert dicom["spec"]["ports"][0]["targetPort"] == "dicom"
    assert dicom["spec"].get("externalTrafficPolicy") == (None if service_type == "ClusterIP" else "Local")
    pvc = next(p for p in by_kind(docs, "PersistentVolumeClaim") if p["metadata"]["name"].endswith("-payloads"))
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert sorted(p["metadata"]["name"] for p in by_kind(docs, "PriorityClass")) == [
        "clara-dicom-higher", "clara-dicom-immediate", "clara-dicom-lower", "clara-dicom-normal"]
    assert len(by_kind(docs, "NetworkPolicy")) == 3
    secret = by_kind(docs, "Secret")[0]
    assert len(secret["data"]["token"]) > 40  # random, base64


@needs_helm
def test_rbac_namespaced_by_default_cluster_wide_by_value():
    docs = render()
    assert {d["kind"] for d in docs if d["kind"].endswith(("Role", "RoleBinding"))} == {
        "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    cluster_roles = by_kind(docs, "ClusterRole")
    assert len(cluster_roles) == 1 and cluster_roles[0]["metadata"]["name"].endswith("-scanning")
    for rule in cluster_roles[0]["rules"]:
        assert set(rule["verbs"]) == {"list", "watch"}  # read-only
    operator = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-operator"))
    assert "--namespace=imaging" in operator["spec"]["template"]["spec"]["containers"][0]["args"]

    wide = render("--set", "rbac.clusterWide=true", "--set", "rbac.kopfScanning=false")
    names = {(d["kind"], d["metadata"]["name"]) for d in wide if "Role" in d["kind"]}
    assert ("ClusterRole", "rel-clara-dicom-operator") in names
    assert ("Role", "rel-clara-dicom-adapter") in names  # the adapter stays namespaced
    operator = next(d for d in by_kind(wide, "Deployment") if d["metadata"]["name"].endswith("-operator"))
    assert "--all-namespaces" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


@needs_helm
def test_existing_secrets_and_claims_are_used():
    docs = render("--set", "resultsService.token.existingSecret=my-token",
                  "--set", "resultsService.database.existingSecret=pg",
                  "--set", "adapter.persistence.existingClaim=shared-payloads")
    assert not by_kind(docs, "Secret")
    assert [p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")] == []
    adapter = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-adapter"))
    volumes = adapter["spec"]["template"]["spec"]["volumes"]
    assert {"name": "storage", "persistentVolumeClaim": {"claimName": "shared-payloads"}} in volumes
    results = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-results"))
    env = {e["name"]: e for e in results["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CLARA_RESULTS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-token"
    assert env["CLARA_RESULTS_DATABASE"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "dsn"}


@needs_helm
@pytest.mark.parametrize("bad", ["adapter.setings.x=1", "adapter.settings.watermarkPercnt=1",
                                 "operator.replicas=2", "adapter.dicom.service.type=Ingress",
                                 "securityContext.readOnlyRootFilesytem=false"])
def test_typos_are_refused(bad):
    res = subprocess.run([HELM, "template", "rel", str(CHART), "--set", bad], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "values don't meet the specifications" in res.stderr, bad


@needs_helm
def test_lint_strict():
    res = subprocess.run([HELM, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --- replicas (issue 16) -----------------------------------------------------------

REPLICATED = ("--set", "adapter.replicas=2", "--set", "adapter.journal.existingSecret=journal-dsn",
              "--set", "resultsService.replicas=3", "--set", "resultsService.database.existingSecret=results-dsn")


def deployment(docs: list[dict], component: str) -> dict:
    return next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith(f"-{component}"))


def refusal(*args: str) -> str:
    res = subprocess.run([HELM, "template", "rel", str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0, res.stdout[:500]
    return res.stderr


@needs_helm
@pytest.mark.parametrize("args, line", [
    (("--set", "adapter.replicas=2"), "- at '/adapter/journal/existingSecret': minLength: got 0, want 1"),
    (("--set", "resultsService.replicas=2"),
     "- at '/resultsService/database/existingSecret': minLength: got 0, want 1"),
    (("--set", "adapter.replicas=2", "--set", "adapter.journal.existingSecret=pg",
      "--set", "adapter.persistence.accessModes={ReadWriteOnce}"),
     "- at '/adapter/persistence/accessModes': no items match contains schema"),
])
def test_replicas_without_postgres_are_refused_by_the_schema(args, line):
    stderr = refusal(*args)
    assert "values don't meet the specifications" in stderr
    assert line in stderr.splitlines(), stderr


@needs_helm
@pytest.mark.parametrize("component, args, key", [
    ("adapter", ("--set", "adapter.replicas=2"), "adapter.journal.existingSecret"),
    ("results", ("--set", "resultsService.replicas=2"), "resultsService.database.existingSecret"),
])
def test_replicas_without_postgres_fail_in_one_line_without_the_schema(component, args, key):
    stderr = refusal(*args, "--skip-schema-validation")
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert f"replicas > 1 needs {key}: a Secret holding a PostgreSQL DSN" in line, stderr


@needs_helm
def test_replicated_components_roll_spread_and_keep_a_disruption_budget():
    docs = render(*REPLICATED)
    for component, replicas, env_var, secret in (("adapter", 2, "CLARA_JOURNAL", "journal-dsn"),
                                                 ("results", 3, "CLARA_RESULTS_DATABASE", "results-dsn")):
        spec = deployment(docs, component)["spec"]
        assert spec["replicas"] == replicas
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        selector = spec["selector"]["matchLabels"]
        (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchLabels": selector}}
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert env[env_var] == {"name": env_var, "valueFrom": {"secretKeyRef": {"name": secret, "key": "dsn"}}}
        (pdb,) = [p for p in by_kind(docs, "PodDisruptionBudget") if p["metadata"]["name"].endswith(component)]
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    results = deployment(docs, "results")["spec"]["template"]["spec"]
    assert "--database=/var/lib/clara-results/results.db" not in results["containers"][0]["args"]
    assert not [p for p in by_kind(docs, "PersistentVolumeClaim") if p["metadata"]["name"].endswith("-db")]


@needs_helm
def test_single_replica_recreates_and_has_no_disruption_budget():
    docs = render("--set", "adapter.journal.existingSecret=journal-dsn")  # PostgreSQL, one replica
    assert not by_kind(docs, "PodDisruptionBudget")
    for component in ("adapter", "results"):
        spec = deployment(docs, component)["spec"]
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    env = {e["name"] for e in deployment(docs, "adapter")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "CLARA_JOURNAL" in env
    env = {e["name"] for e in deployment(render(), "adapter")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "CLARA_JOURNAL" not in env  # SQLite under the storage root


@needs_helm
def test_anti_affinity_required_none_or_the_users_own():
    required = deployment(render("--set", "adapter.podAntiAffinity=required"), "adapter")["spec"]
    (term,) = required["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == required["selector"]["matchLabels"]
    assert "affinity" not in deployment(render("--set", "resultsService.podAntiAffinity=none"),
                                        "results")["spec"]["template"]["spec"]
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    spec = deployment(render("--set-json", f"adapter.affinity={json.dumps(own)}"), "adapter")["spec"]
    assert spec["template"]["spec"]["affinity"] == own
    assert "/adapter/podAntiAffinity': value must be one of" in refusal("--set", "adapter.podAntiAffinity=maybe")


# --- destination Secrets (issue 18) ---------------------------------------------------


@needs_helm
def test_destination_secrets_are_mounted_where_the_export_agent_reads_them():
    from clara_adapter.export.secrets import default_secrets_dir

    docs = render("--set", "adapter.destinationSecrets={pacs-certs,pacs-token}",
                  "--set", "adapter.persistence.mountPath=/data")
    pod = deployment(docs, "adapter")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in ("pacs-certs", "pacs-token"):
        (mount,) = [m for m in mounts.values() if m["mountPath"].endswith(f"/{name}")]
        assert mount["mountPath"] == str(default_secrets_dir("/data") / name) and mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"] == {"secretName": name, "defaultMode": 0o440}
    assert pod["securityContext"]["fsGroup"] == 10001  # the group that may read 0440 files
    assert not [m for m in render() if m["kind"] == "Deployment" and any(
        "secret" in v for v in m["spec"]["template"]["spec"].get("volumes", []))]
    assert "/adapter/destinationSecrets/0" in refusal("--set", "adapter.destinationSecrets={../escape}")


def test_missing_destination_secret_names_the_values_key(tmp_path):
    """The text that becomes the destination's CannotServe condition in a cluster."""
    from clara_adapter.export.secrets import SecretError, SecretsDir

    with pytest.raises(SecretError) as err:
        SecretsDir(tmp_path / "secrets").path("pacs-certs", "ca.crt")
    assert "add pacs-certs to the values list adapter.destinationSecrets" in str(err.value)
