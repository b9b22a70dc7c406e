#!/usr/bin/env python3
"""Job latency: last instance acknowledged -> PipelineJob visible, minus the timeout.

20 groups (one small study each, sent 0.3 s apart so their deadlines are
staggered) to `clara-dicom up`; the jobs folder is polled every 5 ms. Prints
p50/p95/max, and the adapter's own deadline->created histogram.

    python bench/job_latency.py [--groups 20] [--timeout 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from local_setup import write_config  # noqa: E402
from peers import LocalAdapter, dcmtk, dcmtk_env, metric_value  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=5)
    args = ap.parse_args()
    from clara_dicom.synthetic import write_study

    with tempfile.TemporaryDirectory(prefix="clara-latency-") as tmp:
        tmp = Path(tmp)
        studies = [write_study(tmp / f"study{i}", slices=5, rows=64, cols=64, patient_id=f"P{i}")
                   for i in range(args.groups)]
        config = write_config(tmp / "cfg", processor=f"pipelines: {{seg: seg}}\ntimeout: {args.timeout}")
        adapter = LocalAdapter(config, tmp / "state", extra=["--log-level", "WARNING"])
        try:
            acked: dict[str, float] = {}  # study uid -> time storescu returned
            import pydicom

            def send(i: int) -> None:
                files = studies[i]
                subprocess.run([dcmtk("storescu"), "-aec", "CLARA", "127.0.0.1", str(adapter.dicom_port),
                                *map(str, files)], check=True, env=dcmtk_env(), capture_output=True)
                acked[pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID] = time.time()

            seen: dict[str, float] = {}
            jobs_dir = adapter.state / "jobs"
            done = threading.Event()

            def poll() -> None:  # runs while studies are still being sent
                while not done.is_set():
                    for path in jobs_dir.glob("[!.]*.json"):
                        if path.name not in seen:
                            seen[path.name] = time.time()
                    time.sleep(0.005)

            poller = threading.Thread(target=poll)
            poller.start()
            threads = []
            for i in range(args.groups):
                t = threading.Thread(target=send, args=(i,))
                t.start()
                threads.append(t)
                time.sleep(0.3)
            for t in threads:
                t.join()
            end = time.time() + args.timeout + 30
            while len(seen) < args.groups and time.time() < end:
                time.sleep(0.05)
            done.set()
            poller.join()
            latencies = []
            for name, at in seen.items():
                job = json.loads((jobs_dir / name).read_text())
                latencies.append(at - acked[job["spec"]["group"]["value"]] - args.timeout)
            latencies.sort()
            p95 = latencies[max(0, int(round(0.95 * len(latencies))) - 1)]
            print(f"{len(latencies)} groups, timeout {args.timeout}s: job latency beyond the timeout "
                  f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
                  f"max {latencies[-1] * 1000:.0f} ms (target <= 500 ms)")
            m = adapter.metrics()
            total = metric_value(m, "clara_job_creation_latency_seconds_sum")
            count = metric_value(m, "clara_job_creation_latency_seconds_count")
            print(f"adapter's own deadline->created mean: {total / max(count, 1) * 1000:.1f} ms over {count:.0f} jobs")
        finally:
            adapter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
