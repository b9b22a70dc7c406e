#!/usr/bin/env python3
"""Summarise py-spy raw (collapsed) stacks recorded by ``bench/ingest.py --profile``.

For each thread: samples, how many were busy (not parked in epoll/poll/futex
waits), and, for the busy ones, the inclusive share of the functions that
matter on the receive path (a sample counts once per function it contains).

    python bench/profile_summary.py FILE [FILE...] [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

IDLE_LEAVES = ("epoll_wait", "poll (", "select (", "accept", "sem_clockwait", "pthread_cond_timedwait",
               "pthread_cond_wait", "__futex_abstimed_wait")
# a bare libc address at the leaf under a lock/condition wait is a futex wait
WAITS = ("Condition.wait", "Event.wait", "_worker (concurrent/futures/thread.py", "Lock.acquire",
         "Thread.join", "SimpleQueue.get", "Queue.get", "wait (threading.py", "sleep")


def is_idle(frames: list[str]) -> bool:
    leaf = frames[-1]
    if any(leaf.startswith(x) for x in IDLE_LEAVES):
        return True
    if re.match(r"0x[0-9a-f]+ \(libc", leaf):
        python = [f for f in frames if "(" in f and ".py:" in f]
        return bool(python) and any(w in python[-1] for w in WAITS)
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    total: collections.Counter = collections.Counter()
    busy: collections.Counter = collections.Counter()
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name in args.files:
        for line in open(name):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            thread = re.sub(r"thread \(\d+\): ", "", frames[1]).strip()
            thread = re.sub(r"_\d+$", "_N", thread)  # pool threads together
            process = "worker" if "receive_worker" in frames[0] else "main"
            key = f"{process}/{thread}"
            n = int(count)
            total[key] += n
            if is_idle(frames):
                continue
            busy[key] += n
            seen = set()
            for f in frames[2:]:
                fn = re.sub(r" \((.*?):\d+\)$", r" (\1)", f)
                fn = re.sub(r"^0x[0-9a-f]+ ", "", fn)
                if fn not in seen:
                    seen.add(fn)
                    inclusive[key][fn] += n
            leaves[key][re.sub(r"^0x[0-9a-f]+ ", "", frames[-1])] += n
    grand = sum(busy.values())
    print(f"busy samples {grand} of {sum(total.values())}")
    for key, n in busy.most_common():
        if not n:
            continue
        print(f"\n== {key}: {n} busy of {total[key]} samples ({100 * n / grand:.1f}% of all busy)")
        for fn, m in inclusive[key].most_common(args.top):
            print(f"  {100 * m / n:5.1f}%  {fn}")
        print("  -- leaves (self):")
        for fn, m in leaves[key].most_common(12):
            print(f"  {100 * m / n:5.1f}%  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
