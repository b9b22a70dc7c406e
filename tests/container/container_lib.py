"""Helpers for the container tests: the image fixture's build, podman, the chart's securityContext.

The clara-dicom image is built by tools/image/build.sh and run in podman (issue 17).

Podman runs as root here with the vfs storage driver (the one the build script's
buildah uses, so both see the same images), runc and cgroupfs, and explicit rlimits
no higher than the current ones (this machine class refuses raising them; crun
fails on its hybrid cgroup layout).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from local_setup import IN_CI, require

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tools" / "image" / "build.sh"
CHART_VALUES = REPO / "charts" / "clara-dicom" / "values.yaml"
PODMAN = ["podman", "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]


def _limit(kind: int, cap: int) -> int:
    soft, _ = resource.getrlimit(kind)
    return cap if soft == resource.RLIM_INFINITY else min(soft, cap)


RLIMITS = ["--ulimit", f"nofile={_limit(resource.RLIMIT_NOFILE, 65536)}:{_limit(resource.RLIMIT_NOFILE, 65536)}",
           "--ulimit", f"nproc={_limit(resource.RLIMIT_NPROC, 16384)}:{_limit(resource.RLIMIT_NPROC, 16384)}"]


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def chart_security_flags(read_only_tmp: tuple[str, ...] = ("/tmp",)) -> list[str]:
    """The chart's pod and container securityContext (values.yaml) as `podman run` flags.

    runAsUser/runAsGroup -> --user, fsGroup -> --group-add, allowPrivilegeEscalation:
    false -> no-new-privileges, capabilities.drop -> --cap-drop, readOnlyRootFilesystem ->
    --read-only with tmpfs only where the chart mounts an emptyDir (/tmp).
    runAsNonRoot is checked, as the kubelet does, against the user the container gets.
    """
    values = yaml.safe_load(CHART_VALUES.read_text())
    pod, ctr = values["podSecurityContext"], values["securityContext"]
    flags = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    if pod.get("runAsNonRoot"):
        assert int(pod["runAsUser"]) != 0, "runAsNonRoot with runAsUser 0 could never start"
    if "fsGroup" in pod:
        flags += ["--group-add", str(pod["fsGroup"])]
    if ctr.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    for cap in ctr.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    if ctr.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]
        for path in read_only_tmp:
            flags += ["--tmpfs", f"{path}:rw,size=256m,mode=1777"]
    return flags


@dataclass(frozen=True)
class Image:
    name: str
    archive: Path


def build_image() -> Image:
    """clara-dicom:<version>, built (or reused from the content-keyed cache) by tools/image/build.sh."""
    require(shutil.which("podman") is not None, "podman (apt-get install podman)")
    require(shutil.which("buildah") is not None or _docker_daemon(), "buildah or a docker daemon")
    try:
        podman("info", timeout=60)
    except AssertionError as exc:
        pytest.skip(f"podman is installed but cannot run here: {str(exc)[-400:]}")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.setdefault("CLARA_IMAGE_ENGINE", "buildah")  # podman must see the image: same storage
    res = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=2400, env=env)
    assert res.returncode == 0, f"tools/image/build.sh failed:\n{res.stderr[-4000:]}"
    out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    built = Image(out["image"], Path(out["archive"]))
    probe = podman("run", "--rm", *RLIMITS, built.name, "true", check=False, timeout=300)
    if probe.returncode != 0:
        reason = f"podman cannot run a container here: {probe.stderr.strip()[-400:]}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    return built


def _docker_daemon() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


def remove(names: list[str]) -> None:
    """Remove containers and volumes by name (whichever each is)."""
    for name in names:
        podman("rm", "-f", "-t", "5", name, check=False, timeout=120)
        podman("volume", "rm", "-f", name, check=False, timeout=60)


__all__ = ["IN_CI", "PODMAN", "REPO", "RLIMITS", "Image", "build_image", "chart_security_flags", "podman", "remove"]
