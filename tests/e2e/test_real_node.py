"""The real node (e2e/real_node.py): pods run for real under a kubelet, beside kwok.

What a user of the test cluster relies on: a Job's pod really runs and its
logs are readable through the API; a hostPath volume is the host's folder, with
the pod's securityContext applied to what it writes; an exit code surfaces in
the Job and pod status; pods reach a server bound to the node's host address;
only pods that ask for the node land there; a GPU request never lands on it;
and a node killed mid-pod leaves nothing behind after its clean-up.
"""
from __future__ import annotations

import http.server
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

import k8s_cluster as kc
import oci_image
import real_node as rn

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

BUSYBOX = oci_image.BUSYBOX_IMAGE


def job_manifest(name: str, script: str, *, volumes: list | None = None, mounts: list | None = None,
                 security: dict | None = None, parallelism: int = 1, completions: int = 1,
                 resources: dict | None = None) -> dict:
    container = {"name": "main", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                 "volumeMounts": mounts or []}
    if resources:
        container["resources"] = resources
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "parallelism": parallelism, "completions": completions,
                 "template": {"spec": {
                     "restartPolicy": "Never", "tolerations": [rn.TOLERATION], "nodeSelector": rn.NODE_SELECTOR,
                     "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                     "securityContext": security or {}, "volumes": volumes or [], "containers": [container]}}},
    }


def job_finished(cluster, ns: str, name: str, timeout: float = 90) -> tuple[str, dict]:
    def done():
        job = cluster.kubectl_json("get", "job", name, "-n", ns)
        for cond in (job.get("status") or {}).get("conditions", []):
            if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
                return cond["type"], job
        return None

    return kc.wait_until(done, timeout, f"Job {name} finished", interval=0.1)


def pods_of(cluster, ns: str, job: str) -> list[dict]:
    return cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={job}")["items"]


def test_node_is_ready_tainted_and_kwok_still_plays_other_pods(k8s_cluster, real_node, k8s_namespace):
    node = k8s_cluster.kubectl_json("get", "node", rn.NODE_NAME)
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    assert {"key": rn.TAINT_KEY, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == k8s_cluster.version
    # A pod that does not ask for the real node is played by kwok, as before.
    k8s_cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
                       "spec": {"containers": [{"name": "c", "image": "never-pulled:1"}]}}, namespace=k8s_namespace)
    pod = kc.wait_until(lambda: (lambda p: p if p.get("spec", {}).get("nodeName") else None)(
        k8s_cluster.kubectl_json("get", "pod", "plain", "-n", k8s_namespace)), 30, "plain pod scheduled")
    assert pod["spec"]["nodeName"] == kc.NODE_NAME


def test_job_runs_for_real_and_its_logs_are_readable(k8s_cluster, real_node, k8s_namespace):
    marker = uuid.uuid4().hex
    started = time.monotonic()
    k8s_cluster.apply(job_manifest("hello", f"echo hello {marker}; cat /proc/1/cgroup | head -1"),
                      namespace=k8s_namespace)
    outcome, _ = job_finished(k8s_cluster, k8s_namespace, "hello")
    print(f"\nbusybox Job Complete {time.monotonic() - started:.1f}s after it was applied")
    assert outcome == "Complete"
    (pod,) = pods_of(k8s_cluster, k8s_namespace, "hello")
    assert pod["spec"]["nodeName"] == rn.NODE_NAME
    logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, "job/hello").stdout
    assert f"hello {marker}" in logs
    assert real_node.layout.cgroup_root in logs  # it ran in the node's own cgroup tree


def test_parallel_pods_all_complete(k8s_cluster, real_node, k8s_namespace):
    started = time.monotonic()
    k8s_cluster.apply(job_manifest("many", "echo done $HOSTNAME", parallelism=5, completions=10),
                      namespace=k8s_namespace)
    outcome, job = job_finished(k8s_cluster, k8s_namespace, "many", timeout=180)
    print(f"\n10 pods at parallelism 5 Complete in {time.monotonic() - started:.1f}s")
    assert outcome == "Complete" and job["status"]["succeeded"] == 10


def test_hostpath_written_by_pod_appears_on_host_as_the_pod_user(k8s_cluster, real_node, k8s_namespace, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    k8s_cluster.apply(job_manifest(
        "writer", "id -u > /data/written-by && echo payload > /data/result.txt",
        volumes=[{"name": "data", "hostPath": {"path": str(shared), "type": "Directory"}}],
        mounts=[{"name": "data", "mountPath": "/data"}],
        security={"runAsUser": 4242, "runAsGroup": 4242, "runAsNonRoot": True}), namespace=k8s_namespace)
    outcome, _ = job_finished(k8s_cluster, k8s_namespace, "writer")
    assert outcome == "Complete"
    assert (shared / "result.txt").read_text() == "payload\n"
    assert (shared / "written-by").read_text().strip() == "4242"
    assert (shared / "result.txt").stat().st_uid == 4242


def test_exit_code_surfaces_as_failed(k8s_cluster, real_node, k8s_namespace):
    k8s_cluster.apply(job_manifest("boom", "echo going down >&2; exit 3"), namespace=k8s_namespace)
    outcome, _ = job_finished(k8s_cluster, k8s_namespace, "boom")
    assert outcome == "Failed"
    (pod,) = pods_of(k8s_cluster, k8s_namespace, "boom")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert "going down" in k8s_cluster.kubectl("logs", "-n", k8s_namespace, pod["metadata"]["name"]).stdout


def test_pods_reach_a_server_on_the_node_host_address(k8s_cluster, real_node, k8s_namespace):
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append(self.client_address[0])
            body = b"from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((real_node.host_ip, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://{real_node.host_ip}:{server.server_address[1]}/"
        k8s_cluster.apply(job_manifest("client", f"wget -qO- {url}"), namespace=k8s_namespace)
        outcome, _ = job_finished(k8s_cluster, k8s_namespace, "client")
        assert outcome == "Complete"
        (pod,) = pods_of(k8s_cluster, k8s_namespace, "client")
        assert "from the host" in k8s_cluster.kubectl("logs", "-n", k8s_namespace, pod["metadata"]["name"]).stdout
        # The pod had its own address on the node's bridge, not the host's network.
        assert seen == [pod["status"]["podIP"]]
        assert pod["status"]["podIP"].rsplit(".", 1)[0] == real_node.host_ip.rsplit(".", 1)[0]
    finally:
        server.shutdown()
        server.server_close()


def test_gpu_requests_never_land_on_the_real_node(k8s_cluster, real_node, k8s_namespace):
    node = k8s_cluster.kubectl_json("get", "node", rn.NODE_NAME)
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    gpu_node = f"kwok-gpu-{uuid.uuid4().hex[:6]}"
    k8s_cluster.apply({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": gpu_node, "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"type": "kwok", "kubernetes.io/hostname": gpu_node}},
        "spec": {"taints": [{"key": "e2e.clara-dicom.io/gpu-test", "value": k8s_namespace, "effect": "NoSchedule"}]},
        "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "1"},
                   "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "1"}},
    })
    try:
        gpu = {"limits": {"nvidia.com/gpu": "1"}}
        # Tolerates both the real node and the GPU node: only the GPU node advertises the resource.
        anywhere = job_manifest("gpu-anywhere", "nvidia-smi", resources=gpu)
        spec = anywhere["spec"]["template"]["spec"]
        del spec["nodeSelector"]
        spec["tolerations"].append({"key": "e2e.clara-dicom.io/gpu-test", "operator": "Exists"})
        k8s_cluster.apply(anywhere, namespace=k8s_namespace)
        pod = kc.wait_until(lambda: (lambda ps: ps[0] if ps and ps[0]["spec"].get("nodeName") else None)(
            pods_of(k8s_cluster, k8s_namespace, "gpu-anywhere")), 60, "GPU pod scheduled")
        # On a node that advertises GPUs (ours, or kwok-node-0 if an earlier test gave it some), never the real one.
        chosen = k8s_cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
        assert pod["spec"]["nodeName"] != rn.NODE_NAME
        assert int(chosen["status"]["allocatable"].get("nvidia.com/gpu", "0")) >= 1
        # Pinned to the real node, a GPU request stays Pending: the scheduler says why.
        k8s_cluster.apply(job_manifest("gpu-on-real-node", "nvidia-smi", resources=gpu), namespace=k8s_namespace)

        def unschedulable():
            pods = pods_of(k8s_cluster, k8s_namespace, "gpu-on-real-node")
            conds = pods[0]["status"].get("conditions", []) if pods else []
            return next((c for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"), None)

        cond = kc.wait_until(unschedulable, 60, "PodScheduled=False for the GPU pod pinned to the real node")
        assert cond["reason"] == "Unschedulable" and "nvidia.com/gpu" in cond["message"], cond
        (pinned,) = pods_of(k8s_cluster, k8s_namespace, "gpu-on-real-node")
        assert not pinned["spec"].get("nodeName")
    finally:
        k8s_cluster.kubectl("delete", "node", gpu_node, "--wait=false", check=False)


def test_a_crashed_node_is_cleaned_up_completely(k8s_cluster, real_node, k8s_namespace, tmp_path_factory):
    """A second node (`crash-node`), killed with SIGKILL while a pod runs: cleanup() leaves nothing."""
    node_dir = Path(k8s_cluster.workdir) / "crash-node"
    crash = rn.RealNode(k8s_cluster, node_dir, name="crash-node").start()
    try:
        job = job_manifest("victim", "echo started; sleep 600")
        job["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "crash-node"}
        k8s_cluster.apply(job, namespace=k8s_namespace)

        def running():
            pods = pods_of(k8s_cluster, k8s_namespace, "victim")
            return pods and pods[0]["status"].get("phase") == "Running"

        kc.wait_until(running, 60, "victim pod Running on crash-node")
        during = crash.leftovers()
        kinds = {item.split()[0] for item in during}
        assert {"process", "mount", "cgroup", "link"} <= kinds, during
        for c in crash.components:  # the crash: kubelet and containerd die, shims and the pod live on
            os.killpg(c.pid, signal.SIGKILL)
        for c in crash.components:
            c.popen.wait(timeout=10)
        assert any("containerd-shim" in item for item in crash.leftovers())
        assert rn.cleanup(node_dir) == []
        assert crash.leftovers() == []
        assert rn._ip("link", "show", crash.layout.bridge, check=False).returncode != 0
        assert not list(Path("/sys/fs/cgroup/memory").glob(crash.layout.cgroup_root))
    finally:
        crash.components = []
        rn.cleanup(node_dir)
        k8s_cluster.kubectl("delete", "pods", "-n", k8s_namespace, "--all", "--force", "--grace-period=0",
                            check=False)
        k8s_cluster.kubectl("delete", "node", "crash-node", "--wait=false", check=False)
