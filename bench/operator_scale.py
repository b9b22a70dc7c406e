#!/usr/bin/env python3
"""The operator at hospital scale: a burst of PipelineJobs on the real control plane.

    python bench/operator_scale.py --jobs 1000 --controllers-qps 200     # ~5-10 min
    python bench/operator_scale.py --jobs 5000 --controllers-qps 200 --timeout 2400    # ~30 min
    python bench/operator_scale.py --jobs 500 --rate 10 --controllers-qps 200         # paced arrivals

Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
(e2e/k8s_cluster.py; binaries from e2e/build.sh) with --nodes fake nodes (default 20),
--gpu-nodes of them (default 8) advertising nvidia.com/gpu, the four PriorityClasses and
the liver pipeline (one GPU operator); then `clara-dicom operator` as a process, with a
ServiceAccount token of its own (so priority and fairness treat it as in a cluster and
/metrics tells its requests apart). --jobs PipelineJobs are created in a burst by 16
client threads on keep-alive connections, across the four priorities; kwok completes
every pod as soon as it runs. --controllers-qps lifts kube-controller-manager's and
kube-scheduler's own client limits and the Job controller's 5 syncs, which otherwise
pace pods and Job completions (the operator is not behind those; without it a 1,000 run
waits minutes for the Job controller).

Measured from the kube-apiserver's audit log and /metrics, the operator's log, and watches:

* the burst's create rate (the anchor: the operator cannot create Jobs faster);
* PipelineJob created → its Job created: p50 / p95 / max (target p95 ≤ 1 s), from the
  kube-apiserver's audit log (the bench restarts it with a policy that logs only these
  creates): the PipelineJob's create answered → its Job's create answered, both on the
  server's clock. This is the figure. Where it went comes from the operator's "created Job"
  log line (seen → queued → POST) and the audit log (the server's part of the POST). The
  bench's own watch gives an upper bound only: on a loaded 2-core machine its delivery to
  the bench's Python thread lags by seconds (the kube-apiserver even closes slow watchers,
  "Forcing ... watcher close due to unresponsiveness" in its log). Jobs/s and the ratio to
  the burst;
* the last Job finished → all PipelineJobs Succeeded (target ≤ 10 s), and the same lag
  for the Job controller (Job created → Job Complete) to show where time goes;
* the operator's CPU seconds per PipelineJob (until the last Job was created, and in all):
  less noisy than latencies on a shared machine; the load average with every figure;
* API requests per PipelineJob, all clients, by verb and resource (apiserver_request_total),
  and by client (priority-and-fairness flow schema) with the mean queue wait;
* the operator's RSS (VmRSS, VmHWM).

Exits 1 if some PipelineJob did not succeed within --timeout (the bounded smoke test,
tests/e2e/test_operator_scale_smoke.py, runs it with --jobs 24).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "e2e"))

import k8s_cluster as kc  # noqa: E402

LIVER = REPO / "tests" / "fixtures" / "liver-tumor-pipeline.yaml"
PRIORITIES = {"lower": 1000, "normal": 2000, "higher": 3000, "immediate": 4000}
NS = "bench"


def nodes(cluster: kc.Cluster, count: int, gpu_nodes: int) -> None:
    for i in range(count):
        name = kc.NODE_NAME if i == 0 else f"kwok-node-{i}"
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "500"}
        if i < gpu_nodes:
            capacity["nvidia.com/gpu"] = "64"
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake",
                                                           "node.alpha.kubernetes.io/ttl": "0"},
                             "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                        "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}}}
        cluster.apply(body)
        cluster.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"capacity": capacity, "allocatable": capacity}}))
    kc.wait_until(lambda: sum(
        any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        for n in cluster.kubectl_json("get", "nodes")["items"]) >= count, 120, f"{count} nodes Ready")


def _label(labels: str, name: str) -> str:
    found = re.search(rf'{name}="([^"]*)"', labels)
    return found.group(1) if found else ""


def api_requests(cluster: kc.Cluster) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """From the kube-apiserver's /metrics: apiserver_request_total by "VERB resource/subresource"
    (all clients), and priority-and-fairness' dispatched requests and queue-wait seconds by
    flow schema (which tells the clients apart: the operator runs as a ServiceAccount, flow
    schema service-accounts; the controllers as kube-system ServiceAccounts; kwok, the bench
    and kubectl as system:masters, exempt)."""
    status, text = cluster.request("GET", "/metrics", timeout=60)
    by_verb: collections.Counter = collections.Counter()
    by_flow: collections.Counter = collections.Counter()
    wait: collections.Counter = collections.Counter()
    for line in str(text).splitlines():
        if line.startswith(("apiserver_request_duration_seconds_sum{", "apiserver_request_duration_seconds_count{")):
            labels, value = line.rsplit(" ", 1)
            sub = _label(labels, "subresource")
            key = f"{_label(labels, 'verb')} {_label(labels, 'resource')}{'/' + sub if sub else ''}"
            wait[("seconds" if "_sum{" in line else "count", key)] += float(value)  # server-side latency
        elif line.startswith("apiserver_request_total{"):
            labels, value = line.rsplit(" ", 1)
            sub = _label(labels, "subresource")
            by_verb[f"{_label(labels, 'verb')} {_label(labels, 'resource')}{'/' + sub if sub else ''}"] += float(value)
        elif line.startswith("apiserver_flowcontrol_dispatched_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            by_flow[_label(labels, "flow_schema")] += float(value)
        elif line.startswith("apiserver_flowcontrol_request_wait_duration_seconds_sum{"):
            labels, value = line.rsplit(" ", 1)
            wait[_label(labels, "flow_schema")] += float(value)
    return by_verb, by_flow, wait


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_by_process(cluster: kc.Cluster, operator_pid: int) -> dict[str, float]:
    """CPU seconds so far of each control-plane process, the operator, the bench itself, and the whole machine."""
    out = {c.name: cpu_seconds(c.pid) for c in cluster.components if Path(f"/proc/{c.pid}").exists()}
    out["operator"], out["bench"] = cpu_seconds(operator_pid), cpu_seconds(os.getpid())
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    out["machine (all)"] = (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_shares(start: tuple[dict[str, float], float], now: dict[str, float]) -> dict[str, float]:
    """Cores used by each since ``start`` (CPU seconds / wall seconds)."""
    before, t0 = start
    wall = max(1e-6, time.monotonic() - t0)
    return {k: (now[k] - before[k]) / wall for k in now if k in before}


OPERATOR_SA = "clara-dicom-operator"


def operator_kubeconfig(cluster: kc.Cluster, work: Path) -> Path:
    """A kubeconfig for a ServiceAccount of its own, as in a cluster: its requests go through
    priority and fairness (flow schema service-accounts, level workload-low) like a deployed
    operator's, and /metrics counts them apart from the other clients. Bound to cluster-admin:
    the bench measures load, not RBAC (the chart's e2e test does)."""
    cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": OPERATOR_SA, "namespace": NS}})
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "operator-scale-bench"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                   "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": NS}]})
    token = cluster.service_account_token(NS, OPERATOR_SA, seconds=24 * 3600)
    admin = cluster.kubeconfig_json()
    config = {"apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
              "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
              "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"],
                                                            "user": OPERATOR_SA, "namespace": NS}}],
              "current-context": "operator"}
    path = work / "operator.kubeconfig"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class Watch(threading.Thread):
    """A watch stream of one collection; calls on_event(type, object, now) for every event."""

    def __init__(self, cluster: kc.Cluster, path: str, on_event) -> None:
        super().__init__(daemon=True)
        self.cluster, self.path, self.on_event = cluster, path, on_event
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        ctx = self.cluster.ssl_context()
        version = ""
        while not self.stop.is_set():
            sep = "&" if "?" in self.path else "?"
            url = f"{self.cluster.server}{self.path}{sep}watch=1&allowWatchBookmarks=false&timeoutSeconds=600" + (
                f"&resourceVersion={version}" if version else "")
            try:
                with urllib.request.urlopen(urllib.request.Request(url), context=ctx, timeout=700) as resp:
                    self.ready.set()
                    for line in resp:
                        if self.stop.is_set():
                            return
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if event.get("type") == "ERROR":
                            version = ""
                            break
                        self.on_event(event["type"], obj, time.monotonic())
            except Exception:  # noqa: BLE001 - reconnect
                time.sleep(0.2)


class Pool:
    """Keep-alive HTTPS connections to the API server, one per creating thread (one TLS
    handshake per thread, not per object: a new connection per create held the burst to
    ~28/s on this machine, so the bench itself was the bottleneck)."""

    def __init__(self, cluster: kc.Cluster) -> None:
        url = urllib.parse.urlsplit(cluster.server)
        self.host, self.port = url.hostname, url.port or 443
        self.ctx = cluster.ssl_context()
        self.local = threading.local()

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                                                     timeout=60)
            try:
                conn.request("POST", path, data, {"Content-Type": "application/json", "Accept": "application/json",
                                                  "User-Agent": "operator-scale-bench"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def created_in_log(path: Path) -> dict[str, tuple[float, tuple[float, float, float] | None]]:
    """PipelineJob name → (when the operator logged "created Job", i.e. its POST answered, epoch seconds;
    and the ms it gives: seen → created, of which queued and POST, if the line has them)."""
    out: dict[str, tuple[float, tuple[float, float, float] | None]] = {}
    pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO clara_operator\.pipelines: PipelineJob "
                         rf"{NS}/(\S+): created Job .*?(?:\) (\d+) ms after the PipelineJob was seen: (\d+) ms queued, "
                         r"\d+ ms reconciling, (\d+) ms POST)?$")
    for line in path.read_text(errors="replace").splitlines():
        found = pattern.match(line)
        if found:
            when = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            parts = tuple(float(g) / 1000 for g in found.group(3, 4, 5)) if found.group(3) else None
            out.setdefault(found.group(2), (when, parts))  # type: ignore[arg-type]
    return out


AUDIT_POLICY = {  # JSON is YAML: the creates of PipelineJobs and Jobs in the bench's namespace, nothing else
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "verbs": ["create"], "namespaces": [NS],
               "resources": [{"group": "dicom.clara.io", "resources": ["pipelinejobs"]},
                             {"group": "batch", "resources": ["jobs"]}]},
              {"level": "None"}]}


def enable_audit(cluster: kc.Cluster, work: Path) -> Path:
    """Restart kube-apiserver with an audit log of the PipelineJob and Job creates: the server's own
    times (microseconds, one clock) of "PipelineJob created" and "Job created", with neither the
    bench's nor the operator's watch delivery in them. About 2 lines per PipelineJob."""
    policy, audit = work / "audit-policy.yaml", work / "audit.log"
    policy.write_text(json.dumps(AUDIT_POLICY))
    cluster.stop_component("kube-apiserver", timeout=5)  # its graceful stop waits ~30 s for open watches
    cluster.start_component("kube-apiserver", [f"--audit-policy-file={policy}", f"--audit-log-path={audit}",
                                               "--audit-log-format=json", "--audit-log-mode=blocking"])
    return audit


def audit_creates(path: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """resource ("pipelinejobs", "jobs") → name → (request received, response complete), epoch seconds,
    from the audit log (successful creates only: 201)."""
    out: dict[str, dict[str, tuple[float, float]]] = {"pipelinejobs": {}, "jobs": {}}
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        ref = event.get("objectRef") or {}
        if (event.get("stage") != "ResponseComplete" or event.get("verb") != "create"
                or (event.get("responseStatus") or {}).get("code") != 201 or ref.get("resource") not in out):
            continue
        received = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
        complete = datetime.datetime.fromisoformat(event["stageTimestamp"]).timestamp()
        out[ref["resource"]].setdefault(ref.get("name") or "", (received, complete))
    return out


def stop_profile(profiler: subprocess.Popen | None) -> None:
    """py-spy writes its file on SIGINT."""
    if profiler is not None and profiler.poll() is None:
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[max(0, min(len(values) - 1, int(round(p * len(values))) - 1))]


def rss(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def pipelinejob(i: int) -> dict:
    name = f"scale-{i:05d}"
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob", "metadata": {"name": name},
            "spec": {"pipeline": "liver-tumor-example", "priority": list(PRIORITIES)[i % 4],
                     "source": {"aeTitle": "CT", "processor": "by-study"},
                     "group": {"by": "Study", "value": f"1.2.3.{i}"},
                     "payload": {"path": f"/var/lib/clara-dicom/payloads/{name}", "instances": 100,
                                 "bytes": 52428800}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--gpu-nodes", type=int, default=8)
    ap.add_argument("--clients", type=int, default=16, help="threads creating PipelineJobs")
    ap.add_argument("--rate", type=float, default=0,
                    help="PipelineJobs per second at most (default: as fast as the clients go); the latency "
                         "against the arrival rate shows what is the operator's and what the machine's")
    ap.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    ap.add_argument("--kubeconfig", help="use this running cluster (from `e2e/cluster up`) instead of starting one")
    ap.add_argument("--controllers-qps", type=int, default=0,
                    help="restart kube-controller-manager and kube-scheduler with --kube-api-qps=N, and the "
                         "Job controller with 50 concurrent syncs (their defaults, 20 and 50 QPS and 5 syncs, "
                         "pace the pods and Job completions; shows what is theirs and what is ours)")
    ap.add_argument("--operator-flag", action="append", default=[], help="extra flag for the operator (repeatable)")
    ap.add_argument("--profile", metavar="FILE",
                    help="py-spy the operator from the burst until the bench sees the last Job; collapsed stacks "
                         "to FILE (py-spy's --format raw; its own sampling costs the operator some CPU)")
    args = ap.parse_args()

    def interrupt(*_: object) -> None:  # SIGTERM too: report partial figures and stop the cluster
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

    print(f"load average before: {os.getloadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="clara-scale-"))
    cluster = kc.connect(Path(args.kubeconfig)) if args.kubeconfig else kc.start(work / "k8s")
    operator = profiler = audit = None
    watches: list[Watch] = []
    try:
        if not args.kubeconfig:  # a given cluster's flags are not ours to change: no server-side latency then
            audit = enable_audit(cluster, work)
        nodes(cluster, args.nodes, args.gpu_nodes)
        if args.controllers_qps:
            for name in ("kube-controller-manager", "kube-scheduler"):
                cluster.stop_component(name)
                extra = ["--concurrent-job-syncs=50"] if name == "kube-controller-manager" else []
                cluster.start_component(name, [f"--kube-api-qps={args.controllers_qps}",
                                                f"--kube-api-burst={2 * args.controllers_qps}", *extra])
            print(f"kube-controller-manager and kube-scheduler: --kube-api-qps={args.controllers_qps}; "
                  "kube-controller-manager: --concurrent-job-syncs=50")
        for prio, value in PRIORITIES.items():
            cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                           "metadata": {"name": f"clara-dicom-{prio}"}, "value": value})
        cluster.kubectl("create", "namespace", NS, check=False)
        kc.wait_until(lambda: cluster.kubectl("get", "sa", "default", "-n", NS, check=False).returncode == 0, 60,
                      "ServiceAccount default")
        cluster.kubectl("apply", "-n", NS, "-f", str(LIVER))
        kubeconfig = operator_kubeconfig(cluster, work)

        log = open(work / "operator.log", "ab")  # noqa: SIM115
        env = {**os.environ, **cluster.env, "KUBECONFIG": str(kubeconfig), "NO_PROXY": "127.0.0.1,localhost"}
        operator = subprocess.Popen(
            [sys.executable, "-m", "clara_dicom.cli", "operator", "-n", NS, "--liveness-port", "0",
             "--no-adapter-feedback", "--payload-host-path", "/tmp/clara-dicom-bench-payloads",
             # activeDeadlineSeconds counts from the Job's start, queueing for a GPU included: at
             # 5,000 one-GPU pods on 512 GPUs the default 600 s failed 3,584 runs as DeadlineExceeded
             "--active-deadline-seconds", str(max(600, int(args.timeout))), *args.operator_flag],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

        created: dict[str, float] = {}
        job_added: dict[str, float] = {}
        job_done: dict[str, float] = {}
        pj_done: dict[str, float] = {}
        lock = threading.Lock()

        def on_job(kind: str, job: dict, now: float) -> None:
            name = job["metadata"]["name"]
            with lock:
                job_added.setdefault(name, now)
                if any(c.get("type") == "Complete" and c.get("status") == "True"
                       for c in (job.get("status") or {}).get("conditions") or []):
                    job_done.setdefault(name, now)

        def on_pj(kind: str, pj: dict, now: float) -> None:
            if (pj.get("status") or {}).get("phase") == "Succeeded":
                with lock:
                    pj_done.setdefault(pj["metadata"]["name"], now)

        watches = [Watch(cluster, f"/apis/batch/v1/namespaces/{NS}/jobs", on_job),
                   Watch(cluster, f"/apis/dicom.clara.io/v1alpha1/namespaces/{NS}/pipelinejobs", on_pj)]
        for w in watches:
            w.start()
            w.ready.wait(30)
        time.sleep(3)  # let the operator finish its start-up listing before the burst
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited: {(work / 'operator.log').read_text()[-2000:]}")
        before = api_requests(cluster)
        path = f"/apis/dicom.clara.io/v1alpha1/namespaces/{NS}/pipelinejobs"

        pool = Pool(cluster)
        sent_wall: dict[str, float] = {}

        def create(i: int) -> None:
            body = pipelinejob(i)
            if args.rate:  # paced: PipelineJob i is sent no earlier than i / rate seconds into the burst
                time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
            sent = time.monotonic()  # before the request: the lag below is an upper bound
            sent_wall[body["metadata"]["name"]] = time.time()
            status, answer = pool.post(path, body)
            if status != 201:
                raise RuntimeError(f"{body['metadata']['name']}: {status} {answer[:300]!r}")
            with lock:
                created[body["metadata"]["name"]] = sent

        if args.profile:
            profiler = subprocess.Popen(["py-spy", "record", "--pid", str(operator.pid), "--format", "raw",
                                         "--rate", "50", "--output", args.profile, "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_start = cpu_seconds(operator.pid)
        shares_start = cpu_by_process(cluster, operator.pid), time.monotonic()
        start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as creators:
            list(creators.map(create, range(args.jobs)))
        burst = time.monotonic() - start
        print(f"created {args.jobs} PipelineJobs in {burst:.1f}s ({args.jobs / burst:.0f}/s, {args.clients} "
              f"client threads, keep-alive connections) load {os.getloadavg()[0]:.1f}", flush=True)
        deadline = start + args.timeout
        cpu_jobs = None  # the operator's CPU seconds when the bench's watch saw the last Job (lags under load)
        shares: dict[str, float] = {}
        load_burst = None
        try:
            while len(pj_done) < args.jobs and time.monotonic() < deadline:
                time.sleep(0.5)
                if operator.poll() is not None:
                    raise SystemExit("the operator exited")
                if cpu_jobs is None and len(job_added) >= args.jobs:
                    cpu_jobs, load_burst = cpu_seconds(operator.pid) - cpu_start, os.getloadavg()
                    shares = cpu_shares(shares_start, cpu_by_process(cluster, operator.pid))
                    print(f"all {args.jobs} Jobs created, {time.monotonic() - start:.1f}s; load {load_burst}",
                          flush=True)
                    stop_profile(profiler)
        except KeyboardInterrupt:  # report what there is so far
            print(f"interrupted after {time.monotonic() - start:.0f}s: partial figures", flush=True)
        stop_profile(profiler)
        cpu_all = cpu_seconds(operator.pid) - cpu_start
        after = api_requests(cluster)
        rss_now, rss_peak = rss(operator.pid)
        load = os.getloadavg()

        names = sorted(created)
        lag = [job_added[n] - created[n] for n in names if n in job_added]
        last_job = max(job_added.values()) if job_added else float("nan")
        if not lag:
            raise SystemExit("no Job was created")
        creates = audit_creates(audit) if audit is not None else {"pipelinejobs": {}, "jobs": {}}
        pj_at, job_at = creates["pipelinejobs"], creates["jobs"]
        answered = created_in_log(work / "operator.log")
        served = [job_at[n][1] - pj_at[n][1] for n in names if n in pj_at and n in job_at]
        if served:
            print(f"\nPipelineJob created -> Job created ({len(served)}/{args.jobs}): p50 "
                  f"{statistics.median(served):.2f}s, p95 {pct(served, 0.95):.2f}s, max {max(served):.2f}s   "
                  "(target p95 <= 1 s)\n"
                  "  method: the kube-apiserver's audit log, the PipelineJob's create answered -> its Job's create "
                  "answered (both stored in etcd; the server's clock, microseconds; no watch delivery to any client)")
            # where the time went: the operator logs seen -> POST answered, split into queued and POST
            split = [(n, answered[n]) for n in names if n in pj_at and n in job_at and n in answered
                     and answered[n][1] is not None]
            if split:
                watch = [when - total - pj_at[n][1] for n, (when, (total, _, _)) in split]
                queued = [q for _, (_, (_, q, _)) in split]
                post = [p for _, (_, (_, _, p)) in split]
                server = [job_at[n][1] - job_at[n][0] for n, _ in split]
                print("  where it went, p50 / p95 (the operator's log line; its clock is the server's, one machine):")
                for label, values in (("PipelineJob stored -> the operator's watch delivered it", watch),
                                      ("queued in the operator (waiting for a free worker)", queued),
                                      ("POST jobs, as the operator's client waited for it", post),
                                      ("  of which the kube-apiserver's own handling (audit)", server)):
                    print(f"    {label}: {statistics.median(values):.3f}s / {pct(values, 0.95):.3f}s")
        print(f"PipelineJob POST sent -> Job seen on the bench's own watch: p50 {statistics.median(lag):.2f}s, "
              f"p95 {pct(lag, 0.95):.2f}s, max {max(lag):.2f}s   (an upper bound: it adds the bench's POST and the "
              "watch's delivery to a Python thread on a busy machine)")
        own = [answered[n][0] - sent_wall[n] for n in names if n in answered and n in sent_wall]
        if own:
            print(f"PipelineJob POST sent -> the operator's Job POST answered (its log): p50 "
                  f"{statistics.median(own):.2f}s, p95 {pct(own, 0.95):.2f}s, max {max(own):.2f}s")
            first_sent, last_answered = min(sent_wall.values()), max(a[0] for a in answered.values())
            print(f"  by the operator's log: {len(answered)} Jobs created {last_answered - first_sent:.1f}s after the "
                  f"first create: {len(answered) / (last_answered - first_sent):.0f} Jobs/s; ratio to the burst "
                  f"{(last_answered - first_sent) / burst:.2f}")
        span = last_job - start
        print(f"Jobs: all {len(job_added)} created {span:.1f}s after the first create: {len(job_added) / span:.0f} Jobs/s; "
              f"anchor: the burst itself {burst:.1f}s -> ratio {span / burst:.2f}")
        if job_done and pj_done:
            last_done = max(job_done.values())
            finish = max(pj_done.values()) if pj_done else float("nan")
            follow = [pj_done[n] - job_done[n] for n in names if n in pj_done and n in job_done]
            run = [job_done[n] - job_added[n] for n in names if n in job_done and n in job_added]
            partial = "" if len(pj_done) == args.jobs else "   PARTIAL: not every PipelineJob succeeded"
            print(f"last Job finished -> all PipelineJobs Succeeded: {finish - last_done:.1f}s   (target <= 10 s); "
                  f"{len(pj_done)}/{args.jobs} Succeeded{partial}")
            print(f"  Job Complete -> PipelineJob Succeeded: p50 {statistics.median(follow):.2f}s, "
                  f"p95 {pct(follow, 0.95):.2f}s (the operator following)")
            print(f"  Job created -> Job Complete: p50 {statistics.median(run):.1f}s, p95 {pct(run, 0.95):.1f}s, "
                  f"max {max(run):.1f}s (Job controller, scheduler, kwok)")
            print(f"  first create -> all Succeeded: {finish - start:.1f}s")
        if shares:
            print("CPU during the burst (first create -> the bench saw the last Job), in cores of the machine's "
                  f"{os.cpu_count()}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
        if cpu_jobs is not None:
            print(f"operator CPU: {cpu_jobs:.1f}s until the bench saw the last Job = {1000 * cpu_jobs / args.jobs:.1f} ms "
                  f"per PipelineJob (load then {load_burst[0]:.1f})")
        print(f"operator CPU: {cpu_all:.1f}s in all = {1000 * cpu_all / args.jobs:.1f} ms per PipelineJob")
        by_verb, by_flow, wait = (a - b for a, b in zip(after, before))
        total = sum(by_verb.values())
        print(f"API requests: {total:.0f} = {total / args.jobs:.1f} per PipelineJob (all clients)")
        print(f"  Job creates: {by_verb['POST jobs']:.0f} POST jobs for {args.jobs} PipelineJobs")
        for key, value in by_verb.most_common(14):
            print(f"  {key}: {value / args.jobs:.2f} per PipelineJob")
        print("by client (priority-and-fairness flow schema; queue wait):")
        for key, value in by_flow.most_common(8):
            who = {"service-accounts": "the operator (its ServiceAccount)", "exempt": "kwok, the bench, kubectl",
                   "kube-system-service-accounts": "kube-controller-manager's controllers",
                   "kube-scheduler": "kube-scheduler"}.get(key, "")
            print(f"  {key}: {value / args.jobs:.2f} per PipelineJob, {1000 * wait[key] / max(value, 1):.1f} ms mean "
                  f"wait  {who}")
        print("server-side latency, mean (apiserver_request_duration_seconds: what the operator's creates wait on):")
        for key in ("POST jobs", "POST pipelinejobs", "PATCH pipelinejobs/status", "POST events", "POST pods"):
            count = wait[("count", key)]
            if count:
                print(f"  {key}: {1000 * wait[('seconds', key)] / count:.0f} ms over {count:.0f} requests")
        print(f"operator RSS {rss_now:.0f} MB (peak {rss_peak:.0f} MB)   (target <= 300 MB)")
        print(f"load average after: {load}")
        if len(pj_done) < args.jobs:
            print(f"FAILED: {args.jobs - len(pj_done)} PipelineJob(s) did not succeed", flush=True)
            return 1
    finally:
        stop_profile(profiler)
        for w in watches:
            w.stop.set()
        if operator is not None and operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        if not args.kubeconfig:
            cluster.stop()
        print(f"operator log: {work / 'operator.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
