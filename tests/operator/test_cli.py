"""`clara-dicom operator` command line (no cluster needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clara_dicom.cli import build_parser


def test_arguments(monkeypatch):
    from clara_operator.cli import load

    for name in [k for k in os.environ if k.startswith("CLARA_")]:
        monkeypatch.delenv(name)
    s = load(build_parser().parse_args(["operator", "-n", "imaging", "--config-map", "cfg", "--liveness-port", "0"]))
    assert (s.namespace, s.allNamespaces, s.configMap, s.livenessPort) == ("imaging", False, "cfg", 0)
    s = load(build_parser().parse_args(["operator", "--all-namespaces", "--no-adapter-feedback"]))
    assert s.allNamespaces and not s.adapterFeedback
    assert s.configMap == "clara-dicom-adapter-config" and s.statusConfigMap == "clara-dicom-adapter-status"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "-n", "x", "-A"])


def test_environment_sets_what_flags_do_not(monkeypatch):
    from clara_operator.cli import load, runner_settings

    monkeypatch.setenv("CLARA_NAMESPACE", "from-env")
    monkeypatch.setenv("CLARA_RECONCILE_WORKERS", "7")
    monkeypatch.setenv("CLARA_DICOM_IMAGE", "old-name:1")  # deprecated name of CLARA_PREPARE_IMAGE
    monkeypatch.setenv("CLARA_NODE_SELECTOR", '{"gpu": "a100"}')
    monkeypatch.setenv("CLARA_ADAPTER_FEEDBACK", "false")
    s = load(build_parser().parse_args(["operator", "--workers", "9"]))
    assert (s.namespace, s.reconcileWorkers, s.prepareImage, s.adapterFeedback) == ("from-env", 9, "old-name:1", False)
    assert runner_settings(None, s).node_selector == {"gpu": "a100"}
    monkeypatch.setenv("CLARA_PREPARE_IMAGE", "new-name:2")  # the conventional name wins over the old one
    s = load(build_parser().parse_args(["operator", "-A"]))  # -A beats CLARA_NAMESPACE
    assert s.prepareImage == "new-name:2" and s.allNamespaces and not s.namespace


@pytest.mark.parametrize("argv, env, expected", [
    (["--workers", "0"], {}, "reconcileWorkers (from command line --workers; env CLARA_RECONCILE_WORKERS)"),
    ([], {"CLARA_LIVENESS_PORT": "http"}, "livenessPort (from environment variable CLARA_LIVENESS_PORT)"),
    ([], {"CLARA_TOLERATIONS": "[1"}, "tolerations (from environment variable CLARA_TOLERATIONS): not valid JSON"),
])
def test_bad_settings_are_one_line_with_exit_2(argv, env, expected):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLARA_")}, **env}
    res = subprocess.run([sys.executable, "-m", "clara_dicom.cli", "operator", *argv], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def _run(tmp_path, kubeconfig: dict | None):
    path = tmp_path / "kubeconfig"
    if kubeconfig is not None:
        path.write_text(json.dumps(kubeconfig))
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    return subprocess.run([sys.executable, "-m", "clara_dicom.cli", "operator", "-n", "x", "--liveness-port", "0"],
                          env={**env, "KUBECONFIG": str(path)}, capture_output=True, text=True, timeout=60)


def test_unreachable_api_is_a_one_line_error(tmp_path):
    res = _run(tmp_path, {
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:9", "insecure-skip-tls-verify": True}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
        "users": [{"name": "x", "user": {"token": "t"}}]})
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("clara-dicom operator: error: cannot reach the Kubernetes API at https://127.0.0.1:9")
    assert "Traceback" not in res.stderr


def test_missing_kubeconfig_is_a_one_line_error(tmp_path):
    res = _run(tmp_path, None)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("clara-dicom operator: error: no Kubernetes credentials")
    assert "Traceback" not in res.stderr


def test_api_requests_skip_netrc_and_proxy_lookups_unless_a_proxy_is_set(monkeypatch):
    """No thread-pool hop per request for ~/.netrc and the proxy variables (aiohttp's trust_env),
    unless the environment names a proxy: then it is honoured as before."""
    import asyncio

    from kubernetes_asyncio import client

    from clara_operator.cli import PROXY_VARIABLES, _direct

    async def trusts(env: dict[str, str]) -> bool:
        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        api_client = _direct(client.ApiClient(client.Configuration()))
        try:
            return api_client.rest_client.pool_manager.trust_env
        finally:
            await api_client.close()

    assert asyncio.run(trusts({})) is False
    assert asyncio.run(trusts({"HTTPS_PROXY": "http://proxy.example:3128"})) is True
