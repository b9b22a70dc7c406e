"""A bounded run of bench/operator_scale.py (the whole bench is too long for CI): a burst
of 24 PipelineJobs across the four priorities on 2 kwok nodes, 1 with GPUs; every one
must succeed with exactly one pipeline Job, and the report must carry its figures. Speed
is the bench's business, not asserted here."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_operator_scale_bench_smoke(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "operator_scale.py"), "--jobs", "24", "--nodes", "2",
                          "--gpu-nodes", "1", "--timeout", "120"], capture_output=True, text=True, env=env,
                         timeout=240)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert re.search(r"PipelineJob created -> Job created \(24/24\)", out), out
    assert "24/24 Succeeded" in out, out
    assert "method: the kube-apiserver's audit log" in out, out  # the server-side latency, and where it went:
    assert re.search(r"queued in the operator \(waiting for a free worker\): [\d.]+s / [\d.]+s", out), out
    assert re.search(r"of which the kube-apiserver's own handling \(audit\): [\d.]+s / [\d.]+s", out), out
    assert "Job creates: 24 POST jobs for 24 PipelineJobs" in out, out  # one pipeline Job each, none twice
    assert re.search(r"service-accounts: [\d.]+ per PipelineJob", out), out  # the operator's own requests
    assert re.search(r"operator RSS \d+ MB", out), out
