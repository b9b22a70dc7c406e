"""A real Kubernetes control plane on loopback, for the e2e tests.

Starts, as local processes (the way controller-runtime's envtest does, plus the
controllers and a fake node so that Jobs progress):

    etcd -> kube-apiserver (TLS, client certificates, RBAC, service-account
    keys) -> kube-controller-manager, kube-scheduler -> kwok with one fake Node

from the binaries e2e/build.sh builds, each on a free 127.0.0.1 port, each in
its own process group with its log in ``<workdir>/logs/``.  Waits on real
conditions (etcd /health, apiserver /readyz, controller /healthz, Node Ready,
the default ServiceAccount, CRDs Established), never on fixed sleeps.

Given a kubeconfig (``KUBECONFIG`` or ``CLARA_DICOM_E2E_KUBECONFIG``), uses
that cluster and starts nothing.

Standard library only (plus the ``openssl`` command for the certificates), so
the ``e2e/cluster`` script and the pytest fixture (tests/e2e/conftest.py) share
it without installing anything.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

E2E_DIR = Path(__file__).resolve().parent
REPO_DIR = E2E_DIR.parent
CRDS_DIR = REPO_DIR / "crds"
KWOK_STAGES = E2E_DIR / "kwok-stages.yaml"

TOOLS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
NODE_NAME = "kwok-node-0"
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.0.1.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Annotation that decides a pod's fate on the fake node (see kwok-stages.yaml).
OUTCOME_ANNOTATION = "e2e.clara-dicom.io/outcome"
EXIT_CODE_ANNOTATION = "e2e.clara-dicom.io/exit-code"


class ClusterError(RuntimeError):
    """The control plane could not be started or used."""


# --------------------------------------------------------------------------
# versions and binaries


def versions() -> dict[str, str]:
    """The pinned versions, from e2e/versions.env."""
    out: dict[str, str] = {}
    for line in (E2E_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def default_bin_dir() -> Path:
    """Where e2e/build.sh puts the binaries (same rule as build.sh)."""
    if os.environ.get("CLARA_DICOM_K8S_BIN"):
        return Path(os.environ["CLARA_DICOM_K8S_BIN"])
    root = os.environ.get("CLARA_DICOM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clara-dicom"
    )
    return Path(root) / f"k8s-{versions()['K8S_VERSION']}" / "bin"


def missing_tools(bin_dir: Path) -> list[str]:
    return [t for t in TOOLS if not os.access(bin_dir / t, os.X_OK)]


def ensure_binaries(bin_dir: Path | None = None, build: bool = True) -> Path:
    """Return the bin dir, running e2e/build.sh first if a binary is missing.

    build.sh is idempotent (seconds with a warm cache) but a cold build takes
    a long while; with build=False a missing binary is an error instead.
    """
    bin_dir = bin_dir or default_bin_dir()
    missing = missing_tools(bin_dir)
    if missing and build and not os.environ.get("CLARA_DICOM_K8S_BIN"):
        print(f"[k8s_cluster] missing {missing}: running e2e/build.sh", file=sys.stderr, flush=True)
        subprocess.run(["bash", str(E2E_DIR / "build.sh")], check=True, stdout=sys.stderr)
        missing = missing_tools(bin_dir)
    if missing:
        raise ClusterError(f"binaries missing from {bin_dir}: {', '.join(missing)} (run: bash e2e/build.sh)")
    return bin_dir


# --------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """A port free on 127.0.0.1 right now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
               alive: Callable[[], None] | None = None) -> Any:
    """Poll check() until it returns a truthy value; raise ClusterError on timeout.

    alive() is called between polls and should raise if a process we wait on
    has died, so a crash fails at once instead of at the timeout.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001 - remembered for the message
            last = exc
        if alive:
            alive()
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)
        interval = min(interval * 1.5, 2.0)


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {res.stderr.strip()}")


def _set_pdeathsig() -> None:  # runs in the child, between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except OSError:
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200 * lines))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<{exc}>"
    return "\n".join(data.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_runs(pid: int, exe_dir: str) -> bool:
    """Is pid still one of our binaries (guards against pid reuse)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return argv0.startswith(exe_dir)


# --------------------------------------------------------------------------
# the cluster


@dataclass
class Component:
    name: str
    pid: int
    log: str
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    argv: list[str] = field(default_factory=list, repr=False, compare=False)  # to start it again

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_alive(self.pid)


class Cluster:
    """A started (or given) cluster.

    Attributes: kubeconfig (Path), bin_dir (Path), workdir (Path), env (dict
    with KUBECONFIG and PATH), server (https URL), external (True when given a
    kubeconfig), kwok (True when kwok plays the node: pods follow
    kwok-stages.yaml), built (True when it runs e2e/build.sh's binaries, also
    when `e2e/cluster up` started it), version (K8S_VERSION of those binaries).
    """

    def __init__(self, *, kubeconfig: Path, bin_dir: Path | None, workdir: Path,
                 external: bool, components: list[Component] | None = None,
                 ports: dict[str, int] | None = None) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.workdir = Path(workdir)
        self.external = external
        self.kwok = not external
        self.built = not external  # runs e2e/build.sh's binaries (so: version K8S_VERSION)
        self.components = components or []
        self.ports = ports or {}
        self.version = versions()["K8S_VERSION"]
        path = os.environ.get("PATH", "/usr/bin:/bin")
        self.env = {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{path}" if self.bin_dir else path,
        }
        self._kubeconfig_json: dict | None = None
        self._ssl: dict[bool, ssl.SSLContext] = {}

    # ---- paths
    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    def tool(self, name: str) -> str:
        if self.bin_dir and (self.bin_dir / name).exists():
            return str(self.bin_dir / name)
        found = shutil.which(name)
        if not found:
            raise ClusterError(f"{name} not found (bin_dir={self.bin_dir})")
        return found

    # ---- kubectl
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; returns the CompletedProcess (text)."""
        cmd = [self.tool("kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        env = {**os.environ, **self.env}
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and res.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} exited {res.returncode}:\n{res.stderr.strip()}")
        return res

    def kubectl_json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)

    def apply(self, manifest: str | dict | Path, namespace: str | None = None) -> str:
        """kubectl apply a YAML/JSON string, a dict, or a file/folder path."""
        ns = ["-n", namespace] if namespace else []
        if isinstance(manifest, Path):
            return self.kubectl("apply", *ns, "-f", str(manifest)).stdout
        text = json.dumps(manifest) if isinstance(manifest, dict) else manifest
        return self.kubectl("apply", *ns, "-f", "-", input=text).stdout

    # ---- Python clients
    def kubeconfig_json(self) -> dict:
        """The kubeconfig, flattened to its current context, as a dict."""
        if self._kubeconfig_json is None:
            self._kubeconfig_json = json.loads(
                self.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
        return self._kubeconfig_json

    @property
    def server(self) -> str:
        return self.kubeconfig_json()["clusters"][0]["cluster"]["server"]

    def admin_client_config(self) -> dict[str, Any]:
        """What a Python client needs to talk to the cluster as admin.

        Keys: host, kubeconfig (path), and for the built cluster ca_file,
        cert_file, key_file (PEM paths; an external cluster gives None there:
        load its kubeconfig instead).
        """
        local = not self.external
        return {
            "host": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ca_file": str(self.pki_dir / "ca.crt") if local else None,
            "cert_file": str(self.pki_dir / "admin.crt") if local else None,
            "key_file": str(self.pki_dir / "admin.key") if local else None,
        }

    async def kubernetes_asyncio_configuration(self):
        """A kubernetes_asyncio.client.Configuration for the admin (imported lazily)."""
        from kubernetes_asyncio import client, config  # noqa: PLC0415

        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return cfg

    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        """TLS context trusting the cluster's CA (and presenting the admin cert)."""
        if client_cert not in self._ssl:
            self._ssl[client_cert] = self._make_ssl_context(client_cert)
        return self._ssl[client_cert]

    def _make_ssl_context(self, client_cert: bool) -> ssl.SSLContext:
        kc = self.kubeconfig_json()
        cluster = kc["clusters"][0]["cluster"]
        if cluster.get("insecure-skip-tls-verify"):
            ctx = ssl._create_unverified_context()  # noqa: S323 - the kubeconfig says so
        else:
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            ctx = ssl.create_default_context(cadata=ca)
        user = kc["users"][0]["user"]
        if client_cert and "client-certificate-data" in user:
            tmp = Path(tempfile.mkdtemp(prefix="k8s-tls-"))
            try:
                (tmp / "c.pem").write_bytes(base64.b64decode(user["client-certificate-data"]))
                (tmp / "k.pem").write_bytes(base64.b64decode(user["client-key-data"]))
                ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return ctx

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                timeout: float = 30) -> tuple[int, Any]:
        """One HTTPS request to the API server; returns (status, decoded JSON or text).

        With token, authenticates with that bearer token only (no client
        certificate); without, as the kubeconfig's admin user.
        """
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        else:
            user = self.kubeconfig_json()["users"][0]["user"]
            if user.get("token"):
                headers["Authorization"] = f"Bearer {user['token']}"
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        ctx = self.ssl_context(client_cert=token is None)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600,
                              audiences: Iterable[str] | None = None) -> str:
        """A token for a ServiceAccount, from the TokenRequest API."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        status, body = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        if status != 201:
            raise ClusterError(f"TokenRequest for {namespace}/{name} -> {status}: {body}")
        return body["status"]["token"]

    # ---- waits
    def wait_crds_established(self, names: Iterable[str], timeout: float = 60) -> None:
        names = list(names)
        if names:
            self.kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
                         *[f"crd/{n}" for n in names], timeout=timeout + 30)

    def apply_crds(self, crds_dir: Path = CRDS_DIR, timeout: float = 60) -> list[str]:
        """Apply every crds/*.yaml (if any) and wait until each CRD is Established."""
        files = sorted(p for p in Path(crds_dir).glob("*.y*ml") if p.is_file()) if Path(crds_dir).is_dir() else []
        names: list[str] = []
        for f in files:
            out = self.kubectl("apply", "-f", str(f), "-o", "name").stdout
            names += [line.split("/", 1)[1] for line in out.split()
                      if line.startswith("customresourcedefinition")]
        self.wait_crds_established(names, timeout)
        return names

    # ---- diagnostics and teardown
    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for c in self.components:
            state = "running" if c.alive() else "EXITED"
            parts.append(f"----- {c.name} (pid {c.pid}, {state}) {c.log} -----\n{_tail(Path(c.log), lines)}")
        return "\n".join(parts)

    def alive_check(self) -> None:
        for c in self.components:
            if not c.alive():
                code = c.popen.returncode if c.popen is not None else "?"
                raise ClusterError(f"{c.name} exited (code {code}); its log: {c.log}")

    def stop(self, timeout: float = 15) -> None:
        """Stop every component (whole process groups), newest first; keep the logs."""
        exe_dir = str(self.bin_dir) if self.bin_dir else "/"
        for c in reversed(self.components):
            if c.popen is None and not _pid_runs(c.pid, exe_dir):
                continue  # already gone (or the pid was reused by someone else)
            with _suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in reversed(self.components):
            while c.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            with _suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, signal.SIGKILL)  # the group: anything it forked too
            if c.popen is not None:
                with _suppress(subprocess.TimeoutExpired):
                    c.popen.wait(timeout=5)
        shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)
        state = self.workdir / "state.json"
        if state.exists():
            state.unlink()

    # ---- faults: a component away for a while (tests/e2e/test_faults.py, bench/operator_scale.py)
    def stop_component(self, name: str, timeout: float = 30) -> None:
        """Stop one component (SIGTERM to its process group; SIGKILL after ``timeout``); the
        others keep running. start_component() brings it back."""
        comp = self._component(name)
        with _suppress(ProcessLookupError, PermissionError):
            os.killpg(comp.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while comp.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        with _suppress(ProcessLookupError, PermissionError):
            os.killpg(comp.pid, signal.SIGKILL)
        if comp.popen is not None:
            comp.popen.wait(timeout=10)

    def start_component(self, name: str, extra_args: Iterable[str] = (), timeout: float = 120) -> None:
        """Start a stopped component again with the same arguments (plus ``extra_args``, which
        override same-named flags); return once it answers (/readyz or /healthz)."""
        old = self._component(name)
        if old.alive():
            return
        if not old.argv:
            raise ClusterError(f"{name} was not started by this process: its arguments are unknown")
        extra = list(extra_args)
        given = {a.split("=", 1)[0] for a in extra}
        argv = [a for a in old.argv if a.split("=", 1)[0] not in given] + extra
        new = _spawn(name, argv, self.workdir, detach=old.popen is None)
        self.components[self.components.index(old)] = new
        if name == "kube-apiserver":
            ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
            ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
            url = f"{self.server}/readyz"
        elif name in ("kube-controller-manager", "kube-scheduler"):
            ctx = ssl._create_unverified_context()  # noqa: S323 - their self-signed serving certs
            port = self.ports["controller_manager" if name == "kube-controller-manager" else "scheduler"]
            url = f"https://127.0.0.1:{port}/healthz"
        else:
            return
        wait_until(lambda: _http_ok(url, ctx), timeout, f"{name} answering after its restart", alive=self.alive_check)

    def stop_apiserver(self, timeout: float = 30) -> None:
        self.stop_component("kube-apiserver", timeout)

    def start_apiserver(self, timeout: float = 120) -> None:
        self.start_component("kube-apiserver", timeout=timeout)
        self.wait_controllers_caught_up(timeout)

    def wait_controllers_caught_up(self, timeout: float = 120) -> None:
        """After an API server restart, return once the controller-manager acts on new
        objects again: its watches fail while RBAC warms up and client-go then backs off
        (up to 30 s, jittered to 60), so a namespace made meanwhile gets its "default"
        ServiceAccount late and the next test's pods cannot be created."""
        probe = f"probe-{secrets.token_hex(4)}"
        self.kubectl("create", "namespace", probe)
        try:
            wait_until(lambda: self.kubectl("get", "serviceaccount", "default", "-n", probe,
                                            check=False).returncode == 0,
                       timeout, "the controller-manager to make ServiceAccount default in a new namespace "
                       "after the API server restart", alive=self.alive_check)
        finally:
            self.kubectl("delete", "namespace", probe, "--wait=false", check=False)

    def _component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise ClusterError(f"no component {name} (a given cluster cannot be stopped)")

    # ---- state (for `e2e/cluster up` then `down` from another process)
    def save_state(self) -> None:
        (self.workdir / "state.json").write_text(json.dumps({
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "ports": self.ports,
            "components": [{"name": c.name, "pid": c.pid, "log": c.log} for c in self.components],
        }, indent=2))

    @classmethod
    def from_state(cls, workdir: Path) -> "Cluster | None":
        path = Path(workdir) / "state.json"
        if not path.exists():
            return None
        st = json.loads(path.read_text())
        return cls(kubeconfig=Path(st["kubeconfig"]), bin_dir=Path(st["bin_dir"]), workdir=Path(workdir),
                   external=False, ports=st.get("ports", {}),
                   components=[Component(**c) for c in st["components"]])


class _suppress:
    def __init__(self, *exc: type[BaseException]) -> None:
        self.exc = exc

    def __enter__(self) -> None:
        return None

    def __exit__(self, et, ev, tb) -> bool:
        return et is not None and issubclass(et, self.exc)


# --------------------------------------------------------------------------
# starting one


def _make_ca(pki: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)


def _make_leaf(pki: Path, name: str, ca: str, subject: str, eku: str, sans: str | None = None) -> None:
    ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={eku}"]
    if sans:
        ext.append(f"subjectAltName={sans}")
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", str(secrets.randbits(63)), "-days", "3650", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=pki)


def _make_pki(pki: Path) -> None:
    """A throw-away CA and the certificates the components need, plus the SA key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _make_ca(pki, "ca", "clara-dicom-e2e-ca")
    sans = ",".join([
        "IP:127.0.0.1", "IP:10.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local",
    ])
    _make_leaf(pki, "apiserver", "ca", "/CN=kube-apiserver", "serverAuth", sans)
    for name, subject in {
        "admin": "/O=system:masters/CN=clara-dicom-e2e-admin",
        "controller-manager": "/CN=system:kube-controller-manager",
        "scheduler": "/CN=system:kube-scheduler",
        "kwok": "/O=system:masters/CN=kwok-controller",
        # The API server's client certificate towards kubelets (logs, exec) of a real node (real_node.py).
        "kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
    }.items():
        _make_leaf(pki, name, "ca", subject, "clientAuth")
    # The aggregation layer's front proxy (request-header authentication): the
    # controllers' delegated authentication reads this CA from the
    # extension-apiserver-authentication ConfigMap.
    _make_ca(pki, "front-proxy-ca", "clara-dicom-e2e-front-proxy-ca")
    _make_leaf(pki, "front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client", "clientAuth")
    # Service-account token signing key pair.
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    # JSON is YAML: kubectl, client-go, kubernetes(-asyncio) and kopf all read it.
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "clara-e2e", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(f"{user}.crt"),
                                           "client-key-data": b64(f"{user}.key")}}],
        "contexts": [{"name": "clara-e2e", "context": {"cluster": "clara-e2e", "user": user}}],
        "current-context": "clara-e2e",
    }, indent=2))
    path.chmod(0o600)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, expect: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=3) as resp:
            body = resp.read()
            return resp.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _spawn(name: str, argv: list[str], workdir: Path, detach: bool) -> Component:
    log_path = workdir / "logs" / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY",
                                                            "http_proxy", "https_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
        start_new_session=True,                       # own process group: killpg tears it all down
        preexec_fn=None if detach else _set_pdeathsig,  # die with pytest even on SIGKILL
    )
    log.close()
    return Component(name=name, pid=popen.pid, log=str(log_path), popen=popen, argv=list(argv))


def start(workdir: Path | str | None = None, *, bin_dir: Path | None = None, crds_dir: Path | None = CRDS_DIR,
          detach: bool = False, build: bool = True, timeout: float = 180) -> Cluster:
    """Start a whole control plane; on failure stop what started and raise ClusterError (with log tails).

    detach=True (for `e2e/cluster up`) lets the processes outlive this Python
    process; otherwise they get SIGKILL if it dies without tearing down.
    """
    bin_dir = ensure_binaries(bin_dir, build=build)
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="clara-dicom-k8s-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    pki = workdir / "pki"
    _make_pki(pki)
    _make_kwok_config(workdir)

    for attempt in range(3):  # a port taken between free_port() and bind(): try new ports
        ports = {k: free_port() for k in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler")}
        server = f"https://127.0.0.1:{ports['apiserver']}"
        for user in ("admin", "controller-manager", "scheduler", "kwok"):
            _write_kubeconfig(workdir / f"{user}.kubeconfig", server, pki, user)
        cluster = Cluster(kubeconfig=workdir / "admin.kubeconfig", bin_dir=bin_dir, workdir=workdir,
                          external=False, ports=ports)
        try:
            _start_components(cluster, detach, timeout)
            break
        except ClusterError as exc:
            tails = cluster.log_tails(60)
            cluster.stop()
            if attempt < 2 and "address already in use" in tails:
                shutil.rmtree(workdir / "etcd-data", ignore_errors=True)
                continue
            raise ClusterError(f"{exc}\n\ncomponent logs (all in {workdir / 'logs'}):\n{tails}") from None
    try:
        if crds_dir is not None:
            cluster.apply_crds(crds_dir)
    except ClusterError as exc:
        tails = cluster.log_tails(60)
        cluster.stop()
        raise ClusterError(f"{exc}\n\ncomponent logs:\n{tails}") from None
    cluster.save_state()
    return cluster


def _make_kwok_config(workdir: Path) -> None:
    shutil.copyfile(KWOK_STAGES, workdir / "kwok.yaml")


def _start_components(c: Cluster, detach: bool, timeout: float) -> None:
    w, p, b, pki = c.workdir, c.ports, c.bin_dir, c.pki_dir
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    peer_url = f"http://127.0.0.1:{p['etcd_peer']}"
    c.components.append(_spawn("etcd", [
        str(b / "etcd"), "--name=e2e", f"--data-dir={w / 'etcd-data'}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=e2e={peer_url}", "--initial-cluster-state=new",
        "--unsafe-no-fsync", "--quota-backend-bytes=2147483648", "--log-level=warn",
    ], w, detach))
    wait_until(lambda: _http_ok(f"{etcd_url}/health", expect=b'"health":"true"'), 60, "etcd /health",
               alive=c.alive_check)

    c.components.append(_spawn("kube-apiserver", [
        str(b / "kube-apiserver"),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", f"--secure-port={p['apiserver']}", "--advertise-address=127.0.0.1",
        f"--cert-dir={w / 'apiserver-certs'}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--authorization-mode=Node,RBAC",
        f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'kubelet-client.key'}",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--endpoint-reconciler-type=none",  # a loopback address is no valid Endpoints address
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ], w, detach))
    admin_ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    admin_ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    wait_until(lambda: _http_ok(f"{c.server}/readyz", admin_ctx), timeout, "kube-apiserver /readyz",
               alive=c.alive_check)

    insecure = ssl._create_unverified_context()  # noqa: S323 - their self-signed serving certs
    kcm_kc = str(w / "controller-manager.kubeconfig")
    c.components.append(_spawn("kube-controller-manager", [
        str(b / "kube-controller-manager"),
        f"--kubeconfig={kcm_kc}", f"--authentication-kubeconfig={kcm_kc}", f"--authorization-kubeconfig={kcm_kc}",
        "--bind-address=127.0.0.1", f"--secure-port={p['controller_manager']}",
        f"--cert-dir={w / 'controller-manager-certs'}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--v=1",
    ], w, detach))
    sched_kc = str(w / "scheduler.kubeconfig")
    c.components.append(_spawn("kube-scheduler", [
        str(b / "kube-scheduler"),
        f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}",
        f"--authorization-kubeconfig={sched_kc}",
        "--bind-address=127.0.0.1", f"--secure-port={p['scheduler']}",
        f"--cert-dir={w / 'scheduler-certs'}",
        "--leader-elect=false",
        "--v=1",
    ], w, detach))
    c.components.append(_spawn("kwok", [
        str(b / "kwok"),
        f"--kubeconfig={w / 'kwok.kubeconfig'}",
        f"--config={w / 'kwok.yaml'}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--node-ip=127.0.0.1",
        f"--cidr={POD_CIDR}",
        "--node-lease-duration-seconds=40",
    ], w, detach))
    wait_until(lambda: _http_ok(f"https://127.0.0.1:{p['controller_manager']}/healthz", insecure),
               timeout, "kube-controller-manager /healthz", alive=c.alive_check)
    wait_until(lambda: _http_ok(f"https://127.0.0.1:{p['scheduler']}/healthz", insecure),
               timeout, "kube-scheduler /healthz", alive=c.alive_check)

    c.apply({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "node-role.kubernetes.io/agent": ""},
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
        },
    })

    def node_ready() -> bool:
        node = c.kubectl_json("get", "node", NODE_NAME)
        return any(x["type"] == "Ready" and x["status"] == "True" for x in node["status"].get("conditions", []))

    wait_until(node_ready, timeout, f"Node {NODE_NAME} Ready (kwok)", alive=c.alive_check)
    # The controllers really run: the ServiceAccount controller makes "default",
    # which every pod needs before it can be created.
    wait_until(lambda: c.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
               timeout, "ServiceAccount default/default (kube-controller-manager)", alive=c.alive_check)


# --------------------------------------------------------------------------
# given or started


def given_kubeconfig() -> Path | None:
    """The kubeconfig of an existing cluster to use instead of starting one, if any."""
    for var in ("CLARA_DICOM_E2E_KUBECONFIG", "KUBECONFIG"):
        value = os.environ.get(var)
        if value:
            first = value.split(os.pathsep)[0]
            if Path(first).is_file():
                return Path(first)
            raise ClusterError(f"{var}={value} names no file")
    return None


def connect(kubeconfig: Path, crds_dir: Path | None = CRDS_DIR) -> Cluster:
    """Use an existing cluster (start nothing); applies crds/ like start()."""
    bin_dir = default_bin_dir()
    cluster = Cluster(kubeconfig=kubeconfig, bin_dir=bin_dir if bin_dir.is_dir() else None,
                      workdir=Path(kubeconfig).resolve().parent, external=True)
    # A cluster that `e2e/cluster up` started has kwok and our state file.
    state_dir = Path(kubeconfig).resolve().parent
    own = Cluster.from_state(state_dir)
    if own is not None and Path(own.kubeconfig).resolve() == Path(kubeconfig).resolve():
        cluster.kwok = cluster.built = True
        cluster.workdir = state_dir
        cluster.components = own.components
    cluster.kubectl("version", timeout=30)
    if crds_dir is not None:
        cluster.apply_crds(crds_dir)
    return cluster
