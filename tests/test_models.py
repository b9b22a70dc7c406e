"""Resource models (SPEC §2), the manifest loader and the cross-object rules of resolve()."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from clara_dicom.config import RenderedConfig, resolve
from clara_dicom.errors import UserError
from clara_dicom.manifests import ManifestError, load_manifests, parse_resource
from clara_dicom.models import (
    API_VERSION,
    RESOURCE_TYPES,
    ClaraAETitle,
    ClaraPipeline,
    JobProcessor,
    PipelineDefinition,
    RegisterResults,
    check_host,
    format_tag,
    parse_group_by,
)

# --- builders -----------------------------------------------------------------------


def manifest(kind: str, name: str, spec: dict, **metadata) -> dict:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, **metadata}, "spec": spec}


def aet(name="clara", ae_title="CLARA", processor="proc", meta=None, **spec) -> dict:
    return manifest("ClaraAETitle", name, {"aeTitle": ae_title, "processor": processor, **spec}, **(meta or {}))


def jp(name="proc", pipelines=None, meta=None, **spec) -> dict:
    return manifest("JobProcessor", name, {"pipelines": {"lung": "lung-pipeline"} if pipelines is None else pipelines, **spec},
                    **(meta or {}))


def src(name="pacs", host="10.0.0.5", ae_title="PACS") -> dict:
    return manifest("ClaraSource", name, {"aeTitle": ae_title, "host": host})


def dst(name="orthanc", host="orthanc.local", port=4242, ae_title="ORTHANC", **spec) -> dict:
    return manifest("ClaraDestination", name, {"aeTitle": ae_title, "host": host, "port": port, **spec})


def pipe(name="lung-pipeline", operators=None, meta=None, **spec) -> dict:
    ops = operators if operators is not None else [{"name": "ai", "container": {"image": "clara/ai", "tag": "1"},
                         "input": [{"path": "/input"}], "output": [{"path": "/output"}]}]
    return manifest("ClaraPipeline", name, {"definition": {"api-version": "0.4.0", "operators": ops}, **spec},
                    **(meta or {}))


def rr(name="export", **spec) -> dict:
    return manifest("RegisterResults", name, {"agent": "ClaraSCU", "pipeline": "lung-pipeline", **spec})


def parse(obj: dict):
    return parse_resource(obj, "test.yaml")


def bad(obj: dict, *fragments: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse(obj)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("test.yaml: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- ClaraAETitle -----------------------------------------------------------------------


@pytest.mark.parametrize("title", ["A", "CLARA", "ClaraAE", "A" * 16, "CT SCANNER 1", "a-b_c.d", "STORESCU",
                                   "!#$%&'()*+,-./:;", "X~Y[Z]", "0"])
def test_ae_title_accepted(title):
    assert parse(aet(ae_title=title)).spec.aeTitle == title


@pytest.mark.parametrize("title,why", [
    ("", "at least 1"),
    ("A" * 17, "at most 16"),
    ("A\\B", "invalid format"),  # backslash is the DICOM value separator
    ("A\tB", "invalid format"),
    ("A\nB", "invalid format"),
    ("A\x00B", "invalid format"),
    ("A\x7fB", "invalid format"),
    (" CLARA", "invalid format"),
    ("CLARA ", "invalid format"),
    (" ", "invalid format"),
    ("    ", "invalid format"),
    (" " * 16, "invalid format"),
    ("CLÄRA", "invalid format"),
])
def test_ae_title_rejected(title, why):
    bad(aet(ae_title=title), "ClaraAETitle/clara", "spec.aeTitle", why)


def test_ae_title_defaults_and_required_fields():
    obj = parse(aet())
    assert isinstance(obj, ClaraAETitle)
    assert obj.spec.overwriteSameInstance is False
    assert obj.spec.ignoredSopClasses == [] and obj.spec.allowedSopClasses == [] and obj.spec.allowedSources == []
    assert obj.metadata.namespace == "default"
    no_processor = aet()
    del no_processor["spec"]["processor"]
    bad(no_processor, "spec.processor: required field is missing")
    bad(aet(processor="Not_A_Name"), "spec.processor")
    no_title = aet()
    del no_title["spec"]["aeTitle"]
    bad(no_title, "spec.aeTitle: required field is missing")
    assert parse(aet(overwriteSameInstance=True)).spec.overwriteSameInstance is True


def test_sop_class_lists():
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    assert parse(aet(ignoredSopClasses=[ct, mr])).spec.ignoredSopClasses == [ct, mr]
    assert parse(aet(allowedSopClasses=[ct])).spec.allowedSopClasses == [ct]
    # Empty lists on both sides are not a conflict.
    parse(aet(ignoredSopClasses=[], allowedSopClasses=[ct]))
    bad(aet(ignoredSopClasses=[ct], allowedSopClasses=[mr]), "mutually exclusive")


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2.", ".1.2", "1..2", "1.2.a", "CT Image Storage", "",
                                 "1.2 .3", "1." + "2" * 63])
def test_bad_sop_class_uids(uid):
    bad(aet(ignoredSopClasses=[uid]), "spec.ignoredSopClasses.0")


def test_allowed_sources_are_object_names():
    assert parse(aet(allowedSources=["pacs", "ct-1"])).spec.allowedSources == ["pacs", "ct-1"]
    bad(aet(allowedSources=["PACS"]), "spec.allowedSources.0")


# --- JobProcessor ---------------------------------------------------------------------------


def test_job_processor_defaults():
    obj = parse(jp())
    assert isinstance(obj, JobProcessor)
    spec = obj.spec
    assert (spec.type, spec.groupBy, spec.priority, spec.timeout, spec.settings) == ("aetitle", "Study", "normal", 5, {})
    assert spec.group_tag == 0x0020000D


@pytest.mark.parametrize("group_by,tag", [
    ("Patient", 0x00100020), ("Study", 0x0020000D), ("Series", 0x0020000E),
    ("0020,000D", 0x0020000D), ("(0020,000D)", 0x0020000D), ("0020000D", 0x0020000D),
    ("0020,000d", 0x0020000D), ("(0010,0020)", 0x00100020), ("0008,0050", 0x00080050), ("7FE0,0010", 0x7FE00010),
])
def test_group_by_forms(group_by, tag):
    obj = parse(jp(groupBy=group_by))
    assert obj.spec.groupBy == group_by
    assert obj.spec.group_tag == tag
    assert parse_group_by(group_by) == tag


@pytest.mark.parametrize("group_by", ["study", "PATIENT", "Instance", "", "0020,000", "0020,000DD", "(0020000D)",
                                      "0020,000D)", "(0020,000D", "0020 000D", "0020.000D", "0020,000G", "0x0020000D",
                                      " 0020,000D"])
def test_group_by_bad_forms(group_by):
    bad(jp(groupBy=group_by), "spec.groupBy")
    with pytest.raises(ValueError, match="groupBy"):
        parse_group_by(group_by)


def test_format_tag():
    assert format_tag(0x0020000D) == "(0020,000D)"
    assert format_tag(parse_group_by("(7fe0,0010)")) == "(7FE0,0010)"


@pytest.mark.parametrize("priority", ["lower", "normal", "higher", "immediate"])
def test_priorities(priority):
    assert parse(jp(priority=priority)).spec.priority == priority


@pytest.mark.parametrize("priority", ["high", "Normal", "urgent", "", None, 1])
def test_bad_priorities(priority):
    bad(jp(priority=priority), "spec.priority")


def test_timeout():
    assert parse(jp(timeout=5)).spec.timeout == 5
    assert parse(jp(timeout=3600)).spec.timeout == 3600
    for value in (4, 0, -1):
        bad(jp(timeout=value), "spec.timeout", "greater than or equal to 5")
    bad(jp(timeout=7.5), "spec.timeout")
    bad(jp(timeout="soon"), "spec.timeout")


def test_pipelines():
    obj = parse(jp(pipelines={"lung": "a", "heart": "b", "Breast_2.v1": "c"}))
    assert obj.spec.pipelines == {"lung": "a", "heart": "b", "Breast_2.v1": "c"}
    bad(jp(pipelines={}), "spec.pipelines", "at least 1")
    no_pipelines = jp()
    del no_pipelines["spec"]["pipelines"]
    bad(no_pipelines, "spec.pipelines: required field is missing")
    bad(jp(pipelines={"lung ct": "a"}), "spec.pipelines")
    bad(jp(pipelines={"-lung": "a"}), "spec.pipelines")
    bad(jp(pipelines={"lung": ""}), "spec.pipelines.lung")


def test_processor_type_and_settings():
    obj = parse(jp(type="study-cache", settings={"cacheSize": 100, "nested": {"a": [1]}}))
    assert obj.spec.type == "study-cache"
    assert obj.spec.settings == {"cacheSize": 100, "nested": {"a": [1]}}
    for bad_type in ("Cache", "", "-cache", "cache!"):
        bad(jp(type=bad_type), "spec.type")


# --- ClaraSource / ClaraDestination ------------------------------------------------------------


@pytest.mark.parametrize("host", ["10.0.0.5", "127.0.0.1", "10.0.0.0/8", "192.168.1.0/24", "10.0.0.1/24", "::1",
                                  "fe80::1", "2001:db8::/32", "pacs", "localhost", "pacs.hospital.example.org",
                                  "pacs.example.org.", "ct-1.example", "1e100.net", "a" * 63 + ".org"])
def test_source_hosts_accepted(host):
    assert parse(src(host=host)).spec.host == host
    assert check_host(host) == host


@pytest.mark.parametrize("host", ["", "pacs host", "999.1.1.1", "1.2.3", "10.0.0.0/33", "-pacs.org", "pacs-.org",
                                  "pa..cs", "pacs_1.org", "[::1]", "http://pacs", "a" * 64 + ".org", "pacs/24",
                                  "x" * 254])
def test_source_hosts_rejected(host):
    bad(src(host=host), "ClaraSource/pacs", "spec.host")


def test_source_requires_ae_title():
    bad(src(ae_title="TOO_LONG_FOR_A_TITLE"), "spec.aeTitle")
    obj = src()
    del obj["spec"]["aeTitle"]
    bad(obj, "spec.aeTitle: required field is missing")


@pytest.mark.parametrize("port", [1, 104, 4242, 11112, 65535])
def test_destination_ports(port):
    assert parse(dst(port=port)).spec.port == port


@pytest.mark.parametrize("port", [0, -1, 65536, 100000, "dicom"])
def test_destination_bad_ports(port):
    bad(dst(port=port), "ClaraDestination/orthanc", "spec.port")


def test_destination_without_port_names_what_is_missing():
    bad(dst(port=None), "ClaraDestination/orthanc", "port missing", "dicomweb")


def test_dicomweb_destination_needs_no_dimse_fields():
    obj = parse(manifest("ClaraDestination", "pacs-web", {"dicomweb": {
        "url": "https://pacs.example.org/dicom-web", "tokenSecretRef": {"name": "pacs-token"}}}))
    assert obj.spec.dicomweb.url == "https://pacs.example.org/dicom-web"
    assert obj.spec.dicomweb.tokenSecretRef.key == "token"
    assert obj.spec.aeTitle is None and obj.spec.label == "https://pacs.example.org/dicom-web"


@pytest.mark.parametrize("extra, given", [({"host": "pacs"}, "host"), ({"aeTitle": "PACS", "port": 104}, "aeTitle, port"),
                                          ({"tls": {"secretRef": {"name": "t"}}}, "tls")])
def test_dicomweb_and_dimse_fields_are_exclusive(extra, given):
    bad(manifest("ClaraDestination", "both", {"dicomweb": {"url": "http://pacs/dicom-web"}, **extra}),
        "set either aeTitle, host and port", f"dicomweb is set and so is {given}")


@pytest.mark.parametrize("url", ["ftp://pacs/dicom-web", "pacs/dicom-web", "http://", "http://pacs/a b",
                                 "http://pacs/x?token=1"])
def test_dicomweb_url_must_be_plain_http(url):
    bad(manifest("ClaraDestination", "web", {"dicomweb": {"url": url}}), "spec.dicomweb.url")


def test_destination_host_and_tls():
    bad(dst(host="not a host"), "spec.host")
    obj = parse(dst(tls={"secretRef": {"name": "orthanc-tls"}, "serverName": "orthanc.example.org"}))
    assert obj.spec.tls.secretRef.name == "orthanc-tls"
    bad(dst(tls={"secretRef": {}}), "spec.tls.secretRef.name")
    bad(dst(tls={"secret": "x", "secretRef": {"name": "a"}}), "spec.tls.secret", "unknown field")


# --- ClaraPipeline -----------------------------------------------------------------------------

# The liver-tumor example of reference/clara-register-results.txt, indentation restored.
LIVER_TUMOR = """\
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraPipeline
metadata:
  name: liver-tumor-example
spec:
  definition:
    api-version: 0.4.0
    name: liver-tumor-example
    operators:
    # input dicom reader operator
    - name: dicom-reader
      description: Converts DICOM data into MHD.
      container:
        image: clara/dicom-reader
        tag: [IMAGE_TAG]
      input:
      - from: ${{dicom-input-from-adapter}}
        name: ${{input-file-from-adapter}}
        path: /input
      output:
      - path: /output
    - name: liver-tumor-segmentation
      description: AI segmentation of liver and tumor
      container:
        image: clara/ai-livertumor
        tag: [IMAGE_TAG]
      input:
      - from: dicom-reader
        path: /input
      output:
      - path: /output
        name: segmentation
    # Register converted MHD data with Results Service
    - name: register-mhd-output
      description: Exports MHD data.
      container:
        image: clara/register-results
        tag: [IMAGE_TAG]
        command: ["python", "register.py", "--agent", "renderserver"]
      input:
      - from: dicom-writer
        name: dicom
        path: /input
    # image data to DICOM
    - name: dicom-writer
      description: Converts MHD into DICOM data.
      container:
        image: clara/dicom-writer
        tag: [IMAGE_TAG]
      input:
      - from: liver-tumor-segmentation
        name: segmentation
        path: /input
      - from: ${{dicom-input-from-adapter}}
        name: ${{input-file-from-adapter}}
        path: /dicom
      output:
      - path: /output
        name: dicom
    # Register converted DICOM data with Results Service
    - name: register-dicom-output
      description: Exports DICOM data.
      container:
        image: clara/register-results
        tag: [IMAGE_TAG]
        command: ["python", "register.py", "--agent", "ClaraSCU", "--data", "[\\"Orthanc\\",\\"DCM4CHEE\\",\\"ImageViewer1\\"]"]
      input:
      - from: dicom-writer
        name: dicom
        path: /input
"""


def liver_tumor(tag: str = "0.8.1") -> dict:
    return yaml.safe_load(LIVER_TUMOR.replace("[IMAGE_TAG]", tag))


def test_liver_tumor_pipeline_is_valid():
    obj = parse(liver_tumor())
    assert isinstance(obj, ClaraPipeline)
    assert obj.pipeline_id == "liver-tumor-example"  # default: metadata.name
    definition = obj.spec.definition
    assert definition.api_version == "0.4.0"
    order = [op.name for op in definition.execution_order()]
    assert sorted(order) == sorted(op.name for op in definition.operators)
    assert order.index("dicom-writer") < order.index("register-mhd-output")  # listed after it, runs before it
    assert order.index("dicom-reader") < order.index("liver-tumor-segmentation") < order.index("dicom-writer")
    assert order.index("dicom-writer") < order.index("register-dicom-output")
    assert order == ["dicom-reader", "liver-tumor-segmentation", "dicom-writer", "register-mhd-output",
                     "register-dicom-output"]
    reader = definition.operators[0]
    assert reader.container.tag == "0.8.1"
    assert reader.input[0].from_ == "${{dicom-input-from-adapter}}" and reader.input[0].is_payload
    writer = next(op for op in definition.operators if op.name == "dicom-writer")
    assert [i.is_payload for i in writer.input] == [False, True]
    dicom_out = next(op for op in definition.operators if op.name == "register-dicom-output")
    assert dicom_out.container.command[-1] == '["Orthanc","DCM4CHEE","ImageViewer1"]'


def test_liver_tumor_pipeline_round_trips_with_clara_keys():
    obj = parse(liver_tumor())
    out = obj.to_manifest()
    definition = out["spec"]["definition"]
    assert definition["api-version"] == "0.4.0"
    assert definition["operators"][0]["input"][0]["from"] == "${{dicom-input-from-adapter}}"
    assert parse(out).to_manifest() == out


def test_unreplaced_image_tag_placeholder_is_a_clear_error():
    message = bad(yaml.safe_load(LIVER_TUMOR), "ClaraPipeline/liver-tumor-example",
                  "spec.definition.operators.0.container.tag", "[IMAGE_TAG]")
    assert "replace" in message


def test_numeric_tags_must_be_quoted_as_in_the_crd():
    doc = liver_tumor()
    doc["spec"]["definition"]["operators"][0]["container"]["tag"] = 0.10  # YAML would make "0.1" of it
    with pytest.raises(ManifestError, match="quote it"):
        parse(doc)
    doc["spec"]["definition"]["operators"][0]["container"]["tag"] = "0.10"
    assert parse(doc).spec.definition.operators[0].container.tag == "0.10"


def test_unknown_definition_keys_are_preserved():
    doc = liver_tumor()
    doc["spec"]["definition"]["pipeline-timeout"] = 600
    doc["spec"]["definition"]["operators"][0]["variables"] = {"CLARA_TRACE": "2"}
    doc["spec"]["definition"]["operators"][0]["requests"] = {"gpu": 1, "memory": 8192}
    doc["spec"]["definition"]["operators"][0]["container"]["pull-policy"] = "IfNotPresent"
    out = parse(doc).to_manifest()["spec"]["definition"]
    assert out["pipeline-timeout"] == 600
    assert out["operators"][0]["variables"] == {"CLARA_TRACE": "2"}
    assert out["operators"][0]["requests"] == {"gpu": 1, "memory": 8192}
    assert out["operators"][0]["container"]["pull-policy"] == "IfNotPresent"


def test_pipeline_id():
    assert parse(pipe()).pipeline_id == "lung-pipeline"
    assert parse(pipe(pipelineId="8abf244aff7647989d4f6b3987a85759")).pipeline_id == "8abf244aff7647989d4f6b3987a85759"
    bad(pipe(pipelineId=""), "spec.pipelineId")


def op(name, inputs=(), outputs=({"path": "/output"},)):
    return {"name": name, "container": {"image": f"clara/{name}", "tag": "1"}, "input": list(inputs),
            "output": list(outputs)}


def test_duplicate_operator_names():
    bad(pipe(operators=[op("a", [{"path": "/in"}]), op("a", [{"path": "/in"}])]), "unique", "'a'")


def test_dangling_references():
    bad(pipe(operators=[op("a", [{"from": "nowhere", "path": "/in"}])]), "'nowhere'", "names no operator")
    bad(pipe(operators=[op("a", [{"path": "/in"}], [{"name": "seg", "path": "/out"}]),
                        op("b", [{"from": "a", "name": "mask", "path": "/in"}])]), "no output named 'mask'")
    bad(pipe(operators=[op("a", [{"path": "/in"}], []), op("b", [{"from": "a", "path": "/in"}])]), "has no output")
    # A named output that exists, and a placeholder name, are fine.
    parse(pipe(operators=[op("a", [{"path": "/in"}], [{"name": "seg", "path": "/out"}]),
                          op("b", [{"from": "a", "name": "seg", "path": "/in"}]),
                          op("c", [{"from": "a", "name": "${{anything}}", "path": "/in"}])]))


def test_cycles():
    bad(pipe(operators=[op("a", [{"from": "b", "path": "/in"}]), op("b", [{"from": "a", "path": "/in"}])]),
        "cycle", "a, b")
    bad(pipe(operators=[op("a", [{"from": "a", "path": "/in"}])]), "from itself")
    bad(pipe(operators=[op("start", [{"path": "/in"}]), op("x", [{"from": "start", "path": "/a"},
                                                                  {"from": "z", "path": "/b"}]),
                        op("y", [{"from": "x", "path": "/in"}]), op("z", [{"from": "y", "path": "/in"}])]),
        "cycle", "x, y, z")


def test_relative_paths_rejected():
    bad(pipe(operators=[op("a", [{"path": "input"}])]), "'input'", "absolute")
    bad(pipe(operators=[op("a", [{"path": "/input"}], [{"path": "output"}])]), "'output'", "absolute")


def test_pipeline_shape_errors():
    bad(pipe(operators=[]), "spec.definition")
    bad(manifest("ClaraPipeline", "p", {}), "spec.definition: required field is missing")
    bad(pipe(operators=[op("Bad_Name", [{"path": "/in"}])]), "name")
    no_image = op("a", [{"path": "/in"}])
    no_image["container"] = {"tag": "1"}
    bad(pipe(operators=[no_image]), "container.image")
    bad(pipe(operators=[op("a", [{"from": "x"}])]), "path")


def test_execution_order_is_stable_among_peers():
    definition = PipelineDefinition.model_validate({"operators": [
        op("z", [{"path": "/in"}]), op("b", [{"path": "/in"}]), op("m", [{"from": "z", "path": "/in"}]),
        op("a", [{"path": "/in"}])]})
    assert [o.name for o in definition.execution_order()] == ["z", "b", "a", "m"]


# --- RegisterResults ---------------------------------------------------------------------------


@pytest.mark.parametrize("agent", ["ClaraSCU", "renderserver", "a", "A1", "scu-export-2", "x" * 63])
def test_agent_names(agent):
    obj = parse(rr(agent=agent))
    assert isinstance(obj, RegisterResults)
    assert obj.spec.agent == agent


@pytest.mark.parametrize("agent", ["", "1scu", "-scu", "scu-", "clara_scu", "clara scu", "ClaraSCU!", "x" * 64])
def test_bad_agent_names(agent):
    bad(rr(agent=agent), "spec.agent")


def test_register_results_data():
    assert parse(rr()).spec.data is None  # absent: one task with null parameters
    assert parse(rr(data=None)).spec.data is None
    assert parse(rr(data=["Orthanc", "DCM4CHEE"])).spec.data == ["Orthanc", "DCM4CHEE"]
    assert parse(rr(data=[{"dest": "Orthanc"}, None, 3])).spec.data == [{"dest": "Orthanc"}, None, 3]
    bad(rr(data=[]), "spec.data", "at least 1")
    bad(rr(data="Orthanc"), "spec.data")
    bad(rr(data={"dest": "Orthanc"}), "spec.data")


def test_register_results_inputs_and_pipeline():
    assert parse(rr(inputs=["dicom-writer", "dicom-writer/dicom"])).spec.inputs == ["dicom-writer", "dicom-writer/dicom"]
    assert parse(rr()).spec.inputs == []
    for value in ("Dicom-Writer", "dicom-writer/", "a/b/c", "/dicom"):
        bad(rr(inputs=[value]), "spec.inputs.0")
    no_pipeline = rr()
    del no_pipeline["spec"]["pipeline"]
    bad(no_pipeline, "spec.pipeline: required field is missing")


# --- PipelineJob ------------------------------------------------------------------------------


def test_pipeline_job():
    job = manifest("PipelineJob", "clara-lung-0123456789", {
        "pipeline": "lung-pipeline", "priority": "higher",
        "source": {"aeTitle": "CLARA", "processor": "proc"},
        "group": {"by": "Study", "value": "1.2.3"},
        "payload": {"path": "/payloads/x", "instances": 4, "bytes": 1024},
    })
    obj = parse(job)
    assert obj.spec.payload.instances == 4
    job["spec"]["payload"]["instances"] = -1
    bad(job, "spec.payload.instances")


# --- resources in general ---------------------------------------------------------------------


def test_metadata_rules():
    bad(aet(name="Clara"), "metadata.name")
    bad(aet(name="clara_ae"), "metadata.name")
    no_meta = aet()
    del no_meta["metadata"]
    bad(no_meta, "metadata: required field is missing")
    assert parse(aet(meta={"namespace": "radiology"})).metadata.namespace == "radiology"
    assert parse(aet(meta={"creationTimestamp": "2024-01-01T00:00:00Z"})).metadata.model_extra["creationTimestamp"]


VALID_SPECS = {
    "ClaraAETitle": aet()["spec"], "JobProcessor": jp()["spec"], "ClaraSource": src()["spec"],
    "ClaraDestination": dst()["spec"], "ClaraPipeline": pipe()["spec"], "RegisterResults": rr()["spec"],
    "PipelineJob": {"pipeline": "p", "source": {"aeTitle": "A", "processor": "p"}, "group": {"by": "Study", "value": "1"},
                    "payload": {"path": "/p", "instances": 1}},
}


def test_every_kind_has_a_valid_example():
    assert set(VALID_SPECS) == set(RESOURCE_TYPES)
    for kind, spec in VALID_SPECS.items():
        assert parse(manifest(kind, "x", spec)).KIND == kind


@pytest.mark.parametrize("kind", sorted(RESOURCE_TYPES))
def test_wrong_api_version_and_unknown_spec_fields(kind):
    obj = manifest(kind, "x", {**copy.deepcopy(VALID_SPECS[kind]), "definitelyNotAField": 1})
    message = bad(obj, f"{kind}/x", "spec.definitelyNotAField", "unknown field")
    obj["apiVersion"] = "dicom.clara.io/v1"
    bad(obj, "apiVersion must be dicom.clara.io/v1alpha1", "'dicom.clara.io/v1'")
    assert message


def test_unknown_kind_and_non_mapping():
    bad(manifest("ClaraAeTitle", "x", {}), "unknown kind", "ClaraAETitle")
    with pytest.raises(ManifestError, match="expected a mapping"):
        parse_resource(["not", "a", "mapping"], "test.yaml")
    assert issubclass(ManifestError, UserError)


# --- load_manifests -----------------------------------------------------------------------------


def dump(*docs) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def test_multi_document_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# comment\n---\n" + dump(jp(), aet(), src(), dst(), pipe()) + "---\n")
    resources = load_manifests(path)
    assert [r.KIND for r in resources] == ["JobProcessor", "ClaraAETitle", "ClaraSource", "ClaraDestination",
                                           "ClaraPipeline"]


def test_folder_recursive_sorted_and_json(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "aet.yml").write_text(dump(aet()))
    (tmp_path / "a.yaml").write_text(dump(jp()))
    (tmp_path / "dest.json").write_text(json.dumps(dst()))
    (tmp_path / "README.md").write_text("not a manifest: ignored")
    resources = load_manifests(tmp_path)
    assert [r.KIND for r in resources] == ["JobProcessor", "ClaraAETitle", "ClaraDestination"]


def test_kind_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [jp(), aet()]}))
    assert [r.KIND for r in load_manifests(path)] == ["JobProcessor", "ClaraAETitle"]
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": []}))
    assert load_manifests(path) == []
    path.write_text("apiVersion: v1\nkind: List\nitems:\n")
    assert load_manifests(path) == []
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [jp(timeout=1)]}))
    with pytest.raises(ManifestError, match="spec.timeout"):
        load_manifests(path)


def test_list_items_must_be_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems: {a: 1}\n")
    with pytest.raises(ManifestError, match="items must be a list"):
        load_manifests(path)


def test_duplicates(tmp_path):
    (tmp_path / "one.yaml").write_text(dump(jp(), aet()))
    (tmp_path / "two.yaml").write_text(dump(aet(ae_title="OTHER")))
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path)
    message = str(info.value)
    assert "ClaraAETitle/clara is defined twice" in message
    assert "two.yaml" in message and "one.yaml" in message
    # Same name, different kind or namespace: not a duplicate.
    (tmp_path / "two.yaml").write_text(dump(manifest("JobProcessor", "clara", {"pipelines": {"a": "b"}}),
                                            aet(meta={"namespace": "radiology"})))
    assert len(load_manifests(tmp_path)) == 4


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: dicom.clara.io/v1alpha1\nkind: JobProcessor\nmetadata:\n  name: x\n"
                    "spec: {pipelines: [\n")
    with pytest.raises(ManifestError) as info:
        load_manifests(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line ")
    assert "invalid YAML" in message and "\n" not in message
    path.write_text("a: 1\n b: 2\n")
    with pytest.raises(ManifestError, match=r"line 2: invalid YAML"):
        load_manifests(path)


def test_load_errors_name_file_document_object_and_field(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(dump(jp(), aet(name="scanner", ae_title="WAY_TOO_LONG_AE_TITLE")))
    with pytest.raises(ManifestError) as info:
        load_manifests(path)
    assert str(info.value).startswith(f"{path} (document 2): ClaraAETitle/scanner: spec.aeTitle:")

    path.write_text(dump(manifest("Gadget", "g", {})))
    with pytest.raises(ManifestError, match="Gadget/g: unknown kind"):
        load_manifests(path)
    path.write_text(dump({**jp(), "apiVersion": "v1"}))
    with pytest.raises(ManifestError, match=r"JobProcessor/proc: apiVersion must be dicom.clara.io/v1alpha1"):
        load_manifests(path)
    path.write_text(dump(jp(groupby="Study")))
    with pytest.raises(ManifestError, match=r"JobProcessor/proc: spec.groupby: unknown field"):
        load_manifests(path)
    path.write_text("just a string\n")
    with pytest.raises(ManifestError, match="expected a mapping"):
        load_manifests(path)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ManifestError, match="no such file or folder"):
        load_manifests(tmp_path / "missing")
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifests(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_manifests(empty) == []


def test_namespace_option(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(dump(jp(), aet(meta={"namespace": "other"})))
    resources = load_manifests(path, namespace="radiology")
    assert [r.metadata.namespace for r in resources] == ["radiology", "other"]


# --- resolve(): cross-object rules ------------------------------------------------------------


def accept_all(spec):
    return None


def objects(*docs):
    return [parse(copy.deepcopy(d)) for d in docs]


def conds(resolution, obj) -> dict:
    return {c.type: c for c in resolution.conditions[obj.key]}


def test_resolve_valid_configuration():
    items = objects(pipe(), jp(), aet(allowedSources=["pacs"]), src(), dst())
    res = resolve(items, validate_processor=accept_all)
    cfg = res.config
    assert set(cfg.aeTitles) == {"clara"} and set(cfg.processors) == {"proc"}
    assert set(cfg.sources) == {"pacs"} and set(cfg.destinations) == {"orthanc"}
    assert cfg.pipelines == {"lung-pipeline": "lung-pipeline"}
    for obj in items:
        assert res.ready(obj.key).status is True, obj.key
    assert conds(res, items[1])["PipelinesResolved"].status is True
    assert conds(res, items[2])["SourcesResolved"].status is True
    assert len(cfg.version) == 16
    assert RenderedConfig.from_json(cfg.to_json()) == cfg


def test_processor_not_found():
    (a,) = objects(aet(processor="missing"))
    res = resolve([a], validate_processor=accept_all)
    ready = res.ready(a.key)
    assert (ready.status, ready.reason) == (False, "ProcessorNotFound")
    assert "missing" in ready.message
    assert res.config.aeTitles == {}
    # The processor appears: the AE title becomes Ready.
    res = resolve(objects(aet(processor="missing"), jp(name="missing")), validate_processor=accept_all)
    assert res.ready(a.key).status is True


def test_processor_invalid_blocks_its_ae_titles():
    items = objects(jp(), aet())

    def reject(spec):
        return ("InvalidSettings", "settings rejected: cacheSize must be positive")

    res = resolve(items, validate_processor=reject)
    assert res.ready(items[0].key).reason == "InvalidSettings"
    assert res.ready(items[1].key).reason == "ProcessorInvalid"
    assert "cacheSize" in res.ready(items[1].key).message
    assert res.config.aeTitles == {} and res.config.processors == {}


def test_conflicting_ae_titles_later_one_loses():
    first = aet(name="first", meta={"creationTimestamp": "2024-01-01T00:00:00Z"})
    second = aet(name="second", meta={"creationTimestamp": "2024-01-02T00:00:00Z"})
    items = objects(jp(), second, first)  # listing order does not matter: creation time does
    res = resolve(items, validate_processor=accept_all)
    by_name = {o.metadata.name: o for o in items if isinstance(o, ClaraAETitle)}
    assert res.ready(by_name["first"].key).status is True
    loser = res.ready(by_name["second"].key)
    assert (loser.status, loser.reason) == (False, "Conflict")
    assert "first" in loser.message
    assert set(res.config.aeTitles) == {"first"}
    # The winner goes away: the other one becomes valid.
    res = resolve([o for o in items if o.metadata.name != "first"], validate_processor=accept_all)
    assert res.ready(by_name["second"].key).status is True
    assert set(res.config.aeTitles) == {"second"}


def test_conflict_without_timestamps_uses_listing_order():
    items = objects(jp(), aet(name="a"), aet(name="b"))
    res = resolve(items, validate_processor=accept_all)
    assert res.ready(items[1].key).status is True
    assert res.ready(items[2].key).reason == "Conflict"


def test_same_ae_title_in_other_namespaces_is_no_conflict():
    items = objects(jp(), aet(), jp(meta={"namespace": "other"}), aet(meta={"namespace": "other"}))
    assert resolve(items, validate_processor=accept_all).ready(items[1].key).status is True
    res = resolve(items, namespace="other", validate_processor=accept_all)
    assert res.ready(items[3].key).status is True
    assert items[0].key not in res.conditions  # only that namespace's objects


def test_pipeline_not_found():
    (proc,) = objects(jp(pipelines={"lung": "lung-pipeline", "heart": "heart-pipeline"}))
    res = resolve([proc, *objects(pipe())], validate_processor=accept_all)
    c = conds(res, proc)
    assert c["Ready"].status is True  # studies are still accepted and grouped
    assert (c["PipelinesResolved"].status, c["PipelinesResolved"].reason) == (False, "PipelineNotFound")
    assert "heart-pipeline" in c["PipelinesResolved"].message
    assert "lung-pipeline" not in c["PipelinesResolved"].message
    assert "proc" in res.config.processors
    # The pipeline arrives, by its pipelineId rather than its object name.
    res = resolve([proc, *objects(pipe(), pipe(name="heart", pipelineId="heart-pipeline"))],
                  validate_processor=accept_all)
    assert conds(res, proc)["PipelinesResolved"].status is True
    assert res.config.pipelines["heart-pipeline"] == "heart"


def test_source_not_found():
    items = objects(jp(), aet(allowedSources=["pacs", "ct"]), src())
    c = conds(resolve(items, validate_processor=accept_all), items[1])
    assert c["Ready"].status is True
    assert (c["SourcesResolved"].status, c["SourcesResolved"].reason) == (False, "SourceNotFound")
    assert "ct" in c["SourcesResolved"].message and "pacs" not in c["SourcesResolved"].message


def test_plugin_type_that_is_not_installed():
    items = objects(jp(type="not-installed-cache"), aet())
    res = resolve(items)  # the real plug-in discovery
    ready = res.ready(items[0].key)
    assert (ready.status, ready.reason) == (False, "UnknownProcessorType")
    assert "not-installed-cache" in ready.message
    assert res.ready(items[1].key).reason == "ProcessorInvalid"


def test_destination_lookup_is_case_insensitive():
    cfg = resolve(objects(dst()), validate_processor=accept_all).config
    assert cfg.destination("Orthanc").aeTitle == "ORTHANC"
    assert cfg.destination(" ORTHANC ") is not None
    assert cfg.destination("dcm4chee") is None


def version(*docs) -> str:
    return resolve(objects(*docs), validate_processor=accept_all).config.version


def test_version_changes_iff_content_changes():
    base = [pipe(), jp(), aet(), src(), dst()]
    v = version(*base)
    assert version(*base) == v  # deterministic
    assert version(*reversed(base)) == v  # order of objects
    relabelled = copy.deepcopy(base)
    relabelled[1]["metadata"]["labels"] = {"team": "radiology"}
    relabelled[2]["metadata"]["generation"] = 7
    assert version(*relabelled) == v  # metadata is not content
    explicit = copy.deepcopy(base)
    explicit[1]["spec"].update(groupBy="Study", priority="normal", timeout=5)  # the defaults, spelled out
    assert version(*explicit) == v
    # Content that is not served (an AE title waiting for its processor) changes nothing either.
    assert version(*base, aet(name="waiting", ae_title="WAITING", processor="missing")) == v

    changes = []
    for path, value in [((1, "timeout"), 10), ((2, "aeTitle"), "CLARA2"), ((3, "host"), "10.0.0.6"),
                        ((4, "port"), 104), ((2, "overwriteSameInstance"), True), ((1, "priority"), "higher")]:
        docs = copy.deepcopy(base)
        docs[path[0]]["spec"][path[1]] = value
        changes.append(version(*docs))
    assert v not in changes and len(set(changes)) == len(changes)
    assert version(*base[:-1]) != v  # a destination removed
    assert version(*base, src(name="ct", host="10.0.0.7", ae_title="CT")) != v  # a source added
    renamed = copy.deepcopy(base)
    renamed[0]["spec"]["pipelineId"] = "lung-v2"
    assert version(*renamed) != v
    assert resolve(objects(*base), namespace="default", validate_processor=accept_all).config.version == v


def test_duplicate_pipeline_id_later_one_conflicts():
    older = pipe(name="lung-v1", pipelineId="lung", meta={"creationTimestamp": "2024-01-01T00:00:00Z"})
    newer = pipe(name="lung-v2", pipelineId="lung", meta={"creationTimestamp": "2024-01-02T00:00:00Z"})
    items = objects(newer, older)
    res = resolve(items, validate_processor=accept_all)
    assert res.config.pipelines == {"lung": "lung-v1"}
    assert res.ready(items[1].key).status is True
    loser = res.ready(items[0].key)
    assert (loser.status, loser.reason) == (False, "Conflict") and "lung-v1" in loser.message
    assert resolve(objects(older, newer), validate_processor=accept_all).config.version == res.config.version
    res = resolve(objects(newer), validate_processor=accept_all)
    assert res.config.pipelines == {"lung": "lung-v2"} and res.ready(items[0].key).status is True
