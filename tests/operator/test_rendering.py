"""Reconcile decisions over plain object bodies (no cluster)."""
from __future__ import annotations

import copy
import json

from clara_dicom.config import RenderedConfig
from clara_operator import rendering
from clara_operator.rendering import LAST_VALID_ANNOTATION, plan

NS = "imaging"


def obj(kind, name, spec, *, generation=1, created="2024-01-01T00:00:00Z", status=None, annotations=None):
    body = {
        "apiVersion": "dicom.clara.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "generation": generation, "uid": f"uid-{name}",
                     "creationTimestamp": created, "annotations": dict(annotations or {})},
        "spec": spec,
    }
    if status is not None:
        body["status"] = status
    return body


def aet(name, title, processor="ct", **kw):
    return obj("ClaraAETitle", name, {"aeTitle": title, "processor": processor}, **kw)


def jp(name="ct", pipelines=None, **kw):
    return obj("JobProcessor", name, {"type": "aetitle", "groupBy": "Study", "priority": "normal", "timeout": 5,
                                      "pipelines": pipelines or {"lung": "lung-seg"}}, **kw)


def pipe(name="lung-seg"):
    return obj("ClaraPipeline", name, {"definition": {"api-version": "0.4.0", "operators": [
        {"name": "seg", "container": {"image": "seg", "tag": "1"}, "input": [{"path": "/input"}],
         "output": [{"path": "/output"}]}]}})


def ready(p, kind, name):
    o = p.by_key()[(kind, name)]
    return next(c for c in o.status["conditions"] if c["type"] == "Ready")


def apply(p, bodies):
    """What the reconciler writes back: status and last-valid annotation."""
    out = []
    for o in p.objects:
        b = copy.deepcopy(o.body)
        b["status"] = {k: v for k, v in o.status.items() if v is not None}
        if o.last_valid:
            b["metadata"]["annotations"][LAST_VALID_ANNOTATION] = o.last_valid
        out.append(b)
    return out


def test_valid_set_renders_and_waits_for_adapter():
    bodies = [aet("ct-aet", "CT"), jp(), pipe()]
    p = plan(bodies, NS)
    assert set(p.config.aeTitles) == {"ct-aet"} and set(p.config.processors) == {"ct"}
    assert p.config.pipelines == {"lung-seg": "lung-seg"}
    r = ready(p, "ClaraAETitle", "ct-aet")
    assert (r["status"], r["reason"]) == ("False", "Pending")
    assert p.config.version in r["message"]
    # The adapter applies it: Ready.
    p2 = plan(apply(p, bodies), NS, applied_version=p.config.version)
    r2 = ready(p2, "ClaraAETitle", "ct-aet")
    assert (r2["status"], r2["reason"]) == ("True", "Valid")
    assert r2["observedGeneration"] == 1
    assert p2.config.version == p.config.version
    # Nothing changes after that: no writes, no events.
    p3 = plan(apply(p2, bodies), NS, applied_version=p.config.version)
    assert not any(o.status_changed or o.events or o.last_valid for o in p3.objects)


def test_rendered_json_is_deterministic_and_versioned():
    a = plan([aet("a", "A"), jp(), pipe()], NS)
    b = plan([pipe(), jp(), aet("a", "A")], NS)
    assert a.config_json == b.config_json
    loaded = RenderedConfig.from_json(a.config_json)
    assert loaded.version == loaded.content_hash() == a.config.version


def test_no_feedback_mode_is_ready_at_once():
    p = plan([aet("a", "A"), jp(), pipe()], NS, feedback=False)
    assert ready(p, "ClaraAETitle", "a")["status"] == "True"


def test_unknown_processor_then_created():
    p = plan([aet("a", "A", processor="missing")], NS, feedback=False)
    r = ready(p, "ClaraAETitle", "a")
    assert (r["status"], r["reason"]) == ("False", "ProcessorNotFound")
    assert p.config.aeTitles == {}
    assert [e[:2] for e in p.by_key()[("ClaraAETitle", "a")].events] == [("Warning", "ProcessorNotFound")]
    p2 = plan(apply(p, [])+[jp("missing"), pipe()], NS, feedback=False)
    r2 = ready(p2, "ClaraAETitle", "a")
    assert r2["status"] == "True"
    assert r2["lastTransitionTime"]


def test_conflict_and_winner_deleted():
    first = aet("first", "SAME", created="2024-01-01T00:00:00Z")
    second = aet("second", "SAME", created="2024-01-01T00:00:05Z")
    p = plan([second, first, jp(), pipe()], NS, feedback=False)
    assert ready(p, "ClaraAETitle", "first")["status"] == "True"
    r = ready(p, "ClaraAETitle", "second")
    assert (r["status"], r["reason"]) == ("False", "Conflict") and "first" in r["message"]
    p2 = plan([second, jp(), pipe()], NS, feedback=False)
    assert ready(p2, "ClaraAETitle", "second")["status"] == "True"


def test_invalid_edit_keeps_last_valid_version():
    bodies = [aet("a", "A"), jp(), pipe()]
    p = plan(bodies, NS, feedback=False)
    stored = apply(p, bodies)
    aet_body = next(b for b in stored if b["kind"] == "ClaraAETitle")
    assert json.loads(aet_body["metadata"]["annotations"][LAST_VALID_ANNOTATION])["spec"]["aeTitle"] == "A"
    # Edit: processor that does not exist.
    aet_body["spec"] = {"aeTitle": "B", "processor": "nope"}
    aet_body["metadata"]["generation"] = 2
    p2 = plan(stored, NS, feedback=False)
    assert p2.config.aeTitles["a"].aeTitle == "A"
    r = ready(p2, "ClaraAETitle", "a")
    assert (r["status"], r["reason"]) == ("False", "ProcessorNotFound")
    assert "generation 1" in r["message"] and "still served" in r["message"]
    assert r["observedGeneration"] == 2
    assert p2.by_key()[("ClaraAETitle", "a")].last_valid is None
    # Fixed: the new version is served and remembered.
    aet_body["spec"] = {"aeTitle": "B", "processor": "ct"}
    aet_body["metadata"]["generation"] = 3
    p3 = plan(apply(p2, stored), NS, feedback=False)
    assert p3.config.aeTitles["a"].aeTitle == "B"
    assert json.loads(p3.by_key()[("ClaraAETitle", "a")].last_valid)["generation"] == 3


def test_schema_invalid_object_is_reported_and_falls_back():
    src = obj("ClaraSource", "scanner", {"aeTitle": "SCANNER", "host": "10.0.0.1"})
    p = plan([src], NS, feedback=False)
    stored = apply(p, [src])
    stored[0]["spec"]["host"] = "bad..host"  # passes the CRD pattern, not the model
    p2 = plan(stored, NS, feedback=False)
    r = ready(p2, "ClaraSource", "scanner")
    assert (r["status"], r["reason"]) == ("False", "InvalidSpec")
    assert p2.config.sources["scanner"].host == "10.0.0.1"
    # Without a last valid version it is simply absent.
    fresh = obj("ClaraSource", "other", {"aeTitle": "OTHER", "host": "bad..host"})
    p3 = plan([fresh], NS, feedback=False)
    assert p3.config.sources == {}
    assert ready(p3, "ClaraSource", "other")["reason"] == "InvalidSpec"


def test_processor_invalid_settings_from_plugin_and_last_valid():
    def validator(spec):
        if spec.settings.get("bad"):
            return ("InvalidSettings", "settings rejected by aetitle: bad is not allowed")
        return None

    bodies = [aet("a", "A"), jp(), pipe()]
    p = plan(bodies, NS, feedback=False, validate_processor=validator)
    stored = apply(p, bodies)
    proc = next(b for b in stored if b["kind"] == "JobProcessor")
    proc["spec"]["settings"] = {"bad": True}
    proc["metadata"]["generation"] = 2
    p2 = plan(stored, NS, feedback=False, validate_processor=validator)
    r = ready(p2, "JobProcessor", "ct")
    assert (r["status"], r["reason"]) == ("False", "InvalidSettings")
    # The processor's last valid version still serves, so its AE title stays Ready.
    assert ready(p2, "ClaraAETitle", "a")["status"] == "True"
    assert p2.config.processors["ct"].settings == {}
    # A fresh invalid processor makes its AE title ProcessorInvalid.
    p3 = plan([aet("b", "B", processor="x"), jp("x")] + [pipe()], NS, feedback=False,
              validate_processor=lambda s: ("InvalidSettings", "nope"))
    assert ready(p3, "ClaraAETitle", "b")["reason"] == "ProcessorInvalid"


def test_unknown_processor_type_is_reported():
    proc = jp()
    proc["spec"]["type"] = "no-such-plugin"
    p = plan([proc, pipe()], NS, feedback=False)
    r = ready(p, "JobProcessor", "ct")
    assert (r["status"], r["reason"]) == ("False", "UnknownProcessorType")


def test_pipelines_resolved_and_status_summary():
    p = plan([jp(pipelines={"lung": "lung-seg", "heart": "heart-seg"}), pipe()], NS, feedback=False)
    o = p.by_key()[("JobProcessor", "ct")]
    assert o.status["pipelines"] == "heart,lung"
    pr = next(c for c in o.status["conditions"] if c["type"] == "PipelinesResolved")
    assert (pr["status"], pr["reason"]) == ("False", "PipelineNotFound") and "heart-seg" in pr["message"]
    assert ("Warning", "PipelineNotFound") in [(e[0], e[1]) for e in o.events]
    assert p.by_key()[("ClaraPipeline", "lung-seg")].status["pipelineId"] == "lung-seg"


def test_ready_object_stays_ready_while_unrelated_change_rolls_out():
    bodies = [aet("a", "A"), jp(), pipe()]
    p = plan(bodies, NS)
    p2 = plan(apply(p, bodies), NS, applied_version=p.config.version)
    stored = apply(p2, bodies)
    stored.append(aet("b", "B"))
    p3 = plan(stored, NS, applied_version=p.config.version)
    assert p3.config.version != p.config.version
    assert ready(p3, "ClaraAETitle", "a")["status"] == "True"
    assert ready(p3, "ClaraAETitle", "b")["reason"] == "Pending"
    assert not p3.by_key()[("ClaraAETitle", "a")].status_changed


def test_deleting_objects_are_left_out():
    gone = aet("a", "A")
    gone["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    p = plan([gone, jp(), pipe()], NS, feedback=False)
    assert p.config.aeTitles == {} and ("ClaraAETitle", "a") not in p.by_key()


def test_lasttransitiontime_kept_when_status_unchanged():
    bodies = [aet("a", "A", processor="nope")]
    p = plan(bodies, NS, feedback=False, now="2024-01-01T00:00:00Z")
    stored = apply(p, bodies)
    stored[0]["spec"]["processor"] = "still-nope"
    stored[0]["metadata"]["generation"] = 2
    p2 = plan(stored, NS, feedback=False, now="2024-02-02T00:00:00Z")
    r = ready(p2, "ClaraAETitle", "a")
    assert r["lastTransitionTime"] == "2024-01-01T00:00:00Z" and r["observedGeneration"] == 2
    assert p2.by_key()[("ClaraAETitle", "a")].status_changed
    assert not p2.by_key()[("ClaraAETitle", "a")].events  # same status and reason: no Event


def test_kubernetes_examples_are_all_valid():
    from pathlib import Path

    from clara_dicom.manifests import load_manifests

    examples = Path(__file__).resolve().parents[2] / "examples" / "k8s"
    bodies = [dict(r.to_manifest(), metadata={"name": r.metadata.name, "namespace": NS, "generation": 1})
              for r in load_manifests(examples, namespace=NS)]
    p = plan(bodies, NS, feedback=False)
    assert {o.name for o in p.objects if not o.valid} == set()
    assert all(c["status"] == "True" for o in p.objects for c in o.status["conditions"]), [
        (o.name, o.status["conditions"]) for o in p.objects]
