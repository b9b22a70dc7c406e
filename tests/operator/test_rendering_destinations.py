"""ClaraDestinations in the reconcile decision: DICOMweb and TLS destinations render as
references only (no Secret data), and a destination the export agent reports it cannot
serve stays configured but is not Ready (reason CannotServe)."""
from __future__ import annotations

import json

from clara_operator.rendering import plan

NS = "imaging"


def dest(name, spec):
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "ClaraDestination",
            "metadata": {"name": name, "namespace": NS, "generation": 1, "uid": f"uid-{name}",
                         "creationTimestamp": "2024-01-01T00:00:00Z", "annotations": {}},
            "spec": spec}


def ready(p, name):
    o = p.by_key()[("ClaraDestination", name)]
    return next(c for c in o.status["conditions"] if c["type"] == "Ready")


WEB = dest("pacs-web", {"dicomweb": {"url": "https://pacs.example.org/dicom-web",
                                     "tokenSecretRef": {"name": "pacs-token"}}})
TLS = dest("pacs-tls", {"aeTitle": "PACS", "host": "pacs.example.org", "port": 2762,
                        "tls": {"secretRef": {"name": "pacs-certs"}}})


def test_dicomweb_and_tls_destinations_render_secret_references_only():
    p = plan([WEB, TLS], NS, feedback=False)
    rendered = json.loads(p.config_json)["destinations"]
    assert rendered["pacs-web"]["dicomweb"] == {"url": "https://pacs.example.org/dicom-web",
                                                "tokenSecretRef": {"name": "pacs-token", "key": "token"}}
    assert rendered["pacs-tls"]["tls"]["secretRef"] == {"name": "pacs-certs"}
    assert ready(p, "pacs-web")["status"] == "True" and ready(p, "pacs-tls")["status"] == "True"


def test_destination_the_agent_cannot_serve_is_not_ready_and_says_why():
    problems = {"PACS-TLS": "Secret pacs-certs has no key ca.crt (keys: tls.crt)"}
    p = plan([WEB, TLS], NS, feedback=False, destination_problems=problems)
    r = ready(p, "pacs-tls")
    assert (r["status"], r["reason"]) == ("False", "CannotServe")
    assert "Secret pacs-certs has no key ca.crt" in r["message"]
    assert "pacs-tls" in p.config.destinations  # still configured: it works once the Secret is fixed
    assert ready(p, "pacs-web")["status"] == "True"
    assert plan([WEB, TLS], NS, feedback=False, destination_problems={}).config_json == p.config_json


def test_dicomweb_with_dimse_fields_is_invalid_with_a_clear_message():
    both = dest("both", {"dicomweb": {"url": "http://pacs/dicom-web"}, "aeTitle": "PACS", "host": "pacs",
                         "port": 104})
    r = ready(plan([both], NS, feedback=False), "both")
    assert (r["status"], r["reason"]) == ("False", "InvalidSpec")
    assert "set either aeTitle, host and port" in r["message"] and "dicomweb is set" in r["message"]


def test_problems_come_from_the_adapter_status_config_map():
    from clara_operator.rendering import destination_problems

    data = {"appliedVersion": "v1", "destinationProblems": json.dumps({"pacs-tls": "Secret pacs-certs not found"})}
    assert destination_problems(data) == {"pacs-tls": "Secret pacs-certs not found"}
    assert destination_problems({"appliedVersion": "v1"}) == {}
    assert destination_problems({"destinationProblems": "not json"}) == {}
    assert destination_problems({"destinationProblems": "[1]"}) == {}
