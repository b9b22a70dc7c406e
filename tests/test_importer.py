"""`clara-dicom import`: Clara processor settings and appsettings.json -> manifests."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clara_dicom import importer
from clara_dicom.cli import main
from clara_dicom.config import resolve
from clara_dicom.errors import UserError
from clara_dicom.manifests import load_manifests
from clara_dicom.models import ClaraAETitle, ClaraDestination, ClaraSource, JobProcessor

FIXTURES = Path(__file__).parent / "fixtures" / "clara"

SCENARIO_1_PIPELINES = {
    "lung": "8abf244aff7647989d4f6b3987a85759",
    "heart": "c5f996a71e1d4959bd6a2c8cf7130f88",
    "breast": "eb48c784ef20425580db7d46a30829b2",
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["import", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def import_to_resources(capsys, tmp_path: Path, *argv: str):
    """Run the real CLI, write its stdout to a file and load that file like `up` would."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    manifest_file = tmp_path / "imported.yaml"
    manifest_file.write_text(out)
    return load_manifests(manifest_file), out, err


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("clara-dicom import: warning: ")]


def write_json(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def only_accept(spec):  # resolve() without the real aetitle plug-in
    return None


# --- processor settings: the reference's scenarios ------------------------------------


def test_scenario_1_gives_the_patient_grouped_processor(capsys, tmp_path):
    resources, out, err = import_to_resources(capsys, tmp_path, str(FIXTURES / "scenario1.json"), "--name", "lung-heart-breast")
    assert len(resources) == 1
    jp = resources[0]
    assert isinstance(jp, JobProcessor)
    assert jp.metadata.name == "lung-heart-breast"
    assert jp.spec.type == "aetitle"
    assert jp.spec.groupBy == "Patient"
    assert jp.spec.group_tag == 0x00100020
    assert jp.spec.priority == "normal"
    assert jp.spec.timeout == 60
    assert jp.spec.pipelines == SCENARIO_1_PIPELINES
    assert list(jp.spec.pipelines) == ["lung", "heart", "breast"]  # order kept
    assert warnings_of(err) == []


def test_scenario_1_exact_manifest():
    result = importer.import_file(str(FIXTURES / "scenario1.json"))
    assert result.manifests == [{
        "apiVersion": "dicom.clara.io/v1alpha1",
        "kind": "JobProcessor",
        "metadata": {"name": "scenario1"},
        "spec": {"type": "aetitle", "groupBy": "Patient", "priority": "normal", "timeout": 60,
                 "pipelines": SCENARIO_1_PIPELINES},
    }]
    assert result.warnings == []


def test_scenario_2_defaults_to_study_and_five_seconds(capsys, tmp_path):
    resources, out, err = import_to_resources(capsys, tmp_path, str(FIXTURES / "scenario2.json"))
    (jp,) = resources
    assert isinstance(jp, JobProcessor)
    assert jp.metadata.name == "scenario2"  # from the file name
    assert jp.spec.groupBy == "Study"
    assert jp.spec.priority == "higher"
    assert jp.spec.timeout == 5
    assert jp.spec.pipelines == {"breast": "8abf244aff7647989d4f6b3987a85759"}
    assert warnings_of(err) == []


def test_reference_typo_is_a_one_line_json_error(capsys, tmp_path):
    # Scenario 1 exactly as printed in the reference: `"priority: "normal"` is not JSON.
    text = ('{"groupBy": "Patient",\n"priority: "normal",\n"timeout": 60,\n'
            '"pipeline-lung": "8abf244aff7647989d4f6b3987a85759"}')
    path = tmp_path / "typo.json"
    path.write_text(text)
    code, out, err = run_cli(capsys, str(path))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "invalid JSON" in err and "line 2" in err and "Traceback" not in err


def test_timeout_below_five_is_raised_with_a_warning(capsys, tmp_path):
    path = write_json(tmp_path, "short.json", {"timeout": 2, "pipeline-lung": "p1"})
    resources, out, err = import_to_resources(capsys, tmp_path, str(path))
    assert resources[0].spec.timeout == 5
    (warning,) = warnings_of(err)
    assert "timeout 2" in warning and "raised to 5" in warning


@pytest.mark.parametrize("value,expected", [
    ("Patient", "Patient"), ("patient", "Patient"), ("STUDY", "Study"), ("study", "Study"), ("Series", "Series"),
    ("0010,0020", "Patient"), ("(0010,0020)", "Patient"), ("00100020", "Patient"),
    ("0020,000D", "Study"), ("0020,000d", "Study"), ("(0020,000D)", "Study"), ("0020000D", "Study"),
    ("0020000d", "Study"), (" ( 0020 , 000D ) ", "Study"),
    ("0020,000E", "Series"), ("(0020,000e)", "Series"), ("0020000E", "Series"),
    ("PatientID", "Patient"), ("StudyInstanceUID", "Study"), ("SeriesInstanceUID", "Series"),
    ("0008,0050", "0008,0050"), ("(0008,0050)", "0008,0050"), ("00080050", "0008,0050"),
    ("0020,0010", "0020,0010"), ("(0040,a124)", "0040,A124"),
])
def test_group_by_tags_map_to_levels(value, expected):
    result = importer.convert({"groupBy": value, "pipeline-x": "p"}, "test.json")
    spec = result.manifests[0]["spec"]
    assert spec["groupBy"] == expected
    JobProcessor.model_validate(result.manifests[0])  # and the model agrees


@pytest.mark.parametrize("value", ["Instance", "0020,000", "0020000DD", "(0020000D)", "GG20,000D", "", 20, None])
def test_bad_group_by_is_a_user_error(value):
    with pytest.raises(UserError, match="groupBy"):
        importer.convert({"groupBy": value, "pipeline-x": "p"}, "test.json")


@pytest.mark.parametrize("value,expected", [("normal", "normal"), ("Higher", "higher"), ("IMMEDIATE", "immediate"),
                                            ("lower", "lower")])
def test_priority_is_case_insensitive(value, expected):
    result = importer.convert({"priority": value, "pipeline-x": "p"}, "test.json")
    assert result.manifests[0]["spec"]["priority"] == expected


@pytest.mark.parametrize("settings,message", [
    ({"priority": "urgent", "pipeline-x": "p"}, "priority must be one of"),
    ({"timeout": "soon", "pipeline-x": "p"}, "timeout must be an integer"),
    ({"timeout": 7.5, "pipeline-x": "p"}, "timeout must be an integer"),
    ({"timeout": True, "pipeline-x": "p"}, "timeout must be an integer"),
    ({"groupBy": "Study", "timeout": 10}, "no pipeline-"),
    ({"pipeline-": "p"}, "pipeline key"),
    ({"pipeline-lung ct": "p"}, "pipeline key"),
    ({"pipeline-x": ""}, "pipeline ID"),
    ({"pipeline-x": 42}, "pipeline ID"),
    ({"pipeline-Lung": "a", "pipeline-lung": "b"}, "differ only by case"),
])
def test_bad_processor_settings(settings, message):
    with pytest.raises(UserError, match=message):
        importer.convert(settings, "test.json")


def test_timeout_as_string_and_whole_float_are_accepted():
    assert importer.convert({"timeout": "60", "pipeline-x": "p"}, "t.json").manifests[0]["spec"]["timeout"] == 60
    assert importer.convert({"timeout": 30.0, "pipeline-x": "p"}, "t.json").manifests[0]["spec"]["timeout"] == 30


def test_unknown_keys_are_warned_about_not_dropped_silently(capsys, tmp_path):
    path = write_json(tmp_path, "extra.json", {"groupBy": "Series", "pipeline-a": "p", "retries": 3, "Priority": "lower"})
    resources, out, err = import_to_resources(capsys, tmp_path, str(path))
    assert resources[0].spec.priority == "lower"  # key spelling is case-insensitive
    (warning,) = warnings_of(err)
    assert "'retries'" in warning and "ignored" in warning
    assert "retries" not in out


def test_name_option_and_derived_names(tmp_path):
    path = write_json(tmp_path, "My Lung_Settings.v2.json", {"pipeline-a": "p"})
    assert importer.import_file(str(path)).manifests[0]["metadata"]["name"] == "my-lung-settings-v2"
    result = importer.import_file(str(path), name="Lung Processor")
    assert result.manifests[0]["metadata"]["name"] == "lung-processor"
    assert any("not a DNS name" in w for w in result.warnings)
    result = importer.import_file(str(path), name="lung", namespace="radiology")
    assert result.manifests[0]["metadata"] == {"name": "lung", "namespace": "radiology"}
    assert importer.dns_label("___") == "imported"
    assert len(importer.dns_label("x" * 100)) == 63


def test_processor_output_resolves_with_a_pipeline(capsys, tmp_path):
    resources, _, _ = import_to_resources(capsys, tmp_path, str(FIXTURES / "scenario2.json"))
    res = resolve(resources, validate_processor=only_accept)
    conds = {c.type: c for c in res.conditions[resources[0].key]}
    assert conds["Ready"].status is True
    assert conds["PipelinesResolved"].status is False  # no ClaraPipeline imported: jobs wait


# --- appsettings.json ----------------------------------------------------------------


def by_kind(resources):
    out: dict[str, dict[str, object]] = {}
    for r in resources:
        out.setdefault(r.KIND, {})[r.metadata.name] = r
    return out


def test_whole_appsettings(capsys, tmp_path):
    resources, out, err = import_to_resources(capsys, tmp_path, str(FIXTURES / "appsettings.json"))
    kinds = by_kind(resources)
    assert set(kinds) == {"ClaraAETitle", "JobProcessor", "ClaraSource", "ClaraDestination"}

    aets = kinds["ClaraAETitle"]
    assert set(aets) == {"claraae", "ct-liver"}
    clara = aets["claraae"]
    assert isinstance(clara, ClaraAETitle)
    assert clara.spec.aeTitle == "ClaraAE"
    assert clara.spec.processor == "claraae"
    assert clara.spec.ignoredSopClasses == ["1.2.840.10008.5.1.4.1.1.7"]
    assert clara.spec.overwriteSameInstance is True
    assert aets["ct-liver"].spec.aeTitle == "CT_Liver"
    assert aets["ct-liver"].spec.overwriteSameInstance is False

    jps = kinds["JobProcessor"]
    assert jps["claraae"].spec.model_dump() == {
        "type": "aetitle", "groupBy": "Patient", "priority": "higher", "timeout": 5,
        "pipelines": {"lung": "8abf244aff7647989d4f6b3987a85759", "heart": "c5f996a71e1d4959bd6a2c8cf7130f88"},
        "settings": {},
    }
    assert jps["ct-liver"].spec.groupBy == "Series"
    assert jps["ct-liver"].spec.timeout == 5

    srcs = kinds["ClaraSource"]
    assert {(n, s.spec.aeTitle, s.spec.host) for n, s in srcs.items()} == {
        ("pacs", "PACS", "1.2.3.4"), ("ct-scanner", "CT_SCANNER", "10.0.0.0/24")}
    dsts = kinds["ClaraDestination"]
    assert {(n, d.spec.aeTitle, d.spec.host, d.spec.port) for n, d in dsts.items()} == {
        ("orthanc", "ORTHANC", "orthanc.hospital.local", 4242), ("dcm4chee", "DCM4CHEE", "10.1.2.3", 11112)}
    assert all(isinstance(d, ClaraDestination) for d in dsts.values())
    assert all(isinstance(s, ClaraSource) for s in srcs.values())

    # JobProcessors come before the AE titles that need them (kubectl apply order).
    kinds_in_order = [doc["kind"] for doc in yaml.safe_load_all(out) if doc]
    assert kinds_in_order.index("JobProcessor") < kinds_in_order.index("ClaraAETitle")

    # Warnings: one line each; the timeout was raised; unimported adapter settings named.
    warnings = warnings_of(err)
    assert any("timeout 2" in w and "raised to 5" in w for w in warnings)
    assert any("verification" in w and "not imported" in w for w in warnings)
    assert not any("Logging" in w for w in warnings)  # not the adapter's business

    # Adapter settings: a comment block saying which flag or environment variable to set.
    comments = [line for line in err.splitlines() if line.startswith("#")]
    text = "\n".join(comments)
    assert "--dicom-port 104" in text and "CLARA_DICOM_PORT=104" in text
    assert "CLARA_REJECT_UNKNOWN_SOURCES=true" in text
    assert "CLARA_SCU_AE_TITLE=ClaraSCU" in text
    assert "CLARA_MAX_ASSOCIATIONS=100" in text
    for line in err.splitlines():
        assert line.startswith("#") or line.startswith("clara-dicom import: warning: "), line

    # The whole import is a working configuration.
    res = resolve(resources, validate_processor=only_accept)
    assert set(res.config.aeTitles) == {"claraae", "ct-liver"}
    assert res.config.destination("Orthanc") is not None  # register-results --data '["Orthanc"]'
    assert res.config.destination("DCM4CHEE") is not None


def test_adapter_setting_names_exist_in_the_adapter():
    settings_mod = pytest.importorskip("clara_adapter.settings")
    tables = [importer._SCP_SETTINGS, importer._SCU_SETTINGS, importer._SCU_EXPORT_SETTINGS, importer._STORAGE_SETTINGS]
    for table in tables:
        for setting, _flag in table.values():
            assert setting in settings_mod.AdapterSettings.model_fields, setting
            assert importer.env_name(setting) == settings_mod.env_name(setting)


def test_clara_08_spelling_comments_and_plugin_processor(capsys, tmp_path):
    resources, out, err = import_to_resources(capsys, tmp_path, str(FIXTURES / "appsettings-0.8-commented.json"))
    kinds = by_kind(resources)
    brain = kinds["ClaraAETitle"]["brain-tumor"]
    assert brain.spec.aeTitle == "Brain-Tumor-AE"  # name and aeTitle given separately
    assert brain.spec.processor == "brain-tumor"
    assert brain.spec.ignoredSopClasses == []
    assert kinds["JobProcessor"]["brain-tumor"].spec.pipelines == {"brain-tumor": "12345"}

    cache = kinds["JobProcessor"]["cache"]
    assert cache.spec.type == "study-cache"  # from StudyCacheJobProcessor
    assert cache.spec.settings == {"cacheSize": 100}  # a plug-in's own settings are kept for its validator
    assert kinds["ClaraAETitle"]["cache"].spec.aeTitle == "CACHE_AE"

    assert kinds["ClaraSource"]["storescu"].spec.host == "127.0.0.1"
    dst = kinds["ClaraDestination"]["my-pacs"]
    assert dst.spec.port == 1104  # "1104" as a string is accepted
    warnings = warnings_of(err)
    assert any("StudyCacheJobProcessor" in w and "'study-cache'" in w for w in warnings)
    assert any("'my-pacs'" in w and "--data" in w for w in warnings)
    assert any("maximumRetries" in w for w in warnings)
    text = "\n".join(line for line in err.splitlines() if line.startswith("#"))
    assert "CLARA_DICOM_PORT=1104" in text
    assert "CLARA_REJECT_UNKNOWN_SOURCES=false" in text
    assert "CLARA_SCU_AE_TITLE=ClaraSCU2" in text
    assert "CLARA_EXPORT_CONCURRENCY=4" in text
    assert "CLARA_FAILURE_THRESHOLD=0.25" in text

    # The plug-in type is not installed: the operator would say so.
    res = resolve(resources)
    assert res.ready(cache.key).reason == "UnknownProcessorType"


def test_dicom_object_at_top_level_and_key_variants():
    data = {
        "dicom": {
            "scp": {
                "AE_TITLES": [{"Name": "CT1", "Processor_Settings": {"Pipeline-Lung": "p1", "Group-By": "series"}}],
                "Sources": [{"AETitle": "MODALITY", "HostIP": "ct1.example.org", "name": "ct-1"}],
            },
            "scu": {"Destinations": [{"Name": "pacs", "Host_Ip": "::1", "Port": 104, "Ae_Title": "PACS"}]},
        }
    }
    result = importer.convert(data, "dicom.json")
    by = {(m["kind"], m["metadata"]["name"]): m["spec"] for m in result.manifests}
    assert by[("ClaraAETitle", "ct1")] == {"aeTitle": "CT1", "processor": "ct1"}
    assert by[("JobProcessor", "ct1")]["pipelines"] == {"Lung": "p1"}
    assert by[("JobProcessor", "ct1")]["groupBy"] == "Series"
    assert by[("ClaraSource", "ct-1")] == {"aeTitle": "MODALITY", "host": "ct1.example.org"}
    assert by[("ClaraDestination", "pacs")] == {"aeTitle": "PACS", "host": "::1", "port": 104}
    # the scp/scu pair itself at the top level
    result = importer.convert(data["dicom"], "dicom.json")
    assert len(result.manifests) == 4


def test_names_are_deduplicated_and_duplicate_titles_warned():
    data = {"dicom": {"scp": {"ae-titles": [
        {"name": "Clara AE", "processorSettings": {"pipeline-a": "p"}},
        {"name": "clara-ae", "processorSettings": {"pipeline-b": "p"}},
        {"name": "Clara AE", "processorSettings": {"pipeline-c": "p"}},
    ]}}}
    result = importer.convert(data, "dup.json")
    aets = [m for m in result.manifests if m["kind"] == "ClaraAETitle"]
    assert [m["metadata"]["name"] for m in aets] == ["clara-ae", "clara-ae-2", "clara-ae-3"]
    assert [m["spec"]["processor"] for m in aets] == ["clara-ae", "clara-ae-2", "clara-ae-3"]
    assert any("listed twice" in w and "Conflict" in w for w in result.warnings)
    assert any("'clara-ae-2'" in w for w in result.warnings)


def test_processor_defaults_to_the_ae_title_job_processor():
    data = {"dicom": {"scp": {"ae-titles": [{"name": "A", "processorSettings": {"pipeline-a": "p"}}]}}}
    result = importer.convert(data, "a.json")
    assert result.manifests[0]["spec"]["type"] == "aetitle"
    assert result.warnings == []


def test_unknown_keys_in_entries_are_warned():
    data = {"dicom": {"scp": {"ae-titles": [{"name": "A", "processorSettings": {"pipeline-a": "p"}, "colour": "red"}],
                              "sources": [{"ae-title": "S", "host-ip": "1.1.1.1", "port": 104}]}}}
    result = importer.convert(data, "a.json")
    assert any("'colour'" in w for w in result.warnings)
    assert any("'port'" in w and "sources[0]" in w for w in result.warnings)


def test_empty_appsettings_warns_and_prints_nothing(capsys, tmp_path):
    path = write_json(tmp_path, "appsettings.json", {"DicomAdapter": {"readAeTitlesFromCrd": True,
                                                                      "dicom": {"scp": {"port": 104}}}})
    code, out, err = run_cli(capsys, str(path))
    assert code == 0
    assert [d for d in yaml.safe_load_all(out) if d] == []
    assert any("readAeTitlesFromCrd" in w for w in warnings_of(err))
    assert any("nothing to import" in w for w in warnings_of(err))


@pytest.mark.parametrize("data,message", [
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": [{"name": "THIS_TITLE_IS_TOO_LONG",
                                                        "processorSettings": {"pipeline-a": "p"}}]}}}},
     r"ae-titles\[0\].*ClaraAETitle/this-title-is-too-long: spec.aeTitle"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": [{"name": "A", "processorSettings": {}}]}}}}, "no pipeline-"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": [{"name": "A", "ignoredSopClasses": ["1.2.3"],
                                                        "allowedSopClasses": ["1.2.4"],
                                                        "processorSettings": {"pipeline-a": "p"}}]}}}},
     "mutually exclusive"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": [{"name": "A", "ignoredSopClasses": ["CT Image"],
                                                        "processorSettings": {"pipeline-a": "p"}}]}}}},
     "ignoredSopClasses"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": [{"processorSettings": {"pipeline-a": "p"}}]}}}},
     "AE title is missing"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": {"name": "A"}}}}}, "must be a JSON array"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": ["A"]}}}}, "expected a JSON object"),
    ({"DicomAdapter": {"dicom": {"scp": {"ae-titles": [{"name": "A", "overwriteSameInstance": "yes",
                                                        "processorSettings": {"pipeline-a": "p"}}]}}}},
     "overwriteSameInstance must be true or false"),
    ({"DicomAdapter": {"dicom": {"scp": {"sources": [{"ae-title": "S", "host-ip": "not a host"}]}}}},
     r"sources\[0\].*spec.host"),
    ({"DicomAdapter": {"dicom": {"scp": {"sources": [{"ae-title": "S"}]}}}}, "host is missing"),
    ({"DicomAdapter": {"dicom": {"scu": {"destinations": [{"name": "D", "host-ip": "h", "ae-title": "D"}]}}}},
     "port is missing"),
    ({"DicomAdapter": {"dicom": {"scu": {"destinations": [{"name": "D", "host-ip": "h", "port": 0,
                                                           "ae-title": "D"}]}}}}, "spec.port"),
    ({"DicomAdapter": {"dicom": {"scu": {"destinations": [{"name": "D", "host-ip": "h", "port": "x",
                                                           "ae-title": "D"}]}}}}, "port must be an integer"),
    ({"DicomAdapter": {"dicom": "scp"}}, "must be a JSON object"),
    ({"DicomAdapter": {"dicom": {"scp": []}}}, "must be a JSON object"),
    ({"DicomAdapter": []}, "must be a JSON object"),
    ({"DicomAdapter": {"storage": {}}}, "no 'dicom' object"),
    ({"Logging": {}}, "not Clara configuration"),
    ({}, "not Clara configuration"),
    ([{"groupBy": "Study"}], "got a JSON array"),
    ("pipeline-a", "got a JSON string"),
])
def test_bad_inputs_are_one_line_user_errors(tmp_path, capsys, data, message):
    path = write_json(tmp_path, "bad.json", data)
    with pytest.raises(UserError, match=message) as info:
        importer.import_file(str(path))
    assert "\n" not in str(info.value)
    code, out, err = run_cli(capsys, str(path))
    assert code == 2
    assert out == ""
    assert err.startswith("clara-dicom import: error: ") and err.count("\n") == 1


def test_file_problems(tmp_path, capsys):
    cases = {
        tmp_path / "missing.json": "no such file",
        tmp_path: "is a folder",
    }
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    cases[empty] = "empty"
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    cases[binary] = "UTF-8"
    broken = tmp_path / "broken.json"
    broken.write_text('{"dicom": {"scp": {\n  "port": 104\n  "sources": []}}}')
    cases[broken] = "line 3 column 3: invalid JSON"
    for path, message in cases.items():
        code, out, err = run_cli(capsys, str(path))
        assert code == 2, path
        assert message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_relaxed_json_keeps_strings_and_positions():
    text = '{\n  "a": "x // not a comment", // comment\n  "b": ["/* kept */", 1,], /* c */\n}'
    assert json.loads(importer._relax_json(text)) == {"a": "x // not a comment", "b": ["/* kept */", 1]}
    assert len(importer._relax_json(text)) == len(text)
    assert importer._relax_json(text).count("\n") == text.count("\n")
    # an escaped quote does not end the string
    text = '{"a": "say \\"hi\\" // there",}'
    assert json.loads(importer._relax_json(text)) == {"a": 'say "hi" // there'}


def test_stdin(monkeypatch, capsys, tmp_path):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"pipeline-a": "p"})))
    code, out, err = run_cli(capsys, "-")
    assert code == 0
    (doc,) = [d for d in yaml.safe_load_all(out) if d]
    assert doc["metadata"]["name"] == "imported"


def test_output_is_multi_document_yaml_loadable_as_a_folder(capsys, tmp_path):
    folder = tmp_path / "config"
    folder.mkdir()
    for name in ("appsettings.json", "scenario1.json"):
        code, out, err = run_cli(capsys, str(FIXTURES / name))
        assert code == 0
        (folder / f"{Path(name).stem}.yaml").write_text(out)
    resources = load_manifests(folder)
    assert len(resources) == 9
    assert out.startswith("# generated by clara-dicom import")


def test_subprocess_cli(tmp_path):
    exe = shutil.which("clara-dicom")
    cmd = [exe] if exe else [sys.executable, "-m", "clara_dicom.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*cmd, "import", str(FIXTURES / "scenario1.json"), "--name", "scenario-one"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out_file = tmp_path / "out.yaml"
    out_file.write_text(proc.stdout)
    (jp,) = load_manifests(out_file)
    assert jp.metadata.name == "scenario-one"
    assert jp.spec.pipelines == SCENARIO_1_PIPELINES

    proc = subprocess.run([*cmd, "import", str(tmp_path / "nope.json")], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


def test_imported_appsettings_are_ready_with_the_real_plugin(capsys, tmp_path):
    pytest.importorskip("clara_adapter.processors.aetitle")
    resources, _, _ = import_to_resources(capsys, tmp_path, str(FIXTURES / "appsettings.json"))
    res = resolve(resources)  # the installed aetitle plug-in validates the processors
    for obj in resources:
        assert res.ready(obj.key).status is True, (obj.key, res.ready(obj.key))


def test_yaml_ambiguous_values_survive_the_round_trip(capsys, tmp_path):
    data = {"dicom": {"scp": {"ae-titles": [
        {"name": "NO", "processorSettings": {"pipeline-a": "1e3", "pipeline-b": "null", "pipeline-c": "0123"}},
        {"name": "123", "processorSettings": {"pipeline-on": "yes"}},
    ]}, "scu": {"destinations": [{"name": "Off", "host-ip": "10.0.0.1", "port": 104, "ae-title": "TRUE"}]}}}
    path = write_json(tmp_path, "tricky.json", data)
    resources, _, _ = import_to_resources(capsys, tmp_path, str(path))
    kinds = by_kind(resources)
    assert kinds["ClaraAETitle"]["no"].spec.aeTitle == "NO"
    assert kinds["ClaraAETitle"]["123"].spec.aeTitle == "123"
    assert kinds["JobProcessor"]["no"].spec.pipelines == {"a": "1e3", "b": "null", "c": "0123"}
    assert kinds["JobProcessor"]["123"].spec.pipelines == {"on": "yes"}
    assert kinds["ClaraDestination"]["off"].spec.aeTitle == "TRUE"
