"""The real Kubernetes control plane for the e2e tests (see e2e/k8s_cluster.py).

Fixtures:

``k8s_cluster`` (session)
    Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
    kwok with one fake Node on free loopback ports (binaries from
    e2e/build.sh, which runs first if one is missing), applies ``crds/*.yaml``
    and waits until they are Established; tears everything down at the end of
    the session, failed tests or not.  Given ``KUBECONFIG`` (or
    ``CLARA_DICOM_E2E_KUBECONFIG``) it uses that cluster and starts nothing.
    Yields an ``e2e/k8s_cluster.py`` ``Cluster``:

      .kubeconfig, .bin_dir, .workdir, .env ({"KUBECONFIG", "PATH"}), .server
      .kubectl(*args, input=None, check=True) -> CompletedProcess
      .kubectl_json(*args), .apply(yaml | dict | Path, namespace=None)
      .admin_client_config() -> {host, kubeconfig, ca_file, cert_file, key_file}
      await .kubernetes_asyncio_configuration()
      .request(method, path, body=None, token=None) -> (status, json)
      .service_account_token(namespace, name)   (TokenRequest API)
      .kwok (pods follow e2e/kwok-stages.yaml), .built, .external, .log_tails()

``k8s_namespace`` (function)
    A fresh namespace, deleted after the test.

``real_node`` (session)
    containerd + a kubelet as node ``localhost`` of ``k8s_cluster``
    (e2e/real_node.py): pods with ``real_node.TOLERATION`` and
    ``real_node.NODE_SELECTOR`` (both from the module ``real_node``) really run,
    from images imported out of archives (the node's busybox test images, and
    ``CLARA_DICOM_IMAGE_ARCHIVES``, colon-separated).  Reuses the node of an
    ``e2e/cluster up --real-node`` cluster.  Where the node cannot start, its
    tests skip with the reason, except in CI (CI=true), where that is a
    failure.  At the end its pods are deleted, kubelet and containerd stopped,
    and a leftover (mount, cgroup, link, process...) fails the session.
    Tests using it are marked ``realnode``.

A failing test under tests/e2e gets the tails of the components' logs in its
report; the full logs stay in the session's tmp dir (``<workdir>/logs``).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parents[2] / "e2e"
if str(E2E_DIR) not in sys.path:
    sys.path.insert(0, str(E2E_DIR))

import k8s_cluster as kc  # noqa: E402
import real_node as rn  # noqa: E402

_SESSION: dict = {}
IN_CI = os.environ.get("CI", "").lower() == "true"  # as tests/local_setup.py
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if "real_node" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.realnode)


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory):
    error = None
    try:
        given = kc.given_kubeconfig()
    except kc.ClusterError as exc:
        given, error = None, str(exc)
    if given is not None:
        try:
            cluster = kc.connect(given)
        except kc.ClusterError as exc:
            error = f"cannot use the cluster of {given}: {exc}"
        if error is None:
            _SESSION["cluster"] = cluster
            yield cluster
            return
    if error:
        pytest.fail(error, pytrace=False)

    workdir = tmp_path_factory.mktemp("k8s")
    try:
        cluster = kc.start(workdir)
    except kc.ClusterError as exc:
        error = f"the e2e control plane did not start: {exc}"
    if error:
        pytest.fail(error, pytrace=False)  # outside `except`: the logs once, not chained twice
    _SESSION["cluster"] = cluster
    try:
        yield cluster
    finally:
        _SESSION.pop("cluster", None)
        cluster.stop()


@pytest.fixture
def k8s_namespace(k8s_cluster):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    # Pods need the namespace's "default" ServiceAccount (made by the controller-manager).
    kc.wait_until(lambda: k8s_cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
                  60, f"ServiceAccount {name}/default", alive=k8s_cluster.alive_check)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def image_archives() -> list[Path]:
    return [Path(p) for p in os.environ.get("CLARA_DICOM_IMAGE_ARCHIVES", "").split(os.pathsep) if p]


@pytest.fixture(scope="session")
def real_node(k8s_cluster):
    existing = rn.RealNode.from_state(k8s_cluster) if k8s_cluster.built else None
    if existing and existing.components and all(c.alive() for c in existing.components):
        existing.import_images(*image_archives())  # started by `e2e/cluster up --real-node`: left running
        _SESSION["node"] = existing
        yield existing
        return
    error = None
    try:
        if k8s_cluster.external:
            raise rn.RealNodeUnavailable("the given cluster was not started by e2e/ (no real node to add)")
        node = rn.RealNode(k8s_cluster).start(image_archives())
    except rn.RealNodeUnavailable as exc:
        error = str(exc)
    if error:
        if IN_CI:
            pytest.fail(f"the real node is required in CI but did not start: {error}", pytrace=False)
        pytest.skip(f"no real node here: {error.splitlines()[0]}")
    print(f"\n[real_node] node {node.name} Ready {node.ready_seconds:.1f}s after the kubelet started",
          file=sys.stderr)
    _SESSION["node"] = node
    try:
        yield node
    finally:
        _SESSION.pop("node", None)
        left = node.stop()
        if left:
            pytest.fail("the real node left things behind:\n  " + "\n  ".join(left), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    cluster = _SESSION.get("cluster")
    if cluster is not None and rep.failed and cluster.components:
        rep.sections.append((f"k8s control plane logs ({cluster.logs_dir})", cluster.log_tails(25)))
    node = _SESSION.get("node")
    if node is not None and rep.failed and node.components:
        rep.sections.append((f"real node logs ({node.layout.logs})", node.log_tails(25)))
