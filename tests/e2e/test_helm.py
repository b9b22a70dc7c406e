"""The Helm chart against the real control plane (issue 11).

`helm install` into a fresh namespace; then the operator and the adapter run as
local processes with kubeconfigs holding the chart's ServiceAccount tokens (from
the TokenRequest API, not the admin's certificate) and reconcile the example
manifests end to end: objects Ready, the adapter's applied version published, a
study sent over DICOM becoming a PipelineJob. The same tokens are refused what
they must not do. `helm upgrade` changes an object and keeps what the
components wrote; `helm uninstall` leaves nothing of the release but the CRDs.

Pods of the chart never execute here (kwok plays the node; the PVCs stay
Pending without a storage provisioner): the local processes play them.

Replicated (issue 16): installed with 2 adapters and 2 Results Services on a real
throw-away PostgreSQL (DSNs in Secrets), the Deployments, PodDisruptionBudgets,
rollout strategy and anti-affinity are checked as the API server stores them; then
two local adapter processes play the two adapter pods (the chart's token, the
environment of the stored Deployment with its Secrets resolved, one shared folder
as the ReadWriteMany volume) and share the PostgreSQL journal.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from peers import Process, adapter_command, free_port, wait_for  # noqa: E402
from postgres_server import postgres_server  # noqa: E402,F401 (fixture)

CHART = REPO / "charts" / "clara-dicom"
EXAMPLES = REPO / "examples" / "k8s"
RELEASE = "clara-dicom"
PREFIX = RELEASE  # the release name contains the chart name
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"

pytestmark = [pytest.mark.e2e]


@pytest.fixture(autouse=True)
def no_foreign_priority_classes(k8s_cluster):
    """Other e2e tests create the clara-dicom-* PriorityClasses by hand (pipeline pods
    need them); Helm refuses to adopt objects it did not create, so remove those
    before each chart test (the tests that need them re-apply them)."""
    items = k8s_cluster.kubectl_json("get", "priorityclasses", "-o", "json")["items"]
    for pc in items:
        name = pc["metadata"]["name"]
        managed = (pc["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "Helm"
        if name.startswith("clara-dicom-") and not managed:
            k8s_cluster.kubectl("delete", "priorityclass", name, "--wait=true")


def helm(cluster, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, **cluster.env}
    res = subprocess.run([cluster.tool("helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {res.returncode}:\n{res.stderr}")
    return res


def token_kubeconfig(cluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates with the ServiceAccount's token only."""
    cluster_entry = cluster.kubeconfig_json()["clusters"][0]["cluster"]
    token = cluster.service_account_token(namespace, service_account)
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "cluster", "cluster": cluster_entry}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "cluster", "user": service_account,
                                                "namespace": namespace}}],
    }))
    return path


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [
    [],
    ["--set", "rbac.clusterWide=true", "--set", "adapter.dicom.service.type=LoadBalancer",
     "--set", "adapter.dicom.service.loadBalancerSourceRanges[0]=10.0.0.0/8",
     "--set", "resultsService.database.existingSecret=pg", "--set", "adapter.persistence.existingClaim=shared",
     "--set", "networkPolicy.dicomFrom[0].ipBlock.cidr=10.20.0.0/16"],
    ["--set", "adapter.dicom.service.type=ClusterIP", "--set", "networkPolicy.enabled=false",
     "--set", "resultsService.enabled=false", "--set", "priorityClasses.create=false"],
    ["--set", "adapter.replicas=3", "--set", "adapter.journal.existingSecret=pg-journal",
     "--set", "resultsService.replicas=2", "--set", "resultsService.database.existingSecret=pg",
     "--set", "adapter.podAntiAffinity=required", "--set", "adapter.destinationSecrets={pacs-certs,pacs-token}"],
], ids=["defaults", "cluster-wide-loadbalancer", "minimal", "replicated"])
def test_lint_strict_and_server_dry_run(k8s_cluster, k8s_namespace, values):
    lint = helm(k8s_cluster, "lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in lint.stdout, lint.stdout
    rendered = helm(k8s_cluster, "template", RELEASE, str(CHART), "-n", k8s_namespace, "--include-crds",
                    *values).stdout
    res = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", k8s_namespace, "-f", "-", input=rendered,
                              check=False)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr  # e.g. unknown fields
    assert "(server dry run)" in res.stdout


@pytest.mark.parametrize("values, line", [
    (["--set", "adapter.replicas=2"], "- at '/adapter/journal/existingSecret': minLength: got 0, want 1"),
    (["--set", "resultsService.replicas=2"],
     "- at '/resultsService/database/existingSecret': minLength: got 0, want 1"),
])
def test_replicas_without_postgres_fail_install(k8s_cluster, k8s_namespace, values, line):
    res = helm(k8s_cluster, "install", RELEASE, str(CHART), "-n", k8s_namespace, *values, check=False)
    assert res.returncode != 0 and line in res.stderr.splitlines(), res.stderr
    assert helm(k8s_cluster, "list", "-n", k8s_namespace, "-q").stdout.strip() == ""  # nothing installed


def test_values_typo_fails_install(k8s_cluster, k8s_namespace):
    res = helm(k8s_cluster, "install", RELEASE, str(CHART), "-n", k8s_namespace, "--dry-run",
               "--set", "adapter.settings.watermarkPercnt=80", check=False)
    assert res.returncode != 0
    assert "watermarkPercnt" in res.stderr and "not allowed" in res.stderr


# ---------------------------------------------------------------------------


class ChartStack:
    """Operator and adapter as local processes, each with its chart ServiceAccount's token."""

    def __init__(self, cluster, ns: str, tmp: Path):
        self.cluster, self.ns, self.tmp = cluster, ns, tmp
        self.kubeconfigs = {c: token_kubeconfig(cluster, ns, f"{PREFIX}-{c}", tmp / f"{c}.kubeconfig")
                            for c in ("operator", "adapter", "results")}
        base = {k: v for k, v in __import__("os").environ.items()
                if not k.startswith(("KUBERNETES_", "CLARA_"))}
        self.dicom_port = free_port()
        self.operator = Process(adapter_command("operator", "--namespace", ns, "--liveness-port", "0"),
                                tmp / "operator.log", env={**base, "KUBECONFIG": str(self.kubeconfigs["operator"])})
        self.adapter = Process(adapter_command("adapter", "--namespace", ns, "--storage", str(tmp / "storage"),
                                               "--dicom-port", str(self.dicom_port), "--http-port", "0",
                                               "--host", "127.0.0.1"),
                               tmp / "adapter.log", env={**base, "KUBECONFIG": str(self.kubeconfigs["adapter"])})

    def token(self, component: str) -> str:
        return json.loads(self.kubeconfigs[component].read_text())["users"][0]["user"]["token"]

    def stop(self) -> None:
        for proc in (self.adapter, self.operator):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-6000:]}" for p in (self.operator, self.adapter))


def ready(cluster, ns: str, kind: str, name: str) -> bool:
    obj = cluster.kubectl_json("get", kind, name, "-n", ns)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


def config_map_data(cluster, ns: str, name: str) -> dict:
    return cluster.kubectl_json("get", "configmap", name, "-n", ns).get("data") or {}


def send_study(port: int, folder: Path) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    from clara_dicom.synthetic import write_study

    files = write_study(folder, slices=3, rows=16, cols=16, patient_id="PAT-HELM-1")
    ae = AE(ae_title="STORESCU")
    datasets = [dcmread(f) for f in files]
    for sop in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLARA")
    assert assoc.is_established, "association refused"
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def denied(cluster, token: str, method: str, path: str, body=None) -> bool:
    status, _ = cluster.request(method, path, body, token=token)
    return status == 403


def release_leftovers(cluster, ns: str) -> list[str]:
    kinds = ("all,configmaps,secrets,serviceaccounts,roles,rolebindings,persistentvolumeclaims,"
             "networkpolicies")
    left = cluster.kubectl("get", kinds, "-n", ns, "-l", INSTANCE, "-o", "name").stdout.split()
    left += cluster.kubectl("get", "priorityclasses,clusterroles,clusterrolebindings", "-l", INSTANCE,
                            "-o", "name").stdout.split()
    return left


def test_install_run_with_chart_tokens_upgrade_uninstall(k8s_cluster, k8s_namespace, tmp_path):
    cluster, ns = k8s_cluster, k8s_namespace
    helm(cluster, "install", RELEASE, str(CHART), "-n", ns)
    secret_name = f"{PREFIX}-results-token"
    token_before = cluster.kubectl_json("get", "secret", secret_name, "-n", ns)["data"]["token"]
    deployment = cluster.kubectl_json("get", "deployment", f"{PREFIX}-adapter", "-n", ns)
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CLARA_RESULTS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": "token"}
    assert cluster.kubectl_json("get", "service", f"{PREFIX}-adapter", "-n", ns)["spec"][
        "externalTrafficPolicy"] == "Local"

    stack = ChartStack(cluster, ns, tmp_path)
    try:
        # --- the README example, end to end, with the chart's RBAC only
        cluster.apply(EXAMPLES, namespace=ns)
        for kind, name in (("aet", "clara"), ("jp", "by-study"), ("pipe", "liver-tumor")):
            wait_for(lambda: ready(cluster, ns, kind, name), 60, interval=0.5, what=f"{kind}/{name} Ready")
        rendered = json.loads(config_map_data(cluster, ns, "clara-dicom-adapter-config")["config.json"])
        wait_for(lambda: config_map_data(cluster, ns, "clara-dicom-adapter-status").get("appliedVersion")
                 == rendered["version"], 20, interval=0.5, what="the adapter's applied version")
        send_study(stack.dicom_port, tmp_path / "study")
        jobs = wait_for(lambda: cluster.kubectl_json("get", "pipelinejobs", "-n", ns)["items"], 30, interval=0.5,
                        what="a PipelineJob created by the adapter")
        assert jobs[0]["spec"]["pipeline"] == "liver-tumor" and jobs[0]["spec"]["payload"]["instances"] == 3

        # --- what the same tokens must not do
        op, ad, rs = stack.token("operator"), stack.token("adapter"), stack.token("results")
        for token in (op, ad, rs):
            assert denied(cluster, token, "GET", "/api/v1/namespaces/kube-system/secrets")
            assert denied(cluster, token, "GET", "/api/v1/namespaces/default/configmaps")
            assert denied(cluster, token, "GET", f"/api/v1/namespaces/{ns}/secrets/{secret_name}")
            assert denied(cluster, token, "POST", "/api/v1/namespaces",
                          {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rbac-escape"}})
            assert denied(cluster, token, "POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                           "metadata": {"name": "rbac-escape"}, "rules": []})
            assert denied(cluster, token, "POST", "/apis/scheduling.k8s.io/v1/priorityclasses",
                          {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                           "metadata": {"name": "rbac-escape"}, "value": 1})
            assert denied(cluster, token, "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                          "pipelinejobs.dicom.clara.io")
        # the adapter: only its two ConfigMaps, and PipelineJobs create-only
        assert denied(cluster, ad, "GET", f"/api/v1/namespaces/{ns}/configmaps")
        assert denied(cluster, ad, "DELETE", f"/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/pipelinejobs/"
                      f"{jobs[0]['metadata']['name']}")
        assert denied(cluster, ad, "GET",
                      f"/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/claraaetitles")
        # the operator: no writes to the adapter's status ConfigMap, no Secrets, no pod exec
        assert denied(cluster, op, "GET", f"/api/v1/namespaces/{ns}/secrets")
        assert denied(cluster, op, "DELETE", f"/api/v1/namespaces/{ns}/configmaps/clara-dicom-adapter-status")
        assert denied(cluster, op, "POST", f"/api/v1/namespaces/{ns}/configmaps",
                      {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
        # the Results Service: nothing at all
        assert denied(cluster, rs, "GET", f"/api/v1/namespaces/{ns}/configmaps/clara-dicom-adapter-config")
        assert denied(cluster, rs, "GET", f"/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/pipelinejobs")

        # --- helm upgrade: a changed value changes the object; what the
        # components wrote and the generated token survive
        applied = config_map_data(cluster, ns, "clara-dicom-adapter-status")["appliedVersion"]
        helm(cluster, "upgrade", RELEASE, str(CHART), "-n", ns, "--set", "adapter.settings.watermarkPercent=70")
        deployment = cluster.kubectl_json("get", "deployment", f"{PREFIX}-adapter", "-n", ns)
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["CLARA_WATERMARK_PERCENT"] == "70"
        assert cluster.kubectl_json("get", "secret", secret_name, "-n", ns)["data"]["token"] == token_before
        assert config_map_data(cluster, ns, "clara-dicom-adapter-status")["appliedVersion"] == applied
        assert "config.json" in config_map_data(cluster, ns, "clara-dicom-adapter-config")

        # --- clean up our objects while the operator runs (its finalizers)
        cluster.kubectl("delete", "-n", ns, "-f", str(EXAMPLES), "--wait=true", timeout=60)
        cluster.kubectl("delete", "pipelinejobs", "--all", "-n", ns, "--wait=true", timeout=60)
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()

    # --- helm uninstall: nothing of the release left but the CRDs (by design)
    helm(cluster, "uninstall", RELEASE, "-n", ns, "--wait")
    wait_for(lambda: not release_leftovers(cluster, ns), 60, interval=0.5,
             what=f"no leftovers; still: {release_leftovers(cluster, ns)}")
    for name in ("clara-dicom-adapter-config", "clara-dicom-adapter-status"):
        assert cluster.kubectl("get", "configmap", name, "-n", ns, check=False).returncode != 0
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout
    assert "pipelinejobs.dicom.clara.io" in crds and "claraaetitles.dicom.clara.io" in crds


# --- replicas on PostgreSQL (issue 16) ------------------------------------------------

REPLICATED = ["--set", "adapter.replicas=2", "--set", "adapter.journal.existingSecret=journal-dsn",
              "--set", "resultsService.replicas=2", "--set", "resultsService.database.existingSecret=results-dsn",
              "--set", "adapter.destinationSecrets={pacs-certs}"]


def pod_environment(cluster, ns: str, container: dict) -> dict[str, str]:
    """What the kubelet would give the container: values, and Secret keys resolved."""
    import base64

    env = {}
    for var in container.get("env", []):
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if "value" in var:
            env[var["name"]] = var["value"]
        elif ref:
            data = cluster.kubectl_json("get", "secret", ref["name"], "-n", ns)["data"]
            env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
    return env


def adapter_status(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/status", timeout=5) as rsp:
        return json.loads(rsp.read())


def test_replicated_install_on_postgres(k8s_cluster, k8s_namespace, tmp_path, postgres_server):
    cluster, ns = k8s_cluster, k8s_namespace
    journal_dsn = postgres_server.fresh_database(f"journal_{ns.replace('-', '_')}")
    results_dsn = postgres_server.fresh_database(f"results_{ns.replace('-', '_')}")
    cluster.kubectl("create", "secret", "generic", "journal-dsn", "-n", ns, f"--from-literal=dsn={journal_dsn}")
    cluster.kubectl("create", "secret", "generic", "results-dsn", "-n", ns, f"--from-literal=dsn={results_dsn}")
    helm(cluster, "install", RELEASE, str(CHART), "-n", ns, *REPLICATED)

    # --- as the API server stores them
    for component, env_var, secret in (("adapter", "CLARA_JOURNAL", "journal-dsn"),
                                       ("results", "CLARA_RESULTS_DATABASE", "results-dsn")):
        spec = cluster.kubectl_json("get", "deployment", f"{PREFIX}-{component}", "-n", ns)["spec"]
        selector = spec["selector"]["matchLabels"]
        assert spec["replicas"] == 2, component
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        assert spec["template"]["spec"]["affinity"]["podAntiAffinity"] == {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}}]}
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert env[env_var]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "dsn"}
        pdb = cluster.kubectl_json("get", "poddisruptionbudget", f"{PREFIX}-{component}", "-n", ns)["spec"]
        assert pdb["maxUnavailable"] == 1 and pdb["selector"] == {"matchLabels": selector}
        # the ReplicaSet controller made two pods, which the budget selects
        label = ",".join(f"{k}={v}" for k, v in selector.items())
        wait_for(lambda: len(cluster.kubectl_json("get", "pods", "-n", ns, "-l", label)["items"]) == 2, 60,
                 interval=0.5, what=f"two {component} pods")
    pod = cluster.kubectl_json("get", "deployment", f"{PREFIX}-adapter", "-n", ns)["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"].endswith("/pacs-certs"))
    assert mount == {"name": mount["name"], "mountPath": "/var/lib/clara-dicom/secrets/pacs-certs", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": "pacs-certs", "defaultMode": 0o440}

    # --- two local processes play the two adapter pods: the chart's token, the stored
    # Deployment's environment (CLARA_JOURNAL from the Secret), one shared folder
    container = pod["containers"][0]
    env = {k: v for k, v in pod_environment(cluster, ns, container).items()
           if not k.startswith("CLARA_RESULTS_")}  # the in-cluster Results Service URL resolves nowhere here
    assert env["CLARA_JOURNAL"] == journal_dsn
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("KUBERNETES_", "CLARA_"))}
    kubeconfigs = {c: token_kubeconfig(cluster, ns, f"{PREFIX}-{c}", tmp_path / f"{c}.kubeconfig")
                   for c in ("operator", "adapter")}
    shared = tmp_path / "payload-volume"
    operator = Process(adapter_command("operator", "--namespace", ns, "--liveness-port", "0"),
                       tmp_path / "operator.log", env={**base, "KUBECONFIG": str(kubeconfigs["operator"])})
    adapters = []
    for i in range(2):
        dicom_port, http_port = free_port(), free_port()
        adapters.append(Process(
            adapter_command("adapter", "--namespace", ns, "--storage", str(shared), "--dicom-port",
                            str(dicom_port), "--http-port", str(http_port), "--host", "127.0.0.1"),
            tmp_path / f"adapter-{i}.log", env={**base, **env, "KUBECONFIG": str(kubeconfigs["adapter"])}))
        adapters[-1].dicom_port, adapters[-1].http_port = dicom_port, http_port
    try:
        cluster.apply(EXAMPLES, namespace=ns)
        for kind, name in (("aet", "clara"), ("jp", "by-study"), ("pipe", "liver-tumor")):
            wait_for(lambda: ready(cluster, ns, kind, name), 60, interval=0.5, what=f"{kind}/{name} Ready")
        # a quiet period long enough that the check on the other replica below is not a race
        def rendered_version() -> str:
            return json.loads(config_map_data(cluster, ns, "clara-dicom-adapter-config")["config.json"])["version"]

        before = rendered_version()
        cluster.kubectl("patch", "jp", "by-study", "-n", ns, "--type=merge", "-p", '{"spec": {"timeout": 20}}')
        version = wait_for(lambda: (v := rendered_version()) != before and v, 30, interval=0.5,
                           what="the configuration rendered with the new timeout")
        for a in adapters:
            wait_for(lambda: adapter_status(a.http_port)["configVersion"] == version, 30, interval=0.5,
                     what="both replicas applied the configuration")
        assert not (shared / "journal.sqlite").exists()  # the journal is PostgreSQL

        send_study(adapters[0].dicom_port, tmp_path / "study")
        # acknowledged by replica 0, held in the journal replica 1 reads as well
        assert adapter_status(adapters[1].http_port)["instancesHeld"] == 3
        jobs = wait_for(lambda: cluster.kubectl_json("get", "pipelinejobs", "-n", ns)["items"], 40, interval=0.5,
                        what="a PipelineJob created by the replicas")
        wait_for(lambda: all(adapter_status(a.http_port)["instancesHeld"] == 0 for a in adapters), 20,
                 interval=0.5, what="the group released in the shared journal")
        jobs = cluster.kubectl_json("get", "pipelinejobs", "-n", ns)["items"]
        assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
        assert jobs[0]["spec"]["pipeline"] == "liver-tumor" and jobs[0]["spec"]["payload"]["instances"] == 3
        assert all(a.alive() for a in adapters)

        cluster.kubectl("delete", "-n", ns, "-f", str(EXAMPLES), "--wait=true", timeout=60)
        cluster.kubectl("delete", "pipelinejobs", "--all", "-n", ns, "--wait=true", timeout=60)
    except BaseException:
        for proc in (operator, *adapters):
            print(f"--- {proc.log_path.name}\n{proc.log()[-6000:]}")
        raise
    finally:
        for proc in (*adapters, operator):
            proc.stop()
    helm(cluster, "uninstall", RELEASE, "-n", ns, "--wait")
    wait_for(lambda: not release_leftovers(cluster, ns), 60, interval=0.5,
             what=f"no leftovers; still: {release_leftovers(cluster, ns)}")


# --- destination Secrets in a real pod (issue 18) -------------------------------------

# Runs in the chart's adapter container: what the export agent does before it serves a
# TLS destination and a DICOMweb token destination (clara_adapter.export.agent
# .destination_problems), with the Secrets as the kubelet mounted them.
SECRETS_CHECK = """
import json, os, sys
from clara_dicom.models import DestinationTLS
from clara_adapter.export.secrets import SecretsDir, default_secrets_dir
from clara_adapter.export.tls import client_context
root = default_secrets_dir(sys.argv[1])
secrets = SecretsDir(root)
client_context(DestinationTLS.model_validate({"secretRef": {"name": "pacs-certs"}}), secrets)
files = ["pacs-certs/ca.crt", "pacs-certs/tls.crt", "pacs-certs/tls.key", "pacs-token/token"]
out = {"uid": os.getuid(), "token": secrets.read("pacs-token", "token").decode(),
       "files": {f: [oct(os.stat(root / f).st_mode & 0o777), os.stat(root / f).st_uid, os.stat(root / f).st_gid]
                 for f in files}}
try:
    open(root / "pacs-certs" / "written-by-adapter", "w")
    out["writable"] = True
except OSError:
    out["writable"] = False
open("/dev/termination-log", "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def chart_image(real_node) -> str:
    """The project's image (tools/image/build.sh, cached) in the real node's store."""
    from local_setup import IN_CI

    res = subprocess.run(["bash", str(REPO / "tools" / "image" / "build.sh")], capture_output=True, text=True,
                         timeout=3000)
    if res.returncode != 0:
        message = f"the image did not build: {res.stderr.strip()[-2000:]}"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    real_node.import_images(Path(out["archive"]))
    return out["image"]


@pytest.mark.realnode
def test_destination_secrets_readable_by_the_adapter_in_a_real_pod(k8s_cluster, real_node, chart_image,
                                                                   k8s_namespace, tmp_path):
    """The chart's adapter pod spec (securityContext, volumes, mounts) run by a real kubelet:
    the Secrets listed in adapter.destinationSecrets are where the export agent looks, the
    adapter's uid reads them (a TLS context with a client certificate is built, the token
    read), mode 0440 with group fsGroup, read-only."""
    import real_node as rn
    from export.tlscerts import CA

    cluster, ns = k8s_cluster, k8s_namespace
    ca = CA("e2e-pacs-ca")
    client = ca.issue("clara-scu", client=True)
    for name, files in (("pacs-certs", {"ca.crt": ca.pem, "tls.crt": client.cert_pem, "tls.key": client.key_pem}),
                        ("pacs-token", {"token": b"s3cret-token"})):
        folder = tmp_path / name
        folder.mkdir()
        args = []
        for key, data in files.items():
            (folder / key).write_bytes(data)
            args.append(f"--from-file={key}={folder / key}")
        cluster.kubectl("create", "secret", "generic", name, "-n", ns, *args)
    # The payload volume: a hostPath PV behind the chart's claim (as tests/e2e/test_real_node_loop.py).
    storage = tmp_path / "storage"
    storage.mkdir()
    import os

    os.chown(storage, 0, 10001)
    storage.chmod(0o2775)
    pv = f"payloads-{ns}"
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                   "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "e2e-hostpath",
                            "hostPath": {"path": str(storage), "type": "Directory"},
                            "claimRef": {"namespace": ns, "name": "payloads"}}})
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "payloads"},
                   "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "e2e-hostpath", "volumeName": pv,
                            "resources": {"requests": {"storage": "1Gi"}}}}, namespace=ns)
    repo, tag = chart_image.rsplit(":", 1)
    rendered = helm(cluster, "template", RELEASE, str(CHART), "-n", ns, "--set", f"image.repository={repo}",
                    "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
                    "--set", "adapter.persistence.existingClaim=payloads", "--set", "resultsService.enabled=false",
                    "--set", "adapter.destinationSecrets={pacs-certs,pacs-token}").stdout
    import yaml

    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"
                     and d["metadata"]["name"] == f"{PREFIX}-adapter"]
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    mount_path = next(m for m in container["volumeMounts"] if m["name"] == "storage")["mountPath"]
    # The chart's pod as it is, but for its command (the check) and what a one-shot pod needs.
    container.update(command=["python", "-c", SECRETS_CHECK], args=[mount_path])
    for probe in ("readinessProbe", "livenessProbe"):
        container.pop(probe)
    spec.pop("serviceAccountName")
    spec.update(restartPolicy="Never", automountServiceAccountToken=False, nodeSelector=rn.NODE_SELECTOR,
                tolerations=[rn.TOLERATION])
    spec.pop("affinity", None)
    cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "adapter-secrets"}, "spec": spec},
                  namespace=ns)
    try:
        def finished() -> dict | None:
            pod = cluster.kubectl_json("get", "pod", "adapter-secrets", "-n", ns)
            waiting = [(c["state"].get("waiting") or {}) for c in pod["status"].get("containerStatuses") or []]
            stuck = [w for w in waiting if w.get("reason") in ("CreateContainerConfigError", "CreateContainerError",
                                                                 "ErrImageNeverPull")]
            assert not stuck, stuck  # would never start: say why now
            return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

        pod = wait_for(finished, 180, interval=0.5, what="the check pod finished on the real node")
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        logs = cluster.kubectl("logs", "adapter-secrets", "-n", ns, check=False)
        assert term["exitCode"] == 0, (term, logs.stdout, logs.stderr)
        seen = json.loads(term["message"])
        assert seen["uid"] == 10001 and seen["token"] == "s3cret-token"
        for name, (mode, uid, gid) in seen["files"].items():
            assert (mode, uid, gid) == ("0o440", 0, 10001), name
        assert seen["writable"] is False
    finally:
        cluster.kubectl("delete", "pod", "adapter-secrets", "-n", ns, "--wait=true", "--timeout=60s", check=False)
        cluster.kubectl("delete", "pvc", "payloads", "-n", ns, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)
