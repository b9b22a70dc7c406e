"""The operator against a real kube-apiserver (SPEC §2, §5; issue 5).

The operator runs as a process (`clara-dicom operator --namespace NS`), as
users run it. The adapter is played by a stand-in thread that publishes, in
the ConfigMap ``clara-dicom-adapter-status`` (key ``appliedVersion``), the
version of every configuration the operator renders, like the real adapter
does once it applied it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "k8s"
GROUP_PATH = "/apis/dicom.clara.io/v1alpha1"
CONFIG_MAP = "clara-dicom-adapter-config"
STATUS_CONFIG_MAP = "clara-dicom-adapter-status"
PLURALS = {"aet": "claraaetitles", "jp": "jobprocessors", "src": "clarasources", "dst": "claradestinations",
           "pipe": "clarapipelines"}


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class Rest:
    """Cheap API calls for polling (one TLS context, no kubectl process per poll)."""

    def __init__(self, cluster) -> None:
        self.server = cluster.server
        self.ctx = cluster.ssl_context()

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Accept": "application/json", "Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw.decode()

    def get(self, path: str) -> Any | None:
        status, body = self.call("GET", path)
        return body if status == 200 else None

    def obj(self, ns: str, short: str, name: str) -> dict | None:
        return self.get(f"{GROUP_PATH}/namespaces/{ns}/{PLURALS[short]}/{name}")

    def ready(self, ns: str, short: str, name: str) -> dict | None:
        body = self.obj(ns, short, name) or {}
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return cond
        return None

    def config(self, ns: str) -> dict | None:
        cm = self.get(f"/api/v1/namespaces/{ns}/configmaps/{CONFIG_MAP}")
        return json.loads(cm["data"]["config.json"]) if cm else None


def is_ready(rest: Rest, ns: str, short: str, name: str, reason: str | None = None, status: str = "True"):
    cond = rest.ready(ns, short, name)
    obj = rest.obj(ns, short, name) or {}
    generation = (obj.get("metadata") or {}).get("generation")
    if cond and cond["status"] == status and (reason is None or cond["reason"] == reason) \
            and cond.get("observedGeneration") == generation:
        return cond
    return None


class StandInAdapter:
    """Publishes the version of the rendered configuration as applied (what the adapter does)."""

    def __init__(self, rest: Rest, ns: str) -> None:
        self.rest, self.ns = rest, ns
        self.stop_flag = threading.Event()
        self.published: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        base = f"/api/v1/namespaces/{self.ns}/configmaps"
        while not self.stop_flag.is_set():
            cm = self.rest.get(f"{base}/{CONFIG_MAP}")
            version = cm and (cm["metadata"].get("annotations") or {}).get("dicom.clara.io/config-version")
            if version and (not self.published or self.published[-1] != version):
                body = {"metadata": {"name": STATUS_CONFIG_MAP}, "data": {"appliedVersion": version}}
                status, _ = self.rest.call("PATCH", f"{base}/{STATUS_CONFIG_MAP}", body,
                                           "application/merge-patch+json")
                if status == 404:
                    status, _ = self.rest.call("POST", base, body)
                if status in (200, 201):
                    self.published.append(version)
            self.stop_flag.wait(0.05)

    def __enter__(self) -> "StandInAdapter":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_flag.set()
        self.thread.join(5)


class Operator:
    """`clara-dicom operator` as a process."""

    def __init__(self, cluster, ns: str, log_dir: Path, *extra: str) -> None:
        sys.path.insert(0, str(REPO / "e2e"))
        import k8s_cluster as kc

        self.port = kc.free_port()
        self.cluster, self.ns, self.extra = cluster, ns, extra
        self.log_path = log_dir / f"operator-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Operator":
        env = {**os.environ, **self.cluster.env, "KUBECONFIG": str(self.cluster.kubeconfig),
               "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}  # its log survives a SIGKILL
        self.start_marker = f"=== start {uuid.uuid4().hex}\n"
        with open(self.log_path, "a") as fh:
            fh.write(self.start_marker)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clara_dicom.cli", "operator", "--namespace", self.ns,
             "--liveness-port", str(self.port), *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        wait_for(self.healthy, 30, "operator liveness endpoint")
        return self

    def healthy(self) -> dict | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                return json.loads(resp.read()) if resp.status == 200 else None
        except (OSError, ValueError):
            return None

    def runs(self) -> int:
        """Reconciles of our namespace since the last start (from the operator's log)."""
        text = self.log_path.read_text(errors="replace").split(self.start_marker)[-1]
        return text.count(f"namespace {self.ns}: reconciled")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def rest(k8s_cluster) -> Rest:
    return Rest(k8s_cluster)


@pytest.fixture
def ns(k8s_cluster):
    """A fresh namespace (no ServiceAccount wait: nothing here runs pods)."""
    name = f"op-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(k8s_cluster, ns, tmp_path):
    op = Operator(k8s_cluster, ns, tmp_path).start()
    yield op
    op.stop()
    print(f"--- operator log (tail) ---\n{op.log()}")  # shown by pytest when the test fails


@pytest.fixture
def adapter(rest, ns):
    with StandInAdapter(rest, ns) as stand_in:
        yield stand_in


def apply(cluster, ns: str, manifest: str | Path, check: bool = True):
    if isinstance(manifest, Path):
        return cluster.kubectl("apply", "-n", ns, "-f", str(manifest), check=check)
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest, check=check)


def aet_yaml(name: str, title: str, processor: str, extra: str = "") -> str:
    return (f"apiVersion: dicom.clara.io/v1alpha1\nkind: ClaraAETitle\nmetadata: {{name: {name}}}\n"
            f"spec:\n  aeTitle: '{title}'\n  processor: {processor}\n{extra}")


def jp_yaml(name: str, extra: str = "") -> str:
    return (f"apiVersion: dicom.clara.io/v1alpha1\nkind: JobProcessor\nmetadata: {{name: {name}}}\n"
            f"spec:\n  pipelines: {{liver: liver-tumor}}\n{extra}")


# ---------------------------------------------------------------------------


def test_crds_are_structural_and_documented(k8s_cluster):
    crds = k8s_cluster.kubectl_json("get", "crd", "-l", "app.kubernetes.io/part-of=clara-dicom")["items"]
    assert len(crds) == 7
    for crd in crds:
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds.get("Established") == "True" and conds.get("NonStructuralSchema") is None, crd["metadata"]
    out = k8s_cluster.kubectl("explain", "claraaetitle.spec.processor").stdout
    assert "Name of the JobProcessor" in out
    out = k8s_cluster.kubectl("explain", "clarapipeline.spec.definition.operators.container.image").stdout
    assert "Container image" in out


def test_examples_apply_cleanly_and_become_ready(k8s_cluster, rest, ns, operator, adapter):
    out = apply(k8s_cluster, ns, EXAMPLES).stdout
    assert out.count("created") == 6, out
    for short, name in [("aet", "clara"), ("jp", "by-study"), ("src", "pacs"), ("src", "storescu"),
                        ("dst", "orthanc"), ("pipe", "liver-tumor")]:
        wait_for(lambda: is_ready(rest, ns, short, name), 10, f"{short}/{name} Ready")
    cfg = rest.config(ns)
    assert cfg["aeTitles"]["clara"]["aeTitle"] == "CLARA"
    assert cfg["processors"]["by-study"]["pipelines"] == {"liver": "liver-tumor"}
    assert cfg["pipelines"] == {"liver-tumor": "liver-tumor"}
    assert set(cfg["sources"]) == {"pacs", "storescu"} and set(cfg["destinations"]) == {"orthanc"}
    assert adapter.published[-1] == cfg["version"]
    table = k8s_cluster.kubectl("get", "aet,jp", "-n", ns).stdout
    assert "CLARA" in table and "by-study" in table and "liver" in table, table
    lines = [line.split() for line in table.splitlines()]
    assert ["NAME", "READY", "AE", "TITLE", "PROCESSOR", "AGE"] == lines[0]
    assert lines[1][:4] == ["claraaetitle.dicom.clara.io/clara", "True", "CLARA", "by-study"]
    obj = rest.obj(ns, "aet", "clara")
    assert "dicom.clara.io/finalizer" in obj["metadata"]["finalizers"]
    assert not [k for k in obj["metadata"].get("annotations", {}) if k.startswith("kopf.zalando.org")]
    events = k8s_cluster.kubectl_json("get", "events", "-n", ns)["items"]
    assert any(e["reason"] == "Ready" and e["involvedObject"]["name"] == "clara" for e in events)


def test_invalid_objects_are_rejected_or_not_ready(k8s_cluster, rest, ns, operator, adapter):
    apply(k8s_cluster, ns, EXAMPLES)
    wait_for(lambda: is_ready(rest, ns, "aet", "clara"), 10, "example AE title Ready")
    before = rest.config(ns)

    # Rejected by the API server, with the schema's message.
    rejected = {
        "timeout": (jp_yaml("slow", "  timeout: 3\n"), "should be greater than or equal to 5"),
        "sop lists": (aet_yaml("both", "BOTH", "by-study",
                               "  ignoredSopClasses: ['1.2.3']\n  allowedSopClasses: ['1.2.4']\n"),
                      "mutually exclusive"),
        "AE title": (aet_yaml("long", "A" * 17, "by-study"), "spec.aeTitle"),
        "AE backslash": (aet_yaml("slash", "A\\\\B", "by-study"), "spec.aeTitle"),
        "tag": (jp_yaml("tag", "  groupBy: '0020,00ZZ'\n"), "spec.groupBy"),
        "priority": (jp_yaml("prio", "  priority: urgent\n"), "supported values"),
    }
    for what, (manifest, message) in rejected.items():
        res = apply(k8s_cluster, ns, manifest, check=False)
        assert res.returncode != 0, what
        assert message in res.stderr, (what, res.stderr)

    # Accepted by the API server, refused by the operator with a reason.
    apply(k8s_cluster, ns, aet_yaml("orphan", "ORPHAN", "no-such-processor"))
    apply(k8s_cluster, ns, aet_yaml("copycat", "CLARA", "by-study"))
    apply(k8s_cluster, ns, jp_yaml("plugin", "  type: no-such-plugin\n"))
    orphan = wait_for(lambda: is_ready(rest, ns, "aet", "orphan", "ProcessorNotFound", "False"), 10, "orphan")
    assert "no-such-processor" in orphan["message"]
    copycat = wait_for(lambda: is_ready(rest, ns, "aet", "copycat", "Conflict", "False"), 10, "copycat")
    assert "clara" in copycat["message"]
    wait_for(lambda: is_ready(rest, ns, "jp", "plugin", "UnknownProcessorType", "False"), 10, "plugin")
    # The plug-in's own validate(settings): the aetitle processor takes no settings.
    apply(k8s_cluster, ns, jp_yaml("with-settings", "  settings: {colour: blue}\n"))
    apply(k8s_cluster, ns, aet_yaml("uses-bad", "USESBAD", "with-settings"))
    cond = wait_for(lambda: is_ready(rest, ns, "jp", "with-settings", "InvalidSettings", "False"), 10, "settings")
    assert "colour" in cond["message"]
    wait_for(lambda: is_ready(rest, ns, "aet", "uses-bad", "ProcessorInvalid", "False"), 10, "ProcessorInvalid")
    # Nothing else disturbed.
    after = rest.config(ns)
    assert after["aeTitles"] == before["aeTitles"] and after["processors"] == before["processors"]
    assert is_ready(rest, ns, "aet", "clara") and is_ready(rest, ns, "jp", "by-study")
    events = k8s_cluster.kubectl_json("get", "events", "-n", ns,
                                      "--field-selector", "involvedObject.name=orphan")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "ProcessorNotFound" for e in events)


def test_reacts_to_other_objects(k8s_cluster, rest, ns, operator, adapter):
    apply(k8s_cluster, ns, EXAMPLES / "pipeline.yaml")
    apply(k8s_cluster, ns, aet_yaml("early", "EARLY", "late-processor"))
    wait_for(lambda: is_ready(rest, ns, "aet", "early", "ProcessorNotFound", "False"), 10, "waiting AE title")

    # Created through the API directly, so the clock starts when the processor exists
    # (kubectl's own start-up would only add noise to the measurement).
    body = {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "JobProcessor", "metadata": {"name": "late-processor"},
            "spec": {"pipelines": {"liver": "liver-tumor"}}}
    status, _ = rest.call("POST", f"{GROUP_PATH}/namespaces/{ns}/jobprocessors", body)
    started = time.monotonic()
    assert status == 201
    # Behaviour, not speed (bench/reconcile.py measures that): it turns Ready once its processor exists.
    wait_for(lambda: is_ready(rest, ns, "aet", "early"), 15, "AE title Ready after its processor appeared",
             interval=0.02)
    elapsed = time.monotonic() - started
    print(f"\nprocessor created -> AE title Ready: {elapsed:.2f} s")
    assert rest.config(ns)["aeTitles"]["early"]["processor"] == "late-processor"

    # Conflict winner deleted -> loser Ready.
    apply(k8s_cluster, ns, aet_yaml("second", "EARLY", "late-processor"))
    wait_for(lambda: is_ready(rest, ns, "aet", "second", "Conflict", "False"), 10, "conflict")
    k8s_cluster.kubectl("delete", "claraaetitle", "early", "-n", ns)  # waits for the finalizer
    wait_for(lambda: is_ready(rest, ns, "aet", "second"), 5, "loser Ready after the winner went away")
    assert set(rest.config(ns)["aeTitles"]) == {"second"}


def test_edits_and_deletes_change_the_configuration(k8s_cluster, rest, ns, operator, adapter):
    apply(k8s_cluster, ns, EXAMPLES)
    wait_for(lambda: is_ready(rest, ns, "aet", "clara"), 10, "example AE title Ready")
    v1 = rest.config(ns)["version"]

    # A valid edit changes the rendered configuration.
    k8s_cluster.kubectl("patch", "jobprocessor", "by-study", "-n", ns, "--type=merge",
                        "-p", '{"spec": {"timeout": 30, "groupBy": "Series"}}')
    wait_for(lambda: (rest.config(ns)["processors"]["by-study"]["timeout"] == 30), 5, "edit rendered")
    wait_for(lambda: is_ready(rest, ns, "jp", "by-study"), 5, "edited processor Ready")
    v2 = rest.config(ns)["version"]
    assert v2 != v1 and rest.config(ns)["processors"]["by-study"]["groupBy"] == "Series"

    # An edit the API server refuses changes nothing.
    res = k8s_cluster.kubectl("patch", "jobprocessor", "by-study", "-n", ns, "--type=merge",
                              "-p", '{"spec": {"timeout": 3}}', check=False)
    assert res.returncode != 0
    # An invalid edit the operator refuses keeps the last valid version serving.
    k8s_cluster.kubectl("patch", "claraaetitle", "clara", "-n", ns, "--type=merge",
                        "-p", '{"spec": {"aeTitle": "RENAMED", "processor": "missing"}}')
    cond = wait_for(lambda: is_ready(rest, ns, "aet", "clara", "ProcessorNotFound", "False"), 5, "invalid edit")
    assert "still served" in cond["message"]
    cfg = rest.config(ns)
    assert cfg["aeTitles"]["clara"]["aeTitle"] == "CLARA" and cfg["version"] == v2
    # Fixed: the new version serves.
    k8s_cluster.kubectl("patch", "claraaetitle", "clara", "-n", ns, "--type=merge",
                        "-p", '{"spec": {"processor": "by-study"}}')
    wait_for(lambda: is_ready(rest, ns, "aet", "clara"), 5, "fixed AE title Ready")
    assert rest.config(ns)["aeTitles"]["clara"]["aeTitle"] == "RENAMED"

    # Invalid for the operator only (the model checks hosts precisely): the last valid version serves.
    k8s_cluster.kubectl("patch", "clarasource", "pacs", "-n", ns, "--type=merge", "-p", '{"spec": {"host": "bad..host"}}')
    cond = wait_for(lambda: is_ready(rest, ns, "src", "pacs", "InvalidSpec", "False"), 5, "host refused")
    assert "bad..host" in cond["message"] and "still served" in cond["message"]
    assert rest.config(ns)["sources"]["pacs"]["host"] == "10.20.0.0/16"

    # Deleting removes it from the configuration (and the finalizer lets it go).
    k8s_cluster.kubectl("delete", "clarasource", "pacs", "-n", ns, "--timeout=20s")
    assert "pacs" not in rest.config(ns)["sources"]
    wait_for(lambda: _cond(rest, ns, "aet", "clara", "SourcesResolved").get("reason") == "SourceNotFound",
             5, "allowedSources names a deleted source")


def _cond(rest: Rest, ns: str, short: str, name: str, ctype: str) -> dict:
    for cond in ((rest.obj(ns, short, name) or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return cond
    return {}


def test_restart_does_no_duplicate_work(k8s_cluster, rest, ns, operator, adapter):
    apply(k8s_cluster, ns, EXAMPLES)
    for short, name in [("aet", "clara"), ("jp", "by-study"), ("pipe", "liver-tumor")]:
        wait_for(lambda: is_ready(rest, ns, short, name), 10, f"{short}/{name} Ready")
    wait_for(lambda: operator.runs() >= 1, 5, "a reconcile")

    def snapshot():
        items = {}
        for short, plural in PLURALS.items():
            for item in rest.get(f"{GROUP_PATH}/namespaces/{ns}/{plural}")["items"]:
                items[(short, item["metadata"]["name"])] = (item["metadata"]["resourceVersion"], item["status"])
        cm = rest.get(f"/api/v1/namespaces/{ns}/configmaps/{CONFIG_MAP}")
        items["configmap"] = cm["metadata"]["resourceVersion"]
        return items

    before = snapshot()
    events_before = {e["metadata"]["uid"] for e in k8s_cluster.kubectl_json("get", "events", "-n", ns)["items"]}
    operator.stop()
    # Deleted while the operator is down: the restarted operator releases it.
    k8s_cluster.kubectl("delete", "clarasource", "storescu", "-n", ns, "--wait=false")
    operator.start()
    wait_for(lambda: rest.obj(ns, "src", "storescu") is None, 15, "no stuck finalizer")
    wait_for(lambda: "storescu" not in rest.config(ns)["sources"], 5, "deleted source leaves the configuration")
    wait_for(lambda: is_ready(rest, ns, "aet", "clara"), 5, "AE title Ready again")
    after = snapshot()
    # Objects untouched by the deletion kept their resourceVersion and status.
    for key in [("jp", "by-study"), ("pipe", "liver-tumor"), ("dst", "orthanc"), ("src", "pacs")]:
        assert after[key] == before[key], key
    events_after = k8s_cluster.kubectl_json("get", "events", "-n", ns)["items"]
    new = [e for e in events_after
           if e["metadata"]["uid"] not in events_before and e["involvedObject"]["name"] != "storescu"]
    assert all(e["involvedObject"]["name"] == "clara" for e in new), [(e["involvedObject"]["name"], e["reason"]) for e in new]

    # A plain restart with nothing changed writes nothing at all.
    steady = snapshot()
    operator.stop()
    operator.start()
    wait_for(lambda: operator.runs() >= 1, 10, "a reconcile after restart")
    assert snapshot() == steady


def test_namespace_deletion_is_not_blocked_by_finalizers(k8s_cluster, rest, operator, adapter):
    """The namespace controller deletes our objects (and the ConfigMaps) in any order;
    the finalizers must never keep the namespace in Terminating."""
    ns = operator.ns
    apply(k8s_cluster, ns, EXAMPLES)
    wait_for(lambda: is_ready(rest, ns, "aet", "clara"), 10, "example AE title Ready")
    if k8s_cluster.kubectl("get", "--raw", "/healthz", check=False).returncode != 0:
        pytest.skip("API server unhealthy")
    k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false")
    # Needs the namespace controller (kube-controller-manager), which the e2e cluster runs.
    wait_for(lambda: rest.get(f"/api/v1/namespaces/{ns}") is None, 60, f"namespace {ns} deleted", interval=0.5)
    assert "Traceback" not in operator.log()
