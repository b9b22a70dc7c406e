"""Mutation fuzzing of the DICOM receive path, as a hostile peer would (a probe, not a test).

    python tools/fuzz_receive.py [--streams 600] [--workers 0] [--seed 1] [--threads 8]

Records the bytes dcmtk storescu sends for a 3-instance study (through a local proxy),
then sends ``--streams`` mutated copies, 8 connections at a time, to `clara-dicom up`:
cuts at any byte, random bytes overwritten, bit flips in the first 2 KB (PDU and item
headers, the A-ASSOCIATE-RQ), random insertions and deletions, pure garbage. Afterwards
the adapter must still be alive, answer C-ECHO, store the study, keep no temporary file,
and have logged no traceback. Prints what it found; exit status 1 if any of that fails.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from local_setup import write_config  # noqa: E402
from peers import LocalAdapter, echoscu, free_port, storescu  # noqa: E402

from clara_dicom.synthetic import write_study  # noqa: E402


def record(files: list[Path], port: int) -> bytes:
    """What storescu sends to ``port`` for ``files``, through a proxy that keeps a copy."""
    listen_port = free_port()
    server = socket.create_server(("127.0.0.1", listen_port))
    sent: list[bytes] = []

    def pump(src: socket.socket, dst: socket.socket, keep: bool) -> None:
        while data := src.recv(65536):
            if keep:
                sent.append(data)
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    def proxy() -> None:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        back = threading.Thread(target=pump, args=(upstream, client, False))
        back.start()
        pump(client, upstream, True)
        back.join()
        client.close()
        upstream.close()

    thread = threading.Thread(target=proxy)
    thread.start()
    result = storescu(files, listen_port)
    thread.join()
    server.close()
    if result.returncode != 0:
        raise SystemExit(f"recording failed: {result.stderr[-500:]}")
    return b"".join(sent)


def mutate(stream: bytes, rng: random.Random) -> bytes:
    b = bytearray(stream)
    kind = rng.randrange(6)
    if kind == 0:  # cut at any byte
        return bytes(b[:rng.randrange(len(b))])
    if kind == 1:  # a few bytes overwritten anywhere
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # bit flips in the headers
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(min(2048, len(b)))] ^= 1 << rng.randrange(8)
    elif kind == 3:
        at = rng.randrange(len(b))
        b[at:at] = rng.randbytes(rng.randrange(1, 300))
    elif kind == 4:
        at = rng.randrange(len(b))
        del b[at:at + rng.randrange(1, 300)]
    else:
        return rng.randbytes(rng.randrange(1, 5000))
    return bytes(b)


def send(port: int, data: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    except OSError:
        pass  # refused, reset or timed out: all fine for a hostile peer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=600)
    ap.add_argument("--workers", type=int, default=0, help="receiveWorkers of the adapter")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=8, help="connections at once")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="clara-fuzz-"))
    files = write_study(root / "study", slices=3, rows=64, cols=64, patient_id="PAT-FUZZ")
    adapter = LocalAdapter(write_config(root / "cfg"), root / "state",
                           extra=["--receive-workers", str(args.workers)])
    problems = []
    try:
        stream = record(files, adapter.dicom_port)
        streams = [mutate(stream, rng) for _ in range(args.streams)]
        start = time.monotonic()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda data: send(adapter.dicom_port, data), streams))
        took = time.monotonic() - start
        if not adapter.alive():
            problems.append("the adapter died")
        elif echoscu(adapter.dicom_port).returncode != 0:
            problems.append("no C-ECHO answer afterwards")
        elif storescu(files, adapter.dicom_port).returncode != 0:
            problems.append("the study could not be stored afterwards")
        fds = len(os.listdir(f"/proc/{adapter.proc.pid}/fd")) if adapter.alive() else -1
        rss = next((line.split()[1] for line in Path(f"/proc/{adapter.proc.pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")), "?") if adapter.alive() else "?"
    finally:
        adapter.stop()
    log = adapter.log()
    leftovers = list((root / "state").rglob(".tmp*"))
    if leftovers:
        problems.append(f"{len(leftovers)} temporary files left, e.g. {leftovers[0]}")
    if "Traceback" in log:
        problems.append("a traceback in the log")
    print(f"{args.streams} mutated streams ({len(stream)} bytes recorded) in {took:.1f} s, receiveWorkers "
          f"{args.workers}: open fds {fds}, RSS {rss} kB, {len(log.splitlines())} log lines; log {adapter.log_path}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
