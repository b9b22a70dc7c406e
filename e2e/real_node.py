"""A real node for the e2e control plane: containerd + runc + a kubelet.

``RealNode(cluster).start()`` joins a kubelet (built by e2e/build.sh from the
same Kubernetes module as the control plane) to a cluster that
``k8s_cluster.start()`` started, as node ``localhost``.  Pods scheduled there
really run: Debian's containerd 1.6 and runc, a bridge network from Debian's
CNI plugins, images imported from OCI archives (nothing is ever pulled).

The node is **tainted** (``clara-dicom.io/real-node:NoSchedule``) so only pods
that ask for it land there; kwok's fake node keeps playing every other pod.
``TOLERATION`` and ``NODE_SELECTOR`` are what a pod needs to run for real.

Everything the node makes is named from one id (a hash of its directory) or
lives under that directory, so ``cleanup(node_dir)`` can find and remove it
even after a crash, without the processes' help:

* processes: containerd and the kubelet (pids in ``state.json``), every
  ``containerd-shim-runc-v2`` whose ``-address`` is our socket, every process
  in our cgroups;
* mounts under the node directory (container root file systems, netns files, volumes,
  the kubelet's root-dir bind mount);
* the cgroup tree ``/clara-e2e-<id>`` in every hierarchy (``cgroupRoot``);
* the bridge ``cde<id>`` and its veths; libcni's cache entries for our network
  name; the kubelet's ``/var/log/containers`` links into our directory;
* the shims' sockets in ``/run/containerd/s``;
* the kernel tunables the kubelet sets (vm.overcommit_memory, kernel.panic,
  ...), restored to their values from before the start.

``leftovers(node_dir)`` lists whatever of that still exists (``e2e/cluster
down`` prints it; the tests assert it is empty).

Network: the bridge's host side gets ``host_ip`` (x.x.x.1 of the node's /24)
so that pods can reach a server the test binds there, and the host reaches
pods at their pod IPs.  There is no kube-proxy and no DNS: a Service's
ClusterIP does not work from a pod, and the API server, on 127.0.0.1, is
reachable only from a ``hostNetwork`` pod (with KUBERNETES_SERVICE_HOST/PORT
pointed at it).

Standard library only, like k8s_cluster.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import k8s_cluster as kc  # noqa: E402
import oci_image  # noqa: E402

NODE_NAME = "localhost"
TAINT_KEY = "clara-dicom.io/real-node"
NODE_LABEL = "clara-dicom.io/real-node"
TOLERATION = {"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
NODE_SELECTOR = {"kubernetes.io/hostname": NODE_NAME}

CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
CNI_CACHE = Path("/var/lib/cni")
SHIM_SOCKET_DIR = Path("/run/containerd/s")
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # hard-coded in the kubelet
CGROUP_FS = Path("/sys/fs/cgroup")
# The kubelet sets these (protectKernelDefaults: false); we put them back.
KERNEL_TUNABLES = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
SYSTEM_TOOLS = {"containerd": "containerd", "ctr": "containerd", "runc": "runc",
                "containerd-shim-runc-v2": "containerd", "busybox": "busybox-static"}
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; containerd appends ".ttrpc"

MNT_DETACH = 2


def snapshotter() -> str:
    """overlayfs where the kernel has it (each container a mount, not a copy of its image: about
    half the time to import an image and start a container here); else native (copies)."""
    try:
        return "overlayfs" if "\toverlay\n" in Path("/proc/filesystems").read_text() else "native"
    except OSError:
        return "native"


class RealNodeUnavailable(kc.ClusterError):
    """This machine cannot run a real node (the reason says why); kwok alone still works."""


# --------------------------------------------------------------------------
# names derived from the node directory


def node_id(node_dir: Path) -> str:
    return hashlib.sha256(str(Path(node_dir).resolve()).encode()).hexdigest()[:8]


class Layout:
    """Every path and name of one node, derived from its directory."""

    def __init__(self, node_dir: Path) -> None:
        self.dir = Path(node_dir).resolve()
        self.id = node_id(self.dir)
        self.state_file = self.dir / "state.json"
        self.logs = self.dir / "logs"
        self.containerd_root = self.dir / "containerd" / "root"
        self.containerd_state = self.dir / "containerd" / "state"
        self.containerd_config = self.dir / "containerd.toml"
        self.socket = self.dir / "containerd.sock"
        self.runc_root = self.dir / "runc"
        self.cni_conf = self.dir / "cni"
        self.cni_ipam = self.dir / "cni-ipam"
        self.kubelet_root = self.dir / "kubelet"
        self.kubelet_config = self.dir / "kubelet.yaml"
        self.kubeconfig = self.dir / "kubelet.kubeconfig"
        self.pod_logs = self.dir / "pod-logs"
        self.images = self.dir / "images"
        self.cgroup_root = f"clara-e2e-{self.id}"
        self.bridge = f"cde{self.id}"      # 11 characters; link names stop at 15
        self.network = f"clara-e2e-{self.id}"


# --------------------------------------------------------------------------
# can this machine run one?


def unavailable_reason() -> str | None:
    """Why a real node cannot start here, or None."""
    if os.geteuid() != 0:
        return "a real node needs root (containerd, runc, mounts, cgroups)"
    missing = sorted({pkg for tool, pkg in SYSTEM_TOOLS.items() if not shutil.which(tool)})
    missing += sorted({"containernetworking-plugins" for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()})
    if missing:
        return f"Debian packages missing: {' '.join(missing)} (bash .ci/install-system.sh)"
    if not oci_image.is_static(oci_image.BUSYBOX):
        return f"{oci_image.BUSYBOX} is not statically linked (apt-get install busybox-static)"
    if not (CGROUP_FS / "memory").is_dir() and not (CGROUP_FS / "cgroup.controllers").exists():
        return f"no usable cgroup file system at {CGROUP_FS}"
    if not os.access(CGROUP_FS, os.W_OK) and not os.access(CGROUP_FS / "memory", os.W_OK):
        return f"{CGROUP_FS} is not writable"
    return None


def kubelet_binary(bin_dir: Path, build: bool = True) -> Path:
    """The kubelet e2e/build.sh builds; runs build.sh first if it is missing."""
    kubelet = Path(bin_dir) / "kubelet"
    if not os.access(kubelet, os.X_OK) and build and not os.environ.get("CLARA_DICOM_K8S_BIN"):
        print("[real_node] kubelet missing: running e2e/build.sh", file=sys.stderr, flush=True)
        subprocess.run(["bash", str(kc.E2E_DIR / "build.sh")], check=True, stdout=sys.stderr)
    if not os.access(kubelet, os.X_OK):
        raise RealNodeUnavailable(f"{kubelet} missing (run: bash e2e/build.sh)")
    return kubelet


# --------------------------------------------------------------------------
# the node


class RealNode:
    """containerd + kubelet as node ``localhost`` of ``cluster``.

    Attributes after start(): ``host_ip`` (the bridge's host address, which
    pods reach), ``subnet``, ``ready_seconds`` (kubelet start -> Node Ready),
    ``components`` (kc.Component list), ``layout``.
    """

    def __init__(self, cluster: kc.Cluster, node_dir: Path | None = None, name: str = NODE_NAME) -> None:
        self.cluster = cluster
        self.name = name  # another name than localhost: `kubectl logs` cannot reach that kubelet
        self.layout = Layout(node_dir or Path(cluster.workdir) / "node")
        self.components: list[kc.Component] = []
        self.subnet = ""
        self.host_ip = ""
        self.ready_seconds: float | None = None

    # ---- public
    def start(self, images: Iterable[Path] = (), *, detach: bool = False, timeout: float = 120) -> "RealNode":
        """Start containerd and the kubelet, import images, wait until the Node is Ready.

        On failure everything started is stopped and cleaned up, and
        RealNodeUnavailable (with the logs' tails) is raised.
        """
        reason = unavailable_reason()
        if reason:
            raise RealNodeUnavailable(reason)
        if self.cluster.bin_dir is None or self.cluster.external:
            raise RealNodeUnavailable("a real node joins only a control plane that e2e/ started")
        L = self.layout
        if len(str(L.socket)) > SOCKET_PATH_MAX:
            raise RealNodeUnavailable(f"node directory path too long for a unix socket: {L.dir}")
        kubelet = kubelet_binary(self.cluster.bin_dir)
        cleanup(L.dir)  # whatever a crashed run left in the same directory
        for d in (L.logs, L.containerd_root, L.containerd_state, L.runc_root, L.cni_conf, L.cni_ipam,
                  L.kubelet_root, L.pod_logs, L.images):
            d.mkdir(parents=True, exist_ok=True)
        self.subnet = _free_subnet(L.id)
        self.host_ip = self.subnet.rsplit(".", 1)[0] + ".1"
        state: dict[str, Any] = {
            "id": L.id, "name": self.name, "subnet": self.subnet, "host_ip": self.host_ip, "components": [],
            "tunables": _read_tunables(),
            "created_dirs": [str(d) for d in (CNI_CACHE, CONTAINER_LOG_LINKS, SHIM_SOCKET_DIR.parent)
                             if not d.exists()],
        }
        self._write_state(state)  # before anything starts: a crash from here on can be cleaned up
        try:
            self._start(kubelet, list(images), detach, timeout, state)
        except BaseException as exc:
            tails = self.log_tails(40)
            self.stop(delete_pods=False)
            if isinstance(exc, kc.ClusterError):
                raise RealNodeUnavailable(f"the real node did not start: {exc}\n\nnode logs:\n{tails}") from None
            raise
        return self

    def stop(self, *, delete_pods: bool = True, timeout: float = 60) -> list[str]:
        """Delete the node's pods through the API (so the kubelet tears them down),
        stop kubelet and containerd by pid, clean up; returns the leftovers (empty)."""
        if delete_pods and any(c.name == "kubelet" and c.alive() for c in self.components):
            try:
                self.drain(timeout)
            except kc.ClusterError as exc:
                print(f"[real_node] drain: {exc}; cleaning up by force", file=sys.stderr, flush=True)
        for name in ("kubelet", "containerd"):
            for c in self.components:
                if c.name == name:
                    _terminate(c, 15)
        left = cleanup(self.layout.dir)
        self.components = []
        if delete_pods:
            self.cluster.kubectl("delete", "node", self.name, "--ignore-not-found", "--wait=false",
                                 check=False, timeout=30)
        return left

    def drain(self, timeout: float = 60) -> None:
        """Cordon the node, delete its pods, wait until the kubelet has removed them and no task runs."""
        k = self.cluster.kubectl
        k("cordon", self.name, check=False, timeout=30)  # a Job's replacement pods stay Pending
        selector = f"spec.nodeName={self.name}"
        k("delete", "pods", "--all-namespaces", "--field-selector", selector, "--grace-period=2",
          "--wait=false", check=False, timeout=30)
        try:
            kc.wait_until(lambda: not self.cluster.kubectl_json(
                "get", "pods", "--all-namespaces", "--field-selector", selector)["items"],
                timeout, "the real node's pods deleted by the kubelet", alive=self.alive_check)
        finally:
            kc.wait_until(lambda: not self.ctr("tasks", "ls", "-q", check=False).stdout.strip(),
                          30, "containerd tasks stopped")

    def import_images(self, *archives: Path) -> None:
        """Import OCI/docker archives into the node's image store (nothing is pulled)."""
        for archive in archives:
            res = self.ctr("images", "import", "--snapshotter", snapshotter(),
                           str(archive), check=False, timeout=600)
            if res.returncode != 0:
                raise kc.ClusterError(f"ctr images import {archive} failed: {res.stderr.strip()}")

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(["ctr", "--address", str(self.layout.socket), "--namespace", "k8s.io", *args],
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise kc.ClusterError(f"ctr {' '.join(args)}: {res.stderr.strip()}")
        return res

    def alive_check(self) -> None:
        for c in self.components:
            if not c.alive():
                raise kc.ClusterError(f"{c.name} exited; its log: {c.log}")

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(f"----- {c.name} (pid {c.pid}, {'running' if c.alive() else 'EXITED'}) {c.log} -----\n"
                         f"{kc._tail(Path(c.log), lines)}" for c in self.components)

    def leftovers(self) -> list[str]:
        return leftovers(self.layout.dir)

    @classmethod
    def from_state(cls, cluster: kc.Cluster, node_dir: Path | None = None) -> "RealNode | None":
        node = cls(cluster, node_dir)
        try:
            st = json.loads(node.layout.state_file.read_text())
        except (OSError, ValueError):
            return None
        node.subnet, node.host_ip = st.get("subnet", ""), st.get("host_ip", "")
        node.name = st.get("name", NODE_NAME)
        node.components = [kc.Component(**c) for c in st.get("components", [])]
        return node

    # ---- starting
    def _start(self, kubelet: Path, images: list[Path], detach: bool, timeout: float, state: dict) -> None:
        L = self.layout
        _make_cgroup_root(L.cgroup_root)
        _make_bridge(L.bridge, self.host_ip)
        self._write_cni_config()
        L.containerd_config.write_text(self._containerd_config())
        self.components.append(_spawn("containerd", ["containerd", "--config", str(L.containerd_config)],
                                      L, detach))
        self._save_components(state)
        kc.wait_until(lambda: self.ctr("version", check=False).returncode == 0, 60, "containerd answering",
                      alive=self.alive_check)
        archive = oci_image.busybox_archive(L.images / "busybox.oci.tar")
        self.import_images(archive, *images)

        pki = self.cluster.pki_dir
        if not (pki / f"node-{self.name}.crt").exists():
            kc._make_leaf(pki, f"node-{self.name}", "ca", f"/O=system:nodes/CN=system:node:{self.name}", "clientAuth")
        kc._write_kubeconfig(L.kubeconfig, self.cluster.server, pki, f"node-{self.name}")
        port, healthz = kc.free_port(), kc.free_port()
        L.kubelet_config.write_text(json.dumps(self._kubelet_config(port, healthz), indent=1))
        shutil.copyfile("/etc/resolv.conf", L.dir / "resolv.conf")
        started = time.monotonic()
        self.components.append(_spawn("kubelet", [
            str(kubelet), f"--config={L.kubelet_config}", f"--kubeconfig={L.kubeconfig}",
            f"--root-dir={L.kubelet_root}", f"--hostname-override={self.name}",
            f"--node-labels={NODE_LABEL}=true", "--v=1",
        ], L, detach))
        self._save_components(state)

        def ready() -> bool:
            res = self.cluster.kubectl("get", "node", self.name, "-o", "json", check=False, timeout=20)
            if res.returncode != 0:
                return False
            conds = json.loads(res.stdout)["status"].get("conditions", [])
            return any(x["type"] == "Ready" and x["status"] == "True" for x in conds)

        kc.wait_until(ready, timeout, f"Node {self.name} Ready (kubelet)", alive=self.alive_check)
        self.ready_seconds = time.monotonic() - started

    def _save_components(self, state: dict) -> None:
        state["components"] = [{"name": c.name, "pid": c.pid, "log": c.log} for c in self.components]
        self._write_state(state)

    def _write_state(self, state: dict) -> None:
        self.layout.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.layout.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.layout.state_file)

    def _write_cni_config(self) -> None:
        L = self.layout
        (L.cni_conf / "10-clara-e2e.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": L.network,
            "plugins": [{
                "type": "bridge", "bridge": L.bridge,
                # The host side already has host_ip (made by _make_bridge): no gateway
                # and no masquerading, so the plugin changes no host setting.
                "isGateway": False, "ipMasq": False, "hairpinMode": False,
                "ipam": {"type": "host-local", "dataDir": str(L.cni_ipam),
                         "ranges": [[{"subnet": self.subnet,
                                      "rangeStart": self.subnet.rsplit(".", 1)[0] + ".2",
                                      "rangeEnd": self.subnet.rsplit(".", 1)[0] + ".254"}]]},
            }],
        }, indent=1))

    def _containerd_config(self) -> str:
        L = self.layout
        q = json.dumps  # TOML basic strings are JSON strings
        return f"""version = 2
root = {q(str(L.containerd_root))}
state = {q(str(L.containerd_state))}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {q(str(L.socket))}
[ttrpc]
  address = {q(str(L.socket) + ".ttrpc")}
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {q(str(L.dir / "containerd" / "opt"))}

[plugins."io.containerd.grpc.v1.cri"]
  # Never pulled: built by oci_image.py and imported at start.
  sandbox_image = {q(oci_image.PAUSE_IMAGE)}
  # Without CAP_SYS_RESOURCE the sandbox's oom_score_adj of -998 is refused and runc fails.
  restrict_oom_score_adj = true
  # Network namespaces as files under our state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = {q(snapshotter())}
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {q(str(L.runc_root))}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {q(str(CNI_BIN_DIR))}
    conf_dir = {q(str(L.cni_conf))}
    max_conf_num = 1
"""

    def _kubelet_config(self, port: int, healthz_port: int) -> dict:
        L = self.layout
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.cluster.pki_dir / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{L.socket}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{L.cgroup_root}", "cgroupsPerQOS": True,
            "failCgroupV1": False, "failSwapOn": False,
            "enforceNodeAllocatable": [], "localStorageCapacityIsolation": False,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                             "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "makeIPTablesUtilChains": False, "oomScoreAdj": 0,
            "resolvConf": str(L.dir / "resolv.conf"), "podLogsDir": str(L.pod_logs),
            "volumePluginDir": str(L.dir / "volume-plugins"),
            "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
            "maxPods": 30, "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s",
        }


# --------------------------------------------------------------------------
# processes


def _spawn(name: str, argv: list[str], L: Layout, detach: bool) -> kc.Component:
    log_path = L.logs / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("kubeconfig", "http_proxy", "https_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=L.dir,
                             env=env, start_new_session=True,
                             preexec_fn=None if detach else kc._set_pdeathsig)
    log.close()
    return kc.Component(name=name, pid=popen.pid, log=str(log_path), popen=popen)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_ours(pid: int, name: str, L: Layout) -> bool:
    """pid still runs `name` with our config or socket (guards against pid reuse)."""
    argv = _cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) == name and any(str(L.dir) in a for a in argv)


def _terminate(c: kc.Component, timeout: float) -> None:
    if c.popen is None and not _is_ours(c.pid, os.path.basename(c.name), Layout(Path(c.log).parent.parent)):
        return
    with kc._suppress(ProcessLookupError, PermissionError):
        os.killpg(c.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while c.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    with kc._suppress(ProcessLookupError, PermissionError):
        os.killpg(c.pid, signal.SIGKILL)
    if c.popen is not None:
        with kc._suppress(subprocess.TimeoutExpired):
            c.popen.wait(timeout=5)


def _our_processes(L: Layout, state: dict) -> dict[int, str]:
    """pid -> what, for every process of this node still running."""
    found: dict[int, str] = {}
    for c in state.get("components", []):
        if kc._pid_alive(c["pid"]) and _is_ours(c["pid"], c["name"], L):
            found[c["pid"]] = c["name"]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = _cmdline(int(entry))
            if argv and os.path.basename(argv[0]).startswith("containerd-shim") and str(L.socket) in argv:
                found[int(entry)] = "containerd-shim"
    for cg in _cgroup_dirs(L):
        try:
            pids = (cg / "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            found.setdefault(int(pid), f"process in cgroup {cg}")
    return found


def _shim_sockets(pids: Iterable[int]) -> set[Path]:
    """The /run/containerd/s sockets those processes listen on (a shim removes its own only on a clean exit)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with kc._suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    paths: set[Path] = set()
    with kc._suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith(str(SHIM_SOCKET_DIR) + "/"):
                paths.add(Path(fields[7]))
    return paths


# --------------------------------------------------------------------------
# host resources: cgroups, bridge, mounts, tunables


def _cgroup_hierarchies() -> list[Path]:
    """Each mounted cgroup hierarchy (v1 controllers and the v2 one)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(left.split()[4]))
    return out


def _cgroup_dirs(L: Layout) -> list[Path]:
    """Our cgroups, deepest first."""
    dirs: list[Path] = []
    for h in _cgroup_hierarchies():
        top = h / L.cgroup_root
        if top.is_dir():
            dirs += [Path(root) for root, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _make_cgroup_root(name: str) -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy it uses."""
    for h in _cgroup_hierarchies():
        d = h / name
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: an empty set admits no task
            if (h / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise kc.ClusterError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _free_subnet(ident: str) -> str:
    """A 10.213.N.0/24 that overlaps no address or route on this machine (N from the id, then onwards).

    Not 10.88/16: podman's default network."""
    used = []
    for line in (_ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr").stdout).splitlines():
        for word in line.split():
            with kc._suppress(ValueError):
                if word[0].isdigit() and ("/" in word or word.count(".") == 3):
                    used.append(ipaddress.ip_network(word, strict=False))
    first = int(ident, 16) % 200 + 20
    for n in [*range(first, 250), *range(20, first)]:
        net = ipaddress.ip_network(f"10.213.{n}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return str(net)
    raise kc.ClusterError("no free 10.213.N.0/24 subnet for the real node's bridge")


def _make_bridge(name: str, host_ip: str) -> None:
    _ip("link", "add", name, "type", "bridge")
    _ip("addr", "add", f"{host_ip}/24", "dev", name)
    _ip("link", "set", name, "up")


def _links_of(bridge: str) -> list[str]:
    res = _ip("-o", "link", "show", "master", bridge, check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines() if ":" in line]


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root)
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            out.append(point)
    return sorted(set(out), key=lambda p: p.count("/"), reverse=True)


def _umount(point: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.umount2(point.encode(), MNT_DETACH)


def _read_tunables() -> dict[str, str]:
    out = {}
    for t in KERNEL_TUNABLES:
        with kc._suppress(OSError):
            out[t] = Path("/proc/sys", t).read_text().strip()
    return out


def _changed_tunables(saved: dict[str, str]) -> dict[str, tuple[str, str]]:
    now = _read_tunables()
    return {t: (v, now.get(t, "")) for t, v in saved.items() if now.get(t) != v}


# --------------------------------------------------------------------------
# clean-up and the leftovers check


def _load_state(L: Layout) -> dict:
    try:
        return json.loads(L.state_file.read_text())
    except (OSError, ValueError):
        return {}


def leftovers(node_dir: Path) -> list[str]:
    """What of the node still exists on this machine (empty after cleanup())."""
    L = Layout(node_dir)
    state = _load_state(L)
    found = [f"process {pid} ({what})" for pid, what in sorted(_our_processes(L, state).items())]
    found += [f"mount {m}" for m in _mounts_under(L.dir)]
    found += [f"cgroup {d}" for d in _cgroup_dirs(L)]
    if _ip("link", "show", L.bridge, check=False).returncode == 0:
        found.append(f"link {L.bridge} (with {', '.join(_links_of(L.bridge)) or 'no ports'})")
    results = CNI_CACHE / "results"
    if results.is_dir():
        found += [f"cni cache {p}" for p in sorted(results.glob(f"{L.network}-*"))]
    if CONTAINER_LOG_LINKS.is_dir():
        found += [f"log link {p}" for p in sorted(CONTAINER_LOG_LINKS.iterdir())
                  if p.is_symlink() and os.readlink(p).startswith(str(L.dir) + "/")]
    found += [f"socket {p}" for p in sorted(state.get("shim_sockets", [])) if os.path.lexists(p)]
    found += [f"kernel tunable {t}: {now} (was {was})"
              for t, (was, now) in _changed_tunables(state.get("tunables", {})).items()]
    found += [f"directory {d}" for d in state.get("created_dirs", []) if os.path.isdir(d)]
    return found


def cleanup(node_dir: Path) -> list[str]:
    """Remove every trace of the node (idempotent, works after a crash); returns the leftovers (empty)."""
    L = Layout(node_dir)
    if not L.dir.exists():
        return []
    state = _load_state(L)
    for _ in range(5):  # containers and shims may fork or restart while we kill them
        procs = _our_processes(L, state)
        if not procs:
            break
        sockets = _shim_sockets(p for p, what in procs.items() if what == "containerd-shim")
        if sockets:
            state["shim_sockets"] = sorted({*state.get("shim_sockets", []), *map(str, sockets)})
            _write_state_file(L, state)
        for pid in procs:
            with kc._suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(kc._pid_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for _ in range(3):  # a bind mount may sit on top of another
        points = _mounts_under(L.dir)
        if not points:
            break
        for point in points:
            _umount(point)
    for d in _cgroup_dirs(L):
        with kc._suppress(OSError):
            d.rmdir()
    for link in _links_of(L.bridge):
        _ip("link", "del", link, check=False)
    _ip("link", "del", L.bridge, check=False)
    results = CNI_CACHE / "results"
    if results.is_dir():
        for p in results.glob(f"{L.network}-*"):
            p.unlink(missing_ok=True)
    if CONTAINER_LOG_LINKS.is_dir():
        for p in CONTAINER_LOG_LINKS.iterdir():
            if p.is_symlink() and os.readlink(p).startswith(str(L.dir) + "/"):
                p.unlink(missing_ok=True)
    for s in state.get("shim_sockets", []):
        Path(s).unlink(missing_ok=True)
    for t, (was, _now) in _changed_tunables(state.get("tunables", {})).items():
        with kc._suppress(OSError):
            Path("/proc/sys", t).write_text(was)
    for d in state.get("created_dirs", []):  # only if we made them and nothing else is in them
        for sub in sorted((Path(r) for r, _, _ in os.walk(d)), key=lambda p: len(p.parts), reverse=True):
            with kc._suppress(OSError):
                sub.rmdir()
    # The runtime's data (images, snapshots, kubelet root) goes; the logs stay.
    if not _mounts_under(L.dir):
        for sub in ("containerd", "kubelet", "runc", "cni-ipam", "images", "pod-logs", "volume-plugins"):
            shutil.rmtree(L.dir / sub, ignore_errors=True)
    left = leftovers(L.dir)
    if not left:
        L.state_file.unlink(missing_ok=True)
    return left


def _write_state_file(L: Layout, state: dict) -> None:
    with kc._suppress(OSError):
        L.state_file.write_text(json.dumps(state, indent=1))


