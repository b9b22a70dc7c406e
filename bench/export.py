#!/usr/bin/env python3
"""Export benchmark: our SCU export agent -> Orthanc vs dcmtk storescu -> Orthanc.

The same synthetic CT study (300 slices, 512x512, 16-bit, Explicit VR LE; the
cache of bench/ingest.py) goes to a fresh Orthanc each run: once with dcmtk's
storescu (one association, TCP_NODELAY=1), once through the agent (registered in
an in-process Results Service as ``--tasks`` tasks, default 1 = one association;
timed from registration until every task is Succeeded). Runs alternate, and the
best of ``--repeat`` is compared. Orthanc runs with TCP_NODELAY=1 (tests/peers.py),
as every dcmtk-based peer must. CPU seconds (user+sys) are printed too: storescu's
process, and this whole process for the agent (Results Service included) — on a
loaded machine they say more than the wall clock.

    python bench/export.py [--slices 300] [--repeat 2] [--tasks 1]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from ingest import study  # noqa: E402
from peers import Orthanc, dcmtk, dcmtk_env, wait_for  # noqa: E402

TOKEN = "bench-token"


def link_or_copy(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        dst = folder / f.name
        try:
            os.link(f, dst)
        except OSError:
            shutil.copyfile(f, dst)
        out.append(dst)
    return out


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


CPU: dict[str, list[float]] = {"storescu": [], "agent": []}


def run_storescu(tmp: Path, files: list[Path], run: int, tasks: int = 1) -> float:
    """The anchor: as many storescu processes (associations) as the agent has tasks, each its share."""
    orthanc = Orthanc(tmp / f"orthanc-storescu-{run}")
    try:
        cpu = cpu_seconds(resource.RUSAGE_CHILDREN)  # Orthanc is waited for only later, at stop()
        start = time.perf_counter()
        procs = [subprocess.Popen([dcmtk("storescu"), "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
                                   *map(str, files[i::tasks])], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for i in range(tasks)]
        errors = [p.communicate()[1] for p in procs]
        seconds = time.perf_counter() - start
        CPU["storescu"].append(cpu_seconds(resource.RUSAGE_CHILDREN) - cpu)
        for p, err in zip(procs, errors):
            if p.returncode != 0:
                raise RuntimeError(f"storescu failed: {err[-500:]}")
        assert orthanc.count_instances() == len(files), "Orthanc is missing instances"
        return seconds
    finally:
        orthanc.stop()


def run_agent(tmp: Path, files: list[Path], run: int, tasks: int) -> float:
    from clara_adapter.export import ExportAgent
    from clara_adapter.metrics import AdapterMetrics
    from clara_adapter.settings import AdapterSettings
    from clara_dicom.config import RenderedConfig
    from clara_dicom.models import ClaraDestinationSpec
    from clara_results.client import ResultsClient
    from clara_results.server import ResultsServer

    work = tmp / f"agent-{run}"
    work.mkdir()
    settings = AdapterSettings(storageDir=str(work / "state"), exportPollSeconds=0.05,
                               exportConcurrency=max(1, tasks))
    payload = settings.payloads_dir / "bench-payload"
    linked = link_or_copy(files, payload / "output")
    uris = [p.relative_to(payload).as_posix() for p in linked]
    orthanc = Orthanc(work / "orthanc")
    results = ResultsServer(port=0, database=str(work / "results.sqlite"), token=TOKEN).start()
    config = RenderedConfig(destinations={
        "orthanc": ClaraDestinationSpec(aeTitle="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)})
    agent = ExportAgent.connect(settings, lambda: config, AdapterMetrics(), results.url, TOKEN).start()
    client = ResultsClient(results.url, TOKEN)
    try:
        cpu = cpu_seconds(resource.RUSAGE_SELF)
        start = time.perf_counter()
        ids = [client.create_task(job_id=f"bench-{i}", pipeline_id="bench", payload_id="bench-payload",
                                  agent="ClaraSCU", uris=uris[i::tasks], parameters=json.dumps("Orthanc")).id
               for i in range(tasks)]

        def done() -> bool:  # read the store directly: HTTP polls would cost the agent CPU
            states = [results.store.get(i).state for i in ids]
            if any(int(s) == 4 for s in states):
                raise RuntimeError("export task failed; see the log")
            return all(int(s) == 3 for s in states)

        wait_for(done, 600, interval=0.01, what="export tasks succeeded")
        seconds = time.perf_counter() - start
        CPU["agent"].append(cpu_seconds(resource.RUSAGE_SELF) - cpu)
        assert orthanc.count_instances() == len(files), "Orthanc is missing instances"
        return seconds
    finally:
        agent.stop()
        client.close()
        results.stop()
        orthanc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=1, help="split the study over N tasks (N parallel associations; the anchor runs N storescu)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    files = study(args.slices)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"study: {len(files)} instances, {mb:.0f} MB; Orthanc (fresh each run) on 127.0.0.1; "
          f"agent: {args.tasks} task(s)")
    ours: list[float] = []
    theirs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="clara-bench-export-") as tmp:
        tmp = Path(tmp)
        for run in range(args.repeat):
            # alternate the order so neither side always runs on a warmer machine
            order = ("storescu", "agent") if run % 2 == 0 else ("agent", "storescu")
            for who in order:
                if who == "storescu":
                    theirs.append(run_storescu(tmp, files, run, args.tasks))
                    print(f"  run {run + 1}: storescu -> Orthanc {theirs[-1]:6.2f}s "
                          f"({len(files) / theirs[-1]:5.1f} inst/s), cpu {CPU['storescu'][-1]:.2f}s")
                else:
                    ours.append(run_agent(tmp, files, run, args.tasks))
                    print(f"  run {run + 1}: agent    -> Orthanc {ours[-1]:6.2f}s "
                          f"({len(files) / ours[-1]:5.1f} inst/s), cpu {CPU['agent'][-1]:.2f}s")
    best_ours, best_theirs = min(ours), min(theirs)
    print(f"best: agent {best_ours:.2f}s, storescu {best_theirs:.2f}s; median: agent "
          f"{statistics.median(ours):.2f}s, storescu {statistics.median(theirs):.2f}s")
    print(f"ratio (throughput, agent / storescu): {best_theirs / best_ours:.2f}x (target >= 0.8x); "
          f"cpu (median): agent {statistics.median(CPU['agent']):.2f}s, storescu "
          f"{statistics.median(CPU['storescu']):.2f}s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
