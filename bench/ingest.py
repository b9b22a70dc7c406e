#!/usr/bin/env python3
"""Ingest benchmark: dcmtk storescu -> {dcmtk storescp, Orthanc, clara-dicom adapter}.

One synthetic CT study (300 slices, 512x512, 16-bit, Explicit VR LE), sent
over one association and then over 4 parallel associations, to each receiver
in the same run. Prints seconds, instances/s and our ratio to each anchor.

    python bench/ingest.py [--slices 300] [--repeat 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from peers import LocalAdapter, Orthanc, StoreSCP, dcmtk, dcmtk_env, wait_for  # noqa: E402

CACHE = Path.home() / ".cache" / "clara-dicom" / "bench"

CONFIG = """
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraAETitle
metadata: {name: clara}
spec: {aeTitle: CLARA, processor: by-study}
---
apiVersion: dicom.clara.io/v1alpha1
kind: JobProcessor
metadata: {name: by-study}
spec: {groupBy: Study, timeout: 5, pipelines: {seg: seg}}
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraSource
metadata: {name: storescu}
spec: {aeTitle: STORESCU, host: 127.0.0.1}
"""


def study(slices: int) -> list[Path]:
    folder = CACHE / f"ct-{slices}x512x512-v1"
    files = sorted(folder.glob("*.dcm"))
    if len(files) != slices:
        from clara_dicom.synthetic import write_study

        shutil.rmtree(folder, ignore_errors=True)
        files = write_study(folder, slices=slices, patient_id="BENCH-0001")
    return files


def send(port: int, files: list[Path], parallel: int, called: str) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([dcmtk("storescu"), "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
                         env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def measure(name: str, port: int, files: list[Path], parallel: int, repeat: int, called: str,
            after: callable = None) -> float:
    times = []
    for _ in range(repeat):
        times.append(send(port, files, parallel, called))
        if after:
            after()
    best = min(times)
    print(f"  {name:<10} best {best:6.2f}s  median {statistics.median(times):6.2f}s  "
          f"{len(files) / best:7.0f} inst/s")
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = study(args.slices)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"study: {len(files)} instances, {mb:.0f} MB")
    with tempfile.TemporaryDirectory(prefix="clara-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(CONFIG)
        results: dict[tuple[str, int], float] = {}
        for parallel in (1, 4):
            print(f"{parallel} association(s):")
            scp = StoreSCP(tmp / f"storescp-{parallel}", fork=parallel > 1)
            try:
                results[("storescp", parallel)] = measure("storescp", scp.port, files, parallel, args.repeat, "ANY")
            finally:
                scp.stop()
            orthanc = Orthanc(tmp / f"orthanc-{parallel}")
            try:
                results[("orthanc", parallel)] = measure("orthanc", orthanc.dicom_port, files, parallel,
                                                         args.repeat, "ORTHANC")
            finally:
                orthanc.stop()
            adapter = LocalAdapter(tmp / "config.yaml", tmp / f"adapter-{parallel}", extra=["--log-level", "WARNING"])
            try:
                # Wait for each repetition's group to close so runs don't overlap in one group.
                def drained() -> None:
                    wait_for(lambda: adapter.status()["instancesHeld"] == 0, 60, what="group closed")

                results[("clara", parallel)] = measure("clara", adapter.dicom_port, files, parallel, args.repeat,
                                                       "CLARA", after=drained)
            finally:
                adapter.stop()
            ours = results[("clara", parallel)]
            print(f"  ratio (throughput, ours / anchor): vs storescp {results[('storescp', parallel)] / ours:.2f}x, "
                  f"vs Orthanc {results[('orthanc', parallel)] / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
