"""`clara-dicom operator` command line (no cluster needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clara_dicom.cli import build_parser


def test_arguments():
    args = build_parser().parse_args(["operator", "-n", "imaging", "--config-map", "cfg", "--liveness-port", "0"])
    assert (args.namespace, args.all_namespaces, args.config_map, args.liveness_port) == ("imaging", False, "cfg", 0)
    args = build_parser().parse_args(["operator", "--all-namespaces", "--no-adapter-feedback"])
    assert args.all_namespaces and args.no_adapter_feedback
    assert args.config_map == "clara-dicom-adapter-config" and args.status_config_map == "clara-dicom-adapter-status"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "-n", "x", "-A"])


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
