"""The Dockerfile's install steps, without a Docker engine (issue 11).

The Dockerfile is the one source of truth: this test reads it, plays its COPY
instructions into a scratch root (the build context filtered like the image's
stages see it), runs its `python` RUN steps there with the image paths (/src,
/wheels, /opt/clara, /app) mapped into that root, into a fresh virtualenv (no
--system-site-packages), then runs every entry point's --help from the image's
working directory: `clara-dicom --help` and each subcommand's, `register-results
--help` and `python register.py --help`.

Differences from a real build, on purpose: the host's Python instead of
python:3.11-slim, pip's cache allowed (`--no-cache-dir` dropped: the first run
downloads every dependency, later runs are fast), and the user/group steps are
skipped (no root needed).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
IMAGE_ROOTS = ("/src", "/wheels", "/opt/clara", "/app")

pytestmark = pytest.mark.slow


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def test_dockerfile_shape():
    steps = instructions(DOCKERFILE.read_text())
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2 and " AS builder" in froms[0], "multi-stage: a builder, then the runtime"
    arg = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert arg["PYTHON_IMAGE"] == "python:3.11-slim"
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "runs as the numeric non-root user 10001"
    assert ("WORKDIR", "/app") in final
    assert ("COPY", "results/register.py /app/register.py") in final
    assert (REPO / "results" / "register.py").is_file()
    assert not any(w == "ENTRYPOINT" for w, _ in final), "the chart sets command: the image has no ENTRYPOINT"


def _map(text: str, root: Path) -> str:
    for image_path in IMAGE_ROOTS:
        text = re.sub(rf"(?<![\w/]){re.escape(image_path)}(?=/|\s|$)", str(root) + image_path, text)
    return text


def _copy(args: str, root: Path, workdir: str, stages: dict[str, Path]) -> None:
    parts = shlex.split(args)
    from_stage = next((stages[p.split("=", 1)[1]] for p in parts if p.startswith("--from=")), None)
    parts = [p for p in parts if not p.startswith("--")]
    *sources, dest = parts
    dest_path = Path(dest if dest.startswith("/") else f"{workdir}/{dest}")
    target = root / dest_path.relative_to("/")
    for src in sources:
        origin = from_stage / src.lstrip("/") if from_stage else REPO / src
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            final = target / origin.name if dest.endswith("/") or target.is_dir() else target
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, final)


def build(base: Path) -> tuple[Path, list[str]]:
    """Play the Dockerfile, each stage in its own folder under base; return the
    final stage's folder (its "/") and the commands run."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    stages: dict[str, Path] = {}
    root, env, workdir = base, dict(clean), "/"
    ran: list[str] = []
    for word, args in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            root = base / f"stage{len(stages)}"
            root.mkdir(parents=True)
            name = args.split()[-1] if " AS " in args.upper() else str(len(stages))
            stages[name] = root
            env, workdir = dict(clean), "/"
        elif word == "WORKDIR":
            workdir = args
            (root / args.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            _copy(args, root, workdir, stages)
        elif word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                if key == "PATH":
                    value = value.replace("$PATH", env.get("PATH", ""))
                env[key] = _map(value, root)
        elif word == "RUN" and re.match(r"(python|/opt/clara/bin/python)\s", args):
            command = args.replace("--no-cache-dir", "")
            command = re.sub(r"^python\s", shlex.quote(sys.executable) + " ", command)
            command = _map(command, root)
            cwd = root / workdir.lstrip("/")
            res = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                                 timeout=1500)
            assert res.returncode == 0, f"RUN {args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            ran.append(args)
    return root, ran


def test_image_install_steps_and_every_entry_point(tmp_path):
    root, ran = build(tmp_path / "image")
    assert len(ran) == 4, ran  # two wheels steps, the venv, the install
    venv = root / "opt" / "clara"
    assert not (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = true")
    app = root / "app"
    assert (app / "register.py").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*cmd: str) -> str:
        res = subprocess.run(list(cmd), cwd=app, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}"
        return res.stdout

    # The installed code, not the repository's.
    origin = run(str(venv / "bin" / "python"), "-c", "import clara_dicom, clara_adapter, clara_operator, "
                 "clara_results; print(clara_dicom.__file__, clara_operator.__file__)")
    assert str(venv) in origin and str(REPO) not in origin

    from clara_dicom.cli import SUBCOMMANDS

    top = run(str(venv / "bin" / "clara-dicom"), "--help")
    for name in SUBCOMMANDS:
        assert name in top, f"subcommand {name} missing from the installed clara-dicom (module not packaged?)"
        assert "usage: clara-dicom" in run(str(venv / "bin" / "clara-dicom"), name, "--help")
    assert "list" in run(str(venv / "bin" / "clara-dicom"), "jobs", "list", "--help")
    assert "--agent" in run(str(venv / "bin" / "register-results"), "--help")
    assert "--agent" in run(str(venv / "bin" / "python"), "register.py", "--help")
    # The processor plug-in entry point is registered in the installed metadata.
    plugins = run(str(venv / "bin" / "python"), "-c", "from importlib.metadata import entry_points; "
                  "print([e.name for e in entry_points(group='clara_dicom.processors')])")
    assert "aetitle" in plugins
