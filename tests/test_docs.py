"""docs/reference.md is generated from crds/*.yaml; docs/troubleshooting.md covers every reason."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reference_is_the_generators_output():
    res = subprocess.run([sys.executable, str(REPO / "docs" / "gen_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr + " (run: python docs/gen_reference.py)"


def test_reference_covers_every_crd_field():
    sys.path.insert(0, str(REPO / "docs"))
    import gen_reference as gen

    text = (REPO / "docs" / "reference.md").read_text()
    for crd in gen.load():
        kind = crd["spec"]["names"]["kind"]
        assert f"## {kind}" in text
        schema = next(v for v in crd["spec"]["versions"] if v.get("storage"))["schema"]["openAPIV3Schema"]
        for path, _, _ in gen.fields(schema["properties"]["spec"], "spec"):
            assert f"`{path}`" in text, f"{kind} {path}"


def _reasons_in_code() -> set[str]:
    """Every reason of a False condition the operator and the resolver can set."""
    reasons: set[str] = set()
    for path in (REPO / "clara_dicom" / "config.py", REPO / "operator" / "clara_operator" / "rendering.py",
                 REPO / "clara_dicom" / "plugins.py"):
        text = path.read_text()
        reasons |= set(re.findall(r'(?:Condition|Cond)\("\w+", False, "(\w+)"', text))
        reasons |= set(re.findall(r'return \("(\w+)", ', text))  # processor problems (reason, message)
    return reasons


def test_troubleshooting_explains_every_ready_false_reason():
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    documented = set(re.findall(r"^### `(\w+)`", text, flags=re.M))
    readme = (REPO / "operator" / "README.md").read_text()
    from_readme = set(re.findall(r"`(?:Ready|PipelinesResolved|SourcesResolved)=False` `(\w+)`", readme))
    missing = (_reasons_in_code() | from_readme) - documented
    assert not missing, f"docs/troubleshooting.md lacks: {sorted(missing)}"


def test_settings_table_names_every_variable_the_chart_and_the_operator_set():
    """The chart's and the pipeline contract's environment names are read by a settings
    class, so they are all in the one table of docs/reference.md."""
    text = (REPO / "docs" / "reference.md").read_text()
    table = text[text.index("## Settings and environment variables"):]
    used = set()
    for path in (REPO / "charts" / "clara-dicom" / "templates").glob("*.yaml"):
        used |= set(re.findall(r"name: (CLARA_[A-Z_]+)", path.read_text()))
    jobspec = (REPO / "operator" / "clara_operator" / "jobspec.py").read_text()
    in_jobs = set(re.findall(r'"(CLARA_[A-Z_]+)"', jobspec))  # every name a pipeline container is given
    assert {"CLARA_JOB_ID", "CLARA_PAYLOAD_ID", "CLARA_RESULTS_URL"} <= in_jobs, "jobspec.py names not found"
    assert any(name.startswith("CLARA_") for name in used), "no environment names found in the chart"
    used |= in_jobs
    missing = sorted(name for name in used if f"| `{name}` |" not in table)
    assert not missing, f"docs/reference.md settings table lacks {missing}"
