#!/usr/bin/env python3
"""Where the receive event loop's time goes, per instance, from the py-spy
stacks that ``bench/ingest.py --profile DIR`` records (in-process receive path,
``--workers 0``).

Each sample of the ``dicom-scp`` thread is put in one bucket: the frame nearest
the leaf that names a step of the receive path decides (so the ``send`` of a
C-STORE-RSP issued from inside the commit callback counts as "response", the
``rename`` inside the commit as "close + rename"). Idle samples (the loop
waiting in ``epoll_wait``) are a bucket of their own; the other threads' busy samples
(e.g. the commit threads) are rows of their own.
Samples are turned into microseconds per instance with ``--cpu-us`` (the
adapter's CPU per instance, as bench/ingest.py prints it), shared by every
busy sample of every thread; only proportions come from the samples, so
py-spy's own pauses do not count, but a sample blocked in a system call counts
as busy (shares are of busy time, which on a loaded machine is not all CPU).

    python bench/ingest.py --only small --repeat 2 --workers 0 --associations-only 4 --no-anchors --profile /tmp/p
    python bench/receive_profile.py /tmp/p/small-4assoc-clara-w0-*.txt --cpu-us 590
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from profile_summary import is_idle  # noqa: E402

# (bucket, function-name patterns); the first frame from the leaf that matches one decides.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("response: build + send C-STORE-RSP", ("Association._respond", "c_store_rsp", "p_data_command",
                                            "Association._committed")),
    ("close + rename into place", ("InstanceWriter.finalize", "InstanceWriter.close", "IncomingInstance.finalize")),
    ("journal record + commit (SQLite, processor)", ("Ingest._commit_batch", "commit_prepared",
                                                     "Ingest.commit_received_now", "JournalBase.", "Journal.",
                                                     "Transaction.", "JobProcessor")),
    ("structural walk", ("DatasetWalker.", "IncomingInstance.finish", "decode_value")),
    ("temp file write", ("InstanceWriter.write",)),
    ("temp file create (open + file meta)", ("InstanceStore.open", "InstanceWriter.__init__", "file_header",
                                             "IncomingInstance.__init__", "DiskGuard.check", "unique_name")),
    ("C-STORE-RQ parse + instance setup", ("Association._on_command", "parse_command", "Ingest.receive_instance")),
    ("PDU read + reassembly", ("PduStream.", "Association.pdv_", "Association.buffer_updated",
                               "IncomingInstance.feed", "Association._on_dataset_complete")),
    ("commit hand-off (futures, callbacks)", ("StorageSCP._commit_ready", "LoopFuture.", "StorageSCP.commit",
                                              "call_from_any_thread")),
    ("socket recv (transport)", ("_read_ready__get_buffer", "sock_recv_into")),
]
LOOP = "event loop (select, scheduling, other)"
IDLE = "idle (waiting in epoll for peers)"


def bucket_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        name = frame.split(" (", 1)[0]
        for bucket, patterns in BUCKETS:
            if any(name.startswith(p) for p in patterns):
                return bucket
    return LOOP


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--thread", default="dicom-scp")
    ap.add_argument("--cpu-us", type=float, help="the adapter's CPU per instance (µs) in the profiled run")
    args = ap.parse_args()
    counts: collections.Counter = collections.Counter()
    other_threads: collections.Counter = collections.Counter()
    for name in args.files:
        for line in open(name):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            thread = re.sub(r"thread \(\d+\): ", "", frames[1]).strip()
            n = int(count)
            idle = is_idle(frames)
            if thread != args.thread:
                if not idle:
                    other_threads[re.sub(r"_\d+$", "_N", thread)] += n
                continue
            counts[IDLE if idle else bucket_of(frames[2:])] += n
    busy = sum(n for b, n in counts.items() if b != IDLE)
    total = busy + counts[IDLE]
    everything = busy + sum(other_threads.values())
    if not total:
        print(f"no samples of thread {args.thread!r}")
        return 1
    print(f"thread {args.thread}: {total} samples, {busy} busy ({100 * busy / total:.0f}%)")
    print("| step | share of the loop's busy samples | µs / instance |")
    print("|---|---|---|")

    def us(n: int) -> str:
        return f"{args.cpu_us * n / everything:.0f}" if args.cpu_us else "-"

    for bucket, n in counts.most_common():
        if bucket != IDLE:
            print(f"| {bucket} | {100 * n / busy:.1f}% | {us(n)} |")
    print(f"| **receive loop thread, busy** | 100% | **{us(busy)}** |")
    for thread, n in other_threads.most_common(4):
        print(f"| other thread: {thread} | ({100 * n / busy:.0f}% of the loop's) | {us(n)} |")
    print(f"| ({IDLE}) | {100 * counts[IDLE] / total:.0f}% of the loop's samples | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
