"""The committed crds/ are exactly what the models generate, and structural."""
from __future__ import annotations

from pathlib import Path

import yaml

from clara_dicom.models import RESOURCE_TYPES
from clara_operator import crdgen

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_committed_crds_equal_generator_output():
    files = crdgen.render_all()
    assert sorted(files) == sorted(p.name for p in CRDS.glob("*.yaml"))
    for name, text in files.items():
        assert (CRDS / name).read_text(encoding="utf-8") == text, (
            f"crds/{name} is stale: run `python -m clara_operator.crdgen`")


def _walk(node, path):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")


def test_schemas_are_structural_and_described():
    for cls in RESOURCE_TYPES.values():
        doc = crdgen.crd(cls)
        version = doc["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema["properties"]["spec"], "spec"):
            assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "patternProperties"} & set(node), path
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
            if not path.endswith("[]") and not path.endswith(".*"):
                assert node.get("description"), f"{cls.KIND} {path} has no description"
            assert node.get("default", 0) is not None, path
        assert version["subresources"] == {"status": {}}
        assert doc["spec"]["names"]["shortNames"] == cls.SHORT_NAMES
        assert "clara" in doc["spec"]["names"]["categories"]
        assert [c["jsonPath"] for c in version["additionalPrinterColumns"]] == [
            c["jsonPath"] for c in cls.PRINTER_COLUMNS]


def test_specific_rules_reach_the_schema():
    aet = crdgen.crd(RESOURCE_TYPES["ClaraAETitle"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = aet["properties"]["spec"]
    assert spec["required"] == ["aeTitle", "processor"]
    assert "mutually exclusive" in spec["x-kubernetes-validations"][0]["message"]
    assert spec["properties"]["overwriteSameInstance"]["default"] is False
    assert spec["properties"]["aeTitle"]["maxLength"] == 16
    jp = crdgen.crd(RESOURCE_TYPES["JobProcessor"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jspec = jp["properties"]["spec"]["properties"]
    assert jspec["timeout"] == {**jspec["timeout"], "minimum": 5, "default": 5}
    assert jspec["priority"]["enum"] == ["lower", "normal", "higher", "immediate"]
    assert jspec["settings"]["x-kubernetes-preserve-unknown-fields"] is True
    assert jp["properties"]["status"]["properties"]["pipelines"]["type"] == "string"
    pipe = crdgen.crd(RESOURCE_TYPES["ClaraPipeline"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    definition = pipe["properties"]["spec"]["properties"]["definition"]
    assert definition["x-kubernetes-preserve-unknown-fields"] is True
    assert "operators" in definition["properties"]
    rr = crdgen.crd(RESOURCE_TYPES["RegisterResults"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert rr["properties"]["spec"]["properties"]["data"]["items"] == {
        "description": crdgen.FALLBACK_DESCRIPTIONS["RegisterResults.data[]"],
        "x-kubernetes-preserve-unknown-fields": True}


def test_check_mode(tmp_path, capsys):
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "claraaetitles.yaml").write_text("stale")
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1
    assert yaml.safe_load((tmp_path / "jobprocessors.yaml").read_text())["kind"] == "CustomResourceDefinition"
