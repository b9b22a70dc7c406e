"""The image recipe, read statically (no container engine needed).

The image itself is built and run in podman by tests/container/ (marker
`container`); these checks hold the recipe to what those runs cannot see: the
layer structure, the build context, and that the chart's default image is the one
`make image` builds.
"""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


STEPS = instructions(DOCKERFILE.read_text())
FINAL = STEPS[max(i for i, (w, _) in enumerate(STEPS) if w == "FROM"):]


def test_multi_stage_on_a_base_given_as_build_argument():
    froms = [args for word, args in STEPS if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    defaults = dict(a.split("=", 1) for w, a in STEPS if w == "ARG" and "=" in a)
    assert defaults["PYTHON_IMAGE"] == "python:3.11-slim"


def test_final_stage_runs_as_numeric_non_root_from_app():
    users = [a for w, a in FINAL if w == "USER"]
    assert users and users[-1] == "10001:10001", "numeric, so Kubernetes' runAsNonRoot can check it"
    assert ("WORKDIR", "/app") in FINAL
    assert ("COPY", "results/register.py /app/register.py") in FINAL
    assert (REPO / "results" / "register.py").is_file()
    assert not any(w == "ENTRYPOINT" for w, _ in FINAL), "the chart sets command: the image has no ENTRYPOINT"
    labels = " ".join(a for w, a in FINAL if w == "LABEL")
    for key in ("source", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_final_stage_takes_only_the_virtualenv_and_deletes_nothing():
    """No wheels, sources or pip cache copied in; no RUN that removes what an earlier layer added
    (the bytes would stay in that layer)."""
    copies = [a for w, a in FINAL if w == "COPY"]
    assert copies == ["--from=builder /opt/clara /opt/clara", "results/register.py /app/register.py"]
    for word, args in FINAL:
        if word == "RUN":
            assert not re.search(r"\brm\b|pip\b", args), f"final-stage RUN deletes or installs: {args}"


def test_ca_certificates_only_as_a_build_secret():
    for word, args in STEPS:
        if word == "RUN" and "pip" in args and "install" in args:
            assert "--mount=type=secret,id=ca" in args, f"pip without the CA secret: {args}"
        assert not (word in ("COPY", "ADD") and re.search(r"\.crt|\.pem|ca-cert", args)), args


def test_dockerignore_lets_in_exactly_the_packages():
    """An allow-list: the build context is pyproject.toml, README.md and the package folders."""
    rules = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "**", "allow-list: everything excluded first"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    package_dirs = {d for d in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"] if d != "."}
    top_packages = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert allowed == {"pyproject.toml", "README.md"} | package_dirs | top_packages
    for excluded in ("**/__pycache__", "**/*.pyc", "**/*.egg-info"):
        assert excluded in rules
    assert not any(fnmatch.fnmatch(name, pattern) for name in ("tests", "charts", ".git", "e2e")
                   for pattern in allowed)


def test_chart_default_image_is_what_make_image_builds():
    """`make image` tags clara-dicom:<pyproject version>; the chart's default is repository
    clara-dicom with the tag defaulting to appVersion."""
    chart = REPO / "charts" / "clara-dicom"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    version = PYPROJECT["project"]["version"]
    assert values["image"]["repository"] == "clara-dicom"
    assert (values["image"]["tag"] or meta["appVersion"]) == version
    build = (REPO / "tools" / "image" / "build.sh").read_text()
    assert re.search(r"^NAME=clara-dicom$", build, re.M)
    assert 'IMAGE=$NAME:$VERSION' in build
