#!/usr/bin/env python3
"""What `fsyncFiles` costs on the adapter's store-and-commit path.

Runs the adapter's own path without the network — header scan, Part 10 file
written and renamed, processor decision and journal commit (group commit) —
for N instances from T threads (as the receive side's executor calls it),
with fsyncFiles off (the anchor, same run) and on (file fsync + directory fsync
per batch + journal synchronous=FULL). Prints instances/s, commits (batches)
and the ratio on/off. Storage goes to --dir (default: a temp folder under
~/.cache/clara-dicom, i.e. the disk the adapter would use, not tmpfs).

    python bench/fsync_cost.py [--instances 300] [--kb 512] [--threads 1 4] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from clara_dicom.config import resolve  # noqa: E402
from clara_dicom.synthetic import ct_slice  # noqa: E402

from clara_adapter.ingest import SUCCESS, Ingest  # noqa: E402
from clara_adapter.journal import Journal  # noqa: E402
from clara_adapter.metrics import AdapterMetrics  # noqa: E402
from clara_adapter.processors.base import ProcessorContext  # noqa: E402
from clara_adapter.storage import InstanceStore  # noqa: E402
from clara_adapter.submitter import JobSubmitter  # noqa: E402
from clara_adapter.timers import ThreadScheduler  # noqa: E402
from test_processor_unit import MemorySink, encode, manifests  # noqa: E402


def datasets(n: int, kb: int) -> list[tuple[str, str, memoryview]]:
    side = max(8, int((kb * 1024 / 2) ** 0.5))
    out = []
    for i in range(n):
        ds = ct_slice("BENCH", "1.2.3", "1.2.3.4", i, rows=side, cols=side)
        out.append((ds.SOPClassUID, ds.SOPInstanceUID, memoryview(encode(ds))))
    return out


def run(root: Path, items, threads: int, fsync: bool) -> tuple[float, int]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sched = ThreadScheduler()
    journal = Journal(root / "journal.sqlite", durable=fsync)
    submitter = JobSubmitter(MemorySink(), root / "payloads", sched, journal)
    ingest = Ingest(ProcessorContext("default", journal, sched, submitter, AdapterMetrics()),
                    InstanceStore(root / "incoming", fsync=fsync))
    ingest.apply_config(resolve(manifests({"pipelines": {"seg": "p"}, "timeout": 3600})).config)
    route = ingest.routes["CLARA"]
    chunks = [items[i::threads] for i in range(threads)]
    failures = []

    def worker(chunk) -> None:
        for cls, sop, data in chunk:
            status = ingest.store_instance(route, "STORESCU", cls, sop, ExplicitVRLittleEndian, data)
            if status != SUCCESS:
                failures.append(status)

    commits = journal.commits
    start = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    commits = journal.commits - commits
    sched.stop()
    submitter.stop()
    journal.close()
    if failures:
        raise SystemExit(f"{len(failures)} stores failed: {failures[:3]}")
    return elapsed, commits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--kb", type=int, default=512, help="size of each instance")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path.home() / ".cache" / "clara-dicom" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fsync-", dir=base))
    items = datasets(args.instances, args.kb)
    print(f"{args.instances} instances of {len(items[0][2]) // 1024} KB; storage on {work} "
          f"(load {os.getloadavg()[0]:.2f})")
    try:
        for threads in args.threads:
            times = {False: [], True: []}
            commits = {False: [], True: []}
            for _ in range(args.repeat):
                for fsync in (False, True):  # interleaved, so load drifts hit both alike
                    t, c = run(work / "run", items, threads, fsync)
                    times[fsync].append(t)
                    commits[fsync].append(c)
            off, on = statistics.median(times[False]), statistics.median(times[True])
            print(f"threads={threads}: fsync off {args.instances / off:8.0f} inst/s ({off * 1000 / args.instances:.2f} "
                  f"ms each, {statistics.median(commits[False]):.0f} commits) | fsync on {args.instances / on:8.0f} "
                  f"inst/s ({on * 1000 / args.instances:.2f} ms each, {statistics.median(commits[True]):.0f} commits)"
                  f" | on/off throughput {off / on:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
