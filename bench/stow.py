#!/usr/bin/env python3
"""STOW-RS benchmark: one study pushed in one chunked request to the clara-dicom
adapter's STOW-RS and to Orthanc's own (DICOMweb plugin), in the same run.

Two clients, each against both receivers:
  * http   - a streaming Python client (http.client, chunked, 1 MiB reads);
  * orthanc - Orthanc's DICOMweb plugin pushing with /dicom-web/servers/{name}/stow,
             as a site would (the study is uploaded to that Orthanc first, untimed).
Orthanc runs with TCP_NODELAY=1. Prints seconds, instances/s, MB/s and the
throughput ratio ours / Orthanc's.

    python bench/stow.py [--slices 300] [--repeat 3]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from ingest import bench_config, study  # noqa: E402  (the cached 300-slice CT study, its adapter config)
from orthanc_dicomweb import OrthancWeb  # noqa: E402
from peers import LocalAdapter, wait_for  # noqa: E402

TOKEN = "bench-token"
BOUNDARY = "clara-bench-boundary-0123456789"
CONFIG = bench_config("dicomweb", "DICOMWEB")


def body(files: list[Path]) -> Iterator[bytes]:
    for f in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--".encode()


def http_push(port: int, path: str, files: list[Path], token: str | None) -> float:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
               "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, body=body(files), headers=headers, encode_chunked=True)
    rsp = conn.getresponse()
    answer = json.loads(rsp.read())
    conn.close()
    elapsed = time.perf_counter() - start
    stored = len(answer.get("00081199", {}).get("Value", []))
    if rsp.status != 200 or stored != len(files):
        raise RuntimeError(f"STOW-RS to :{port}{path} answered {rsp.status} with {stored}/{len(files)} stored")
    return elapsed


def orthanc_push(client: OrthancWeb, server: str, study_id: str) -> float:
    start = time.perf_counter()
    status, answer = client.call("POST", f"/dicom-web/servers/{server}/stow",
                                 json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"Orthanc's STOW-RS client to {server} failed ({status}): {answer}")
    return elapsed


def measure(name: str, push: Callable[[], float], reset: Callable[[], None], n: int, mb: float,
            repeat: int) -> float:
    times = []
    for _ in range(repeat):
        times.append(push())
        reset()
    best = min(times)
    print(f"  {name:<8} best {best:6.2f}s  median {statistics.median(times):6.2f}s  "
          f"{n / best:6.0f} inst/s  {mb / best:6.0f} MB/s")
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = study(args.slices)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"study: {len(files)} instances, {mb:.0f} MB; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="clara-bench-stow-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(CONFIG)
        adapter = LocalAdapter(tmp / "config.yaml", tmp / "adapter", extra=["--log-level", "WARNING"],
                               env={**os.environ, "CLARA_STOW_TOKEN": TOKEN})
        target = OrthancWeb(tmp / "orthanc-target")
        client = OrthancWeb(tmp / "orthanc-client", {
            "clara": (f"http://127.0.0.1:{adapter.http_port}/dicomweb/aetitles/CLARA/", TOKEN),
            "orthanc": (f"http://127.0.0.1:{target.http_port}/dicom-web/", None),
        })
        try:
            def drained() -> None:  # each run's group closes before the next (no duplicates)
                wait_for(lambda: adapter.status()["instancesHeld"] == 0, 120, interval=0.2, what="group closed")

            study_id = client.upload(files)
            results = {}
            print("client: streaming HTTP (one chunked request)")
            results["http", "orthanc"] = measure(
                "orthanc", lambda: http_push(target.http_port, "/dicom-web/studies", files, None),
                target.delete_all, len(files), mb, args.repeat)
            results["http", "clara"] = measure(
                "clara", lambda: http_push(adapter.http_port, "/dicomweb/aetitles/CLARA/studies", files, TOKEN),
                drained, len(files), mb, args.repeat)
            print(f"  ratio (throughput, ours / Orthanc's STOW-RS): "
                  f"{results['http', 'orthanc'] / results['http', 'clara']:.2f}x")
            print("client: Orthanc's DICOMweb plugin (/dicom-web/servers/{name}/stow)")
            results["orthanc", "orthanc"] = measure(
                "orthanc", lambda: orthanc_push(client, "orthanc", study_id), target.delete_all, len(files), mb,
                args.repeat)
            results["orthanc", "clara"] = measure(
                "clara", lambda: orthanc_push(client, "clara", study_id), drained, len(files), mb, args.repeat)
            print(f"  ratio (throughput, ours / Orthanc's STOW-RS): "
                  f"{results['orthanc', 'orthanc'] / results['orthanc', 'clara']:.2f}x")
        finally:
            client.stop()
            target.stop()
            adapter.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
