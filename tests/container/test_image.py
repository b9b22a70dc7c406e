"""The clara-dicom image, run for real in podman (issue 17, SPEC §6, §9 "Image").

Each test starts as few containers as it can: on the vfs storage driver every
container is a full copy of the image's root filesystem.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from clara_dicom.cli import SUBCOMMANDS
from clara_dicom.synthetic import write_study
from clara_results.client import ResultsClient, TaskState
from container_lib import REPO, RLIMITS, Image, chart_security_flags, podman
from peers import Process, free_port, http_ready, storescu, wait_for

pytestmark = [pytest.mark.container, pytest.mark.dcmtk]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
TOKEN = "container-test-token"


def world_readable(folder: Path) -> Path:
    """pytest's tmp folders are 0700 root: the container's uid 10001 must read what is mounted."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def test_image_metadata(image: Image):
    (meta,) = json.loads(podman("image", "inspect", image.name).stdout)
    config = meta["Config"]
    assert image.name == f"clara-dicom:{VERSION}"
    assert config["User"] == "10001:10001", "numeric non-root user, so runAsNonRoot can check it"
    assert config.get("WorkingDir") == "/app"
    assert not config.get("Entrypoint"), "the chart and the operator set command: no ENTRYPOINT"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    # The build archive (what realnode/kind import) holds the name Kubernetes resolves
    # the chart's default `clara-dicom:<version>` to.
    manifest = subprocess.run(["tar", "-xOf", str(image.archive), "manifest.json"], capture_output=True,
                              check=True, timeout=120).stdout
    assert f"docker.io/library/clara-dicom:{VERSION}" in json.loads(manifest)[0]["RepoTags"]


def _custom_ca_line() -> str:
    """A line unique to this host's locally added CA certificates (the one pip needed at build time)."""
    for crt in sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt")):
        lines = [ln for ln in crt.read_text().splitlines() if ln and not ln.startswith("-----")]
        if len(lines) > 4:
            return lines[len(lines) // 2]
    return ""


def test_entry_points_and_contents(image: Image):
    """Every entry point answers --help; nothing of the build stage is left in the image."""
    script = r"""
set -u
clara-dicom --help; echo @@
register-results --help; echo @@
python /app/register.py --help; echo @@
python register.py --help; echo @@
for sub in $SUBCOMMANDS; do clara-dicom "$sub" --help >/dev/null 2>&1 || echo "broken: clara-dicom $sub --help"; done; echo @@
id -u; pwd; echo @@
for tool in gcc cc c++ make pip pip3; do command -v "$tool" >/dev/null && echo "present: $tool"; done
python -c 'import pip' 2>/dev/null && echo 'present: pip module'
for path in /wheels /src /root/.cache/pip /opt/clara/share/doc /run/secrets/ca; do [ -e "$path" ] && echo "present: $path"; done
if [ -n "$CA_LINE" ]; then grep -rlF -- "$CA_LINE" /etc /opt /app /root /run /tmp /var /usr/local 2>/dev/null | sed 's/^/CA baked into /'; fi
echo @@
"""
    res = podman("run", "--rm", *RLIMITS, "-e", f"SUBCOMMANDS={' '.join(SUBCOMMANDS)}",
                 "-e", f"CA_LINE={_custom_ca_line()}", image.name, "sh", "-c", script)
    top, register, register_py, register_py_cwd, subs, who, leftovers, _ = res.stdout.split("@@\n")
    for name in SUBCOMMANDS:
        assert name in top
    assert top.startswith("usage: clara-dicom")
    for out in (register, register_py, register_py_cwd):
        assert out.startswith("usage: register-results") and "--agent" in out, out
    assert subs.strip() == "", subs
    assert who.split() == ["10001", "/app"]
    assert leftovers.strip() == "", f"build leftovers in the final image:\n{leftovers}"


@pytest.fixture
def gateway() -> str:
    """The address the container sees for connections to a port published on the host's loopback
    (podman's default bridge, whose port mapping masquerades them to the bridge's gateway)."""
    (net,) = json.loads(podman("network", "inspect", "podman").stdout)
    subnets = net.get("subnets") or [{"gateway": r[0]["gateway"]} for p in net.get("plugins", [])
                                     if p.get("type") == "bridge" for r in p["ipam"]["ranges"]]
    return subnets[0]["gateway"]


def adapter_config(folder: Path, source_host: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"""
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraAETitle
metadata: {{name: clara}}
spec: {{aeTitle: CLARA, processor: by-study}}
---
apiVersion: dicom.clara.io/v1alpha1
kind: JobProcessor
metadata: {{name: by-study}}
spec: {{groupBy: Study, timeout: 5, pipelines: {{seg: liver-tumor}}}}
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraSource
metadata: {{name: storescu}}
spec: {{aeTitle: STORESCU, host: {source_host}}}
""")
    return world_readable(folder)


def _running(name: str) -> bool:
    res = podman("inspect", "--format", "{{.State.Running}}", name, check=False, timeout=60)
    return res.stdout.strip() == "true"


def test_adapter_container_receives_a_study_through_a_published_port(image, names, gateway, tmp_path):
    """`clara-dicom up` in the container, under the chart's securityContext (read-only root,
    uid 10001, no capabilities), config mounted read-only, state on a volume owned by 10001:
    dcmtk's storescu on the host sends a study; the PipelineJob appears in the volume."""
    config = adapter_config(tmp_path / "config", gateway)
    name, volume = names("adapter"), names("state")
    podman("volume", "create", volume)
    dicom_port, http_port = free_port(), free_port()
    podman("run", "-d", "--name", name, *RLIMITS, *chart_security_flags(),
           "-p", f"127.0.0.1:{dicom_port}:11112", "-p", f"127.0.0.1:{http_port}:8080",
           "-v", f"{config}:/config:ro", "-v", f"{volume}:/state:U",
           image.name, "clara-dicom", "up", "--config", "/config", "--state", "/state", "--host", "0.0.0.0",
           "--dicom-port", "11112", "--http-port", "8080", "--results-port", "0")
    try:
        wait_for(lambda: http_ready(f"http://127.0.0.1:{http_port}") or not _running(name), timeout=180, interval=0.5, what="adapter ready")
        assert _running(name), podman("logs", name, check=False).stderr[-3000:]

        files = write_study(tmp_path / "study", slices=3, rows=32, cols=32)
        storescu(files, dicom_port)

        def jobs() -> list[dict]:
            res = podman("exec", name, "clara-dicom", "jobs", "list", "--state", "/state", "-o", "json",
                         check=False, timeout=60)
            return json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else []

        (job,) = wait_for(jobs, timeout=90, interval=1, what="the PipelineJob in the state volume")
        assert job["kind"] == "PipelineJob" and job["spec"]["pipeline"] == "liver-tumor"
        (mountpoint,) = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.split()
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in Path(mountpoint).rglob("*")}
        assert owners == {(10001, 10001)}, f"files in the state volume not owned by 10001: {owners}"
        received = [p for p in Path(mountpoint).rglob("*") if p.is_file() and p.read_bytes()[128:132] == b"DICM"]
        assert len(received) >= len(files)
    except BaseException:
        print(podman("logs", name, check=False).stderr[-5000:])
        raise


def test_register_results_container_registers_with_the_results_service_on_the_host(image, tmp_path):
    """register-results in the container (as the operator's RegisterResults Job runs it, payload
    mounted read-only, chart securityContext) registers outputs with `clara-dicom
    results-service` on the host's 127.0.0.1. Host networking: the service listens on loopback
    only, which a container on the bridge cannot reach."""
    port = free_port()
    service = Process(["clara-dicom", "results-service", "--host", "127.0.0.1", "--port", str(port),
                       "--database", str(tmp_path / "results.db")], tmp_path / "results.log",
                      env={**os.environ, "CLARA_RESULTS_TOKEN": TOKEN})
    try:
        url = f"http://127.0.0.1:{port}"
        with ResultsClient(url, TOKEN) as client:
            wait_for(lambda: _listening(client), timeout=30, what="Results Service")
            payload = tmp_path / "payload-1"
            out = payload / "operators" / "segmentation" / "output"
            out.mkdir(parents=True)
            (out / "seg.dcm").write_bytes(b"x")
            (out / "report.txt").write_text("y")
            world_readable(payload)
            env = {"CLARA_JOB_ID": "liver-job-1", "CLARA_PIPELINE_ID": "liver-tumor",
                   "CLARA_PAYLOAD_ID": "payload-1", "CLARA_PAYLOAD_ROOT": "/payload",
                   "CLARA_OPERATOR": "register-dicom-output",
                   "CLARA_INPUT_PATHS": "/payload/operators/segmentation/output",
                   "CLARA_RESULTS_URL": url, "CLARA_RESULTS_TOKEN": TOKEN}
            res = podman("run", "--rm", "--network", "host", *RLIMITS, *chart_security_flags(),
                         "-v", f"{payload}:/payload:ro", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")],
                         image.name, "register-results", "--agent", "ClaraSCU", "--data", '["orthanc"]',
                         check=False)
            assert res.returncode == 0, res.stderr
            (task,) = client.list_tasks(agent="ClaraSCU")
            assert task.parameters == '"orthanc"'
            assert sorted(task.uris) == ["operators/segmentation/output/report.txt",
                                         "operators/segmentation/output/seg.dcm"]
            assert (task.job_id, task.pipeline_id, task.payload_id) == ("liver-job-1", "liver-tumor", "payload-1")
            assert task.state == TaskState.PENDING
    finally:
        service.stop()


def _listening(client: ResultsClient) -> bool:
    try:
        client.list_tasks(agent="ClaraSCU")
        return True
    except Exception:  # noqa: BLE001 - not up yet
        time.sleep(0.1)
        return False
