"""Real DICOM peers for tests and benchmarks: dcmtk tools, Orthanc, and our own
adapter as a subprocess. Everything listens on 127.0.0.1 and is stopped by
its owner."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

# pynetdicom installs console scripts called storescu/echoscu/storescp that
# shadow dcmtk's on PATH: always use dcmtk's by absolute path.
DCMTK_DIR = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))
REPO = Path(__file__).resolve().parent.parent


T = TypeVar("T")


def stops_what_it_starts(make: Callable[..., T], stop: Callable[[T], Any] = lambda thing: thing.stop()
                         ) -> Iterator[Callable[..., T]]:
    """The body of a factory fixture (``yield from stops_what_it_starts(make)``):
    the test calls ``make`` through it, and everything it made is stopped at
    teardown, newest first, whether the test passed or not."""
    made: list[T] = []

    def start(*args: Any, **kwargs: Any) -> T:
        thing = make(*args, **kwargs)
        made.append(thing)
        return thing

    try:
        yield start
    finally:
        for thing in reversed(made):
            stop(thing)


def start_together(count: int, start: Callable[[], T], timeout: float = 60) -> tuple[list[T], list[BaseException]]:
    """Call ``start`` from ``count`` threads released at the same moment, as
    replicas starting together; returns (what started, errors)."""
    barrier = threading.Barrier(count)
    started: list[T] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait(timeout)
            started.append(start())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return started, errors


def dcmtk(tool: str) -> str:
    path = DCMTK_DIR / tool
    if not path.exists():
        raise RuntimeError(f"dcmtk's {tool} not found in {DCMTK_DIR}: apt-get install dcmtk")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    # dcmtk honours TCP_NODELAY from the environment.
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_ready(base_url: str) -> bool:
    """``base_url``/health/ready answers 200 (every component's readiness; no token needed)."""
    try:
        with urllib.request.urlopen(f"{base_url}/health/ready", timeout=1) as rsp:
            return rsp.status == 200
    except OSError:
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def storescu(files: list[Path] | list[str], port: int, called: str = "CLARA", calling: str | None = None,
             extra: list[str] | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [dcmtk("storescu"), "-aec", called]
    if calling:
        cmd += ["-aet", calling]
    cmd += list(extra or []) + ["127.0.0.1", str(port)] + [str(f) for f in files]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"storescu failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def echoscu(port: int, called: str = "CLARA", calling: str | None = None) -> subprocess.CompletedProcess:
    cmd = [dcmtk("echoscu"), "-aec", called] + (["-aet", calling] if calling else []) + ["127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


class Process:
    """A child process in its own process group, logged to a file, always stopped."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.cmd = cmd
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                     cwd=cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(5)


class StoreSCP(Process):
    """dcmtk storescp writing to a folder."""

    def __init__(self, folder: Path, port: int | None = None, fork: bool = False, extra: list[str] | None = None):
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [dcmtk("storescp"), "-pdu", "131072", "-od", str(folder)] + (["--fork"] if fork else [])
        cmd += list(extra or []) + [str(self.port)]
        super().__init__(cmd, folder.parent / f"storescp-{self.port}.log", env=dcmtk_env())
        wait_for(lambda: port_open(self.port) or not self.alive(), 10, what="storescp")
        if not self.alive():
            raise RuntimeError(f"storescp did not start: {self.log()}")


ORTHANC_DICOMWEB_PLUGIN = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN",
                                              "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))


class Orthanc(Process):
    """Debian's Orthanc with its own configuration on loopback; no plugins unless
    ``dicomweb`` (Debian's orthanc-dicomweb, served at ``/dicom-web/``).
    ``users`` turns HTTP basic authentication on; ``extra`` is merged into the configuration."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None, known_aets: dict[str, tuple[str, str, int]] | None = None,
                 dicomweb: bool = False, users: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        if dicomweb and not ORTHANC_DICOMWEB_PLUGIN.exists():
            raise RuntimeError(f"Orthanc's DICOMweb plugin not found at {ORTHANC_DICOMWEB_PLUGIN}: "
                               "apt-get install orthanc-dicomweb")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.aet = aet
        self.users = dict(users or {})
        config = {
            "Name": "clara-dicom-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": dict(users or {}),
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "DicomModalities": {k: list(v) for k, v in (known_aets or {}).items()},
            "HttpServerEnabled": True,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            **(extra or {}),
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        # Orthanc is built on dcmtk: TCP_NODELAY=1 in its environment, as for every dcmtk peer.
        super().__init__(["Orthanc", "--no-jobs", str(cfg)], self.workdir / "orthanc.log", env=dcmtk_env())
        wait_for(lambda: (port_open(self.dicom_port) and port_open(self.http_port)) or not self.alive(), 30,
                 what="Orthanc")
        if not self.alive():
            raise RuntimeError(f"Orthanc did not start: {self.log()[-2000:]}")

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return json.loads(rsp.read())

    def sop_instance_uids(self) -> set[str]:
        uids = set()
        for iid in self.get("/instances"):
            uids.add(self.get(f"/instances/{iid}/tags?simplify")["SOPInstanceUID"])
        return uids

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


def adapter_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clara_dicom.cli", *args]


def adapter_settled(http_port: int) -> bool:
    """No group open and no job submission pending (the adapter's /health/status): every job
    it will make of what it holds exists. Tests wait for this, then count jobs."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health/status", timeout=5) as rsp:
        status = json.loads(rsp.read())
    return status["groupsOpen"] == 0 and status["jobSubmissionsPending"] == 0


class LocalAdapter(Process):
    """`clara-dicom up` as a subprocess on free ports."""

    def __init__(self, config: Path, state: Path, extra: list[str] | None = None, results: bool = False,
                 env: dict[str, str] | None = None, dicom_port: int | None = None):
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.results_port = free_port() if results else 0
        cmd = adapter_command("up", "--config", str(config), "--state", str(self.state), "--dicom-port",
                              str(self.dicom_port), "--http-port", str(self.http_port), "--results-port",
                              str(self.results_port), *(extra or []))
        super().__init__(cmd, self.state.parent / f"adapter-{self.dicom_port}.log", env=env, cwd=REPO)
        self.wait_ready()

    def stop_and_report(self) -> None:
        """Stop it; print its log's tail (pytest shows it on failure) if it had exited on its own with an error."""
        self.stop()
        if self.proc.returncode not in (0, None, -9):
            print(self.log()[-5000:])

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: self.ready() or not self.alive(), timeout, what="adapter ready")
        if not self.alive():
            raise RuntimeError(f"adapter exited: {self.log()[-3000:]}")

    def ready(self) -> bool:
        return http_ready(f"http://127.0.0.1:{self.http_port}")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health/status", timeout=5) as rsp:
            return json.loads(rsp.read())

    def settled(self) -> bool:
        return adapter_settled(self.http_port)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as rsp:
            return rsp.read().decode()

    def jobs(self) -> list[dict[str, Any]]:
        folder = self.state / "jobs"
        out = []
        for p in sorted(folder.glob("[!.]*.json")) if folder.exists() else []:
            try:
                out.append(json.loads(p.read_text()))
            except ValueError:
                continue  # being written
        return out


class ResultsService(Process):
    """`clara-dicom results-service` as a subprocess on a free port of 127.0.0.1."""

    def __init__(self, database: str | Path, folder: Path, *extra: str, token: str | None = None,
                 env: dict[str, str] | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ if env is None else env)
        if token is not None:
            env["CLARA_RESULTS_TOKEN"] = token
        cmd = adapter_command("results-service", "--host", "127.0.0.1", "--port", str(self.port),
                              "--database", str(database), *extra)
        super().__init__(cmd, Path(folder) / f"results-{self.port}.log", env=env)
        if wait:
            self.wait_ready()

    def ready(self) -> bool:
        return http_ready(self.url)

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.ready() or not self.alive(), timeout, interval=0.1, what="Results Service ready")
        if not self.alive():
            raise RuntimeError(f"results-service exited: {self.log()[-3000:]}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values matching the labels."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
