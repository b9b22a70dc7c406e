"""The e2e control plane is a real one: real API server, real controllers, real RBAC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import k8s_cluster as kc

pytestmark = pytest.mark.e2e

TESTDATA = Path(__file__).resolve().parent / "testdata"


def test_server_reports_the_built_version(k8s_cluster):
    if not k8s_cluster.built:
        pytest.skip("not the cluster e2e/build.sh built")
    out = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    want = kc.versions()["K8S_VERSION"]
    server = out["serverVersion"]
    assert server["gitVersion"] == want
    assert (server["major"], server["minor"]) == ("1", want.split(".")[1])
    assert server["gitTreeState"] == "clean"
    assert out["clientVersion"]["gitVersion"] == want  # our kubectl, too
    # The API server itself, not only kubectl's view of it.
    status, body = k8s_cluster.request("GET", "/version")
    assert status == 200 and body["gitVersion"] == want


def test_every_component_runs(k8s_cluster):
    if not k8s_cluster.components:
        pytest.skip("cluster not started by this session")
    names = {c.name for c in k8s_cluster.components if c.alive()}
    assert names == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    node = k8s_cluster.kubectl_json("get", "node", kc.NODE_NAME)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"


def test_crd_is_established_and_explained(k8s_cluster, k8s_namespace):
    crd = "widgets.e2e.clara-dicom.io"
    k8s_cluster.apply(TESTDATA / "widget-crd.yaml")
    try:
        k8s_cluster.wait_crds_established([crd])
        conds = {c["type"]: c["status"] for c in k8s_cluster.kubectl_json("get", "crd", crd)["status"]["conditions"]}
        assert conds["Established"] == "True"
        assert conds["NamesAccepted"] == "True"

        # kubectl explain reads the published OpenAPI schema of the CRD.
        explained = kc.wait_until(
            lambda: (r := k8s_cluster.kubectl("explain", "widgets.spec", check=False)).returncode == 0 and r.stdout,
            60, "kubectl explain widgets.spec")
        assert "How many sprockets the widget holds" in explained
        assert "colour" in explained

        # Structural schema validation is the server's.
        good = {"apiVersion": "e2e.clara-dicom.io/v1alpha1", "kind": "Widget",
                "metadata": {"name": "w1"}, "spec": {"size": 3, "colour": "red"}}
        k8s_cluster.apply(good, namespace=k8s_namespace)
        got = k8s_cluster.kubectl_json("get", "wdg", "w1", "-n", k8s_namespace)
        assert got["spec"] == {"size": 3, "colour": "red"}
        bad = {**good, "metadata": {"name": "w2"}, "spec": {"size": 11, "colour": "mauve"}}
        res = k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", "-", input=json.dumps(bad), check=False)
        assert res.returncode != 0
        assert "spec.size" in res.stderr and "spec.colour" in res.stderr
    finally:
        k8s_cluster.kubectl("delete", "crd", crd, "--wait=false", check=False)


def _job(name: str, annotations: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "example.invalid/clara-pipeline:e2e",
                                    "command": ["/bin/true"]}],
                },
            },
        },
    }


def _job_pods(cluster, ns: str, job: str) -> list[dict]:
    return cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={job}")["items"]


def test_job_completes(k8s_cluster, k8s_namespace):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    k8s_cluster.apply(_job("ok"), namespace=k8s_namespace)
    k8s_cluster.kubectl("wait", "-n", k8s_namespace, "--for=condition=Complete", "job/ok", "--timeout=120s",
                        timeout=150)
    job = k8s_cluster.kubectl_json("get", "job", "ok", "-n", k8s_namespace)
    assert job["status"]["succeeded"] == 1
    (pod,) = _job_pods(k8s_cluster, k8s_namespace, "ok")
    assert pod["spec"]["nodeName"] == kc.NODE_NAME  # the scheduler bound it to the kwok node
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_job_configured_to_fail_fails(k8s_cluster, k8s_namespace):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    k8s_cluster.apply(_job("bad", {kc.OUTCOME_ANNOTATION: "fail", kc.EXIT_CODE_ANNOTATION: "3"}),
                      namespace=k8s_namespace)
    k8s_cluster.kubectl("wait", "-n", k8s_namespace, "--for=condition=Failed", "job/bad", "--timeout=120s",
                        timeout=150)
    job = k8s_cluster.kubectl_json("get", "job", "bad", "-n", k8s_namespace)
    failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
    assert failed[0]["reason"] == "BackoffLimitExceeded"
    assert not job["status"].get("succeeded")
    (pod,) = _job_pods(k8s_cluster, k8s_namespace, "bad")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_held_pod_runs_until_told(k8s_cluster, k8s_namespace):
    """The pattern the harness uses to play a container: hold, then succeed."""
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    ns = k8s_namespace
    k8s_cluster.apply(_job("held", {kc.OUTCOME_ANNOTATION: "hold"}), namespace=ns)

    def running_pod():
        pods = _job_pods(k8s_cluster, ns, "held")
        return pods and pods[0]["status"].get("phase") == "Running" and pods[0]["metadata"]["name"]

    pod = kc.wait_until(running_pod, 120, "the held Job's pod Running")
    job = k8s_cluster.kubectl_json("get", "job", "held", "-n", ns)
    assert job["status"].get("active") == 1 and not job["status"].get("conditions")
    k8s_cluster.kubectl("annotate", "-n", ns, f"pod/{pod}", f"{kc.OUTCOME_ANNOTATION}=succeed", "--overwrite")
    k8s_cluster.kubectl("wait", "-n", ns, "--for=condition=Complete", "job/held", "--timeout=120s", timeout=150)


def test_service_account_gets_what_its_role_allows_and_no_more(k8s_cluster, k8s_namespace):
    ns = k8s_namespace
    k8s_cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}}, namespace=ns)
    k8s_cluster.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "configmap-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
    }, namespace=ns)
    k8s_cluster.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
    }, namespace=ns)
    k8s_cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                       "data": {"k": "v"}}, namespace=ns)

    token = k8s_cluster.service_account_token(ns, "reader", seconds=600)  # TokenRequest API

    # The token authenticates as the ServiceAccount.
    status, review = k8s_cluster.request(
        "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}, token=token)
    assert status == 201, review
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"

    # What the Role allows.
    status, body = k8s_cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps", token=token)
    assert status == 200, body
    assert "settings" in [i["metadata"]["name"] for i in body["items"]]
    status, body = k8s_cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps/settings", token=token)
    assert status == 200 and body["data"] == {"k": "v"}

    # Everything else is denied by RBAC.
    denied = [
        ("GET", f"/api/v1/namespaces/{ns}/secrets", None),                        # another resource
        ("POST", f"/api/v1/namespaces/{ns}/configmaps",                           # another verb
         {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nope"}}),
        ("DELETE", f"/api/v1/namespaces/{ns}/configmaps/settings", None),
        ("GET", "/api/v1/namespaces/default/configmaps", None),                   # another namespace
        ("GET", "/api/v1/nodes", None),                                           # cluster scope
    ]
    for method, path, body in denied:
        status, resp = k8s_cluster.request(method, path, body, token=token)
        assert status == 403, (method, path, status, resp)
        assert resp["reason"] == "Forbidden"
        assert f"system:serviceaccount:{ns}:reader" in resp["message"]
    # ... and nothing was changed by the denied calls.
    assert k8s_cluster.kubectl("get", "configmap", "settings", "-n", ns, check=False).returncode == 0
    assert k8s_cluster.kubectl("get", "configmap", "nope", "-n", ns, check=False).returncode != 0

    # A forged token is not a user at all.
    status, _ = k8s_cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps", token=token[:-4] + "AAAA")
    assert status == 401


async def test_python_client_as_admin(k8s_cluster, k8s_namespace):
    """The fixture's client config works for kubernetes_asyncio (what the operator uses)."""
    from kubernetes_asyncio import client

    cfg = await k8s_cluster.kubernetes_asyncio_configuration()
    async with client.ApiClient(configuration=cfg) as api:
        core = client.CoreV1Api(api)
        ns = await core.read_namespace(k8s_namespace)
        assert ns.status.phase == "Active"
        await core.create_namespaced_config_map(
            k8s_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="from-python"), data={"a": "b"}))
    assert k8s_cluster.kubectl_json("get", "cm", "from-python", "-n", k8s_namespace)["data"] == {"a": "b"}

    if not k8s_cluster.external:  # the PEM files the built cluster hands out
        conf = k8s_cluster.admin_client_config()
        c2 = client.Configuration(host=conf["host"])
        c2.ssl_ca_cert, c2.cert_file, c2.key_file = conf["ca_file"], conf["cert_file"], conf["key_file"]
        async with client.ApiClient(configuration=c2) as api:
            version = await client.VersionApi(api).get_code()
            assert version.git_version == k8s_cluster.version


def test_helm_installs_a_chart(k8s_cluster, k8s_namespace, tmp_path):
    """The built helm talks to the real API server; kwok makes the Deployment available."""
    if not k8s_cluster.kwok:
        pytest.skip("needs kwok to make pods Ready without images")
    import subprocess

    helm = k8s_cluster.tool("helm")
    env = {**k8s_cluster.env, "HOME": str(tmp_path), "HELM_CACHE_HOME": str(tmp_path / "cache"),
           "HELM_CONFIG_HOME": str(tmp_path / "config"), "HELM_DATA_HOME": str(tmp_path / "data")}

    def run(*args):
        res = subprocess.run([helm, *args], env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert run("version", "--template", "{{.Version}}") == kc.versions()["HELM_VERSION"]
    run("create", str(tmp_path / "demo"))
    run("install", "demo", str(tmp_path / "demo"), "-n", k8s_namespace, "--wait", "--timeout", "120s")
    deploy = k8s_cluster.kubectl_json("get", "deployment", "demo", "-n", k8s_namespace)
    assert deploy["status"]["availableReplicas"] == 1
    assert json.loads(run("list", "-n", k8s_namespace, "-o", "json"))[0]["status"] == "deployed"
