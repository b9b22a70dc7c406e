#!/usr/bin/env python3
"""The receive worker -> coordinator hop alone: CPU per instance on each side.

A child process plays a receive worker with ``--outstanding`` associations
waiting for their commit replies (a new commit as soon as one is answered, as
a sender that waits for each C-STORE-RSP); this process plays the coordinator
and answers each read with one reply message. No journal, no files: only the
link. Two encodings, measured in the same run:

* ``pickle``: `multiprocessing.connection.Connection`, one pickled
  ``("commit", id, admission, temp name, InstanceRecord)`` per instance and
  ``conn.poll(0)`` / ``recv`` per message (the link before this change);
* ``marshal``: `worker_link.Link`, plain tuples, every commit of one loop
  iteration in one frame, every frame waiting taken by one ``recv``.

    python bench/worker_hop.py [--instances 20000] [--outstanding 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import selectors
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "adapter"))

from clara_adapter.journal import InstanceRecord  # noqa: E402
from clara_adapter.worker_link import Link  # noqa: E402

TAGS = {0x0020000D: "1.2.826.0.1.3680043.8.498.1", 0x0020000E: "1.2.826.0.1.3680043.8.498.2"}


def record(i: int) -> InstanceRecord:
    return InstanceRecord(owner="clara", ae_title="CLARA", calling_ae="STORESCU",
                          sop_instance_uid=f"1.2.826.0.1.3680043.8.498.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax="1.2.840.10008.1.2.1", study_uid=TAGS[0x0020000D], series_uid=TAGS[0x0020000E],
                          path=Path(f"/state/incoming/{i:032x}.dcm"), size=10240, acked_at=0.0, tags=dict(TAGS))


def fields(r: InstanceRecord) -> tuple:
    return (r.calling_ae, r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax, r.study_uid, r.series_uid,
            r.path.name, r.size, r.tags)


def worker(kind: str, fd: int, count: int, outstanding: int) -> None:
    sel = selectors.DefaultSelector()
    if kind == "pickle":
        conn = Connection(fd)
        sel.register(fd, selectors.EVENT_READ)
        sent = 0
        for _ in range(outstanding):
            conn.send(("commit", sent, 1, f".tmp-{sent}", record(sent)))
            sent += 1
        done = 0
        while done < count:
            sel.select()
            while conn.poll(0):
                message = conn.recv()
                for _call_id, _status in message[1]:
                    done += 1
                    if sent < count:
                        conn.send(("commit", sent, 1, f".tmp-{sent}", record(sent)))
                        sent += 1
    else:
        link = Link(socket.socket(fileno=fd))
        sel.register(fd, selectors.EVENT_READ)
        link.send(("commit", [(i, 1, f".tmp-{i}", fields(record(i))) for i in range(outstanding)]))
        sent, done = outstanding, 0
        while done < count:
            sel.select()
            batch = []
            for message in link.receive():
                for _call_id, _status in message[1]:
                    done += 1
                    if sent < count:
                        batch.append((sent, 1, f".tmp-{sent}", fields(record(sent))))
                        sent += 1
            if batch:
                link.send(("commit", batch))
    os._exit(0)


def coordinator(kind: str, sock: socket.socket, count: int) -> None:
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    done = 0
    if kind == "pickle":
        conn = Connection(sock.detach())
        while done < count:
            sel.select()
            commits = []
            while conn.poll(0):
                commits.append(conn.recv())
            for m in commits:  # as the old _prepare: the unpickled record, its path put in the folder
                m[4].path = Path("/state/incoming") / m[4].path.name
            conn.send(("replies", [(m[1], 0) for m in commits]))
            done += len(commits)
    else:
        link = Link(sock)
        while done < count:
            sel.select()
            replies = []
            for message in link.receive():
                for call_id, _admission, _tmp, f in message[1]:
                    InstanceRecord(owner="clara", ae_title="CLARA", calling_ae=f[0], sop_instance_uid=f[1],
                                   sop_class_uid=f[2], transfer_syntax=f[3], study_uid=f[4], series_uid=f[5],
                                   path=Path("/state/incoming") / f[6], size=f[7], acked_at=0.0, tags=f[8])
                    replies.append((call_id, 0))
            link.send(("replies", replies))
            done += len(replies)


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(kind: str, count: int, outstanding: int) -> tuple[float, float, float]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ctx = multiprocessing.get_context("fork")
    child_before, self_before = cpu_children(), cpu_self()
    start = time.perf_counter()
    proc = ctx.Process(target=worker, args=(kind, theirs.fileno(), count, outstanding))
    proc.start()
    theirs.close()
    coordinator(kind, mine, count)
    elapsed = time.perf_counter() - start
    proc.join()
    return elapsed, cpu_self() - self_before, cpu_children() - child_before


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=20000)
    ap.add_argument("--outstanding", type=int, default=2, help="associations waiting on one worker")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{args.instances} commits, {args.outstanding} outstanding (load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    for kind in ("pickle", "marshal"):
        runs = [run(kind, args.instances, args.outstanding) for _ in range(args.repeat)]
        per = 1e6 / args.instances
        print(f"  {kind:<8} {statistics.median(r[0] for r in runs) * per:6.1f} us/instance wall, CPU "
              f"coordinator {statistics.median(r[1] for r in runs) * per:5.1f} + worker "
              f"{statistics.median(r[2] for r in runs) * per:5.1f} us/instance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
