#!/usr/bin/env python3
"""Where PostgreSQL becomes the limit for adapter replicas: the journal's own
per-instance transaction, without DICOM, from N writer processes at once.

Each writer process stands for one replica's commit thread: it opens a
PostgresJournal and commits instances the way the AE Title processor does on a
shared journal (``add_to_open_group``: join the group under KEY SHARE and insert
the member ON CONFLICT DO NOTHING, one statement; a savepoint per instance),
``--batch`` instances per transaction (the group commit of one
replica under load). Two shapes: every writer feeds the same study (one hot
group row: the worst case), or each writer its own study. Run on a throw-away
server (tests/postgres_server.py) with fsync and synchronous_commit on (as in
production), then off. Prints instances/s, commits/s and the load average.

    python bench/shared_journal.py [--writers 1,2,4,8] [--instances 1500] [--batch 1,8]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def writer(dsn: str, root: str, study: str, n: int, batch: int, ready, start, results) -> None:
    from clara_adapter.journal import InstanceRecord
    from clara_adapter.journal_pg import PostgresJournal

    journal = PostgresJournal(dsn, root=root)
    settings = {"spec": {"timeout": 3600}, "processor": "bench", "aeTitle": "CLARA"}
    ready.put(os.getpid())
    start.wait()
    t0 = time.perf_counter()
    commits = 0
    for first in range(0, n, batch):
        with journal.transaction(0.0, 0.0) as tx:  # as the group commit: one savepoint per instance
            for i in range(first, min(n, first + batch)):
                rec = InstanceRecord(owner="clara", ae_title="CLARA", calling_ae="SCU",
                                     sop_instance_uid=f"{study}.{os.getpid()}.{i}", sop_class_uid="1.2",
                                     transfer_syntax="1.2.840.10008.1.2.1", study_uid=study, series_uid=study + ".1",
                                     path=Path(root) / f"{os.getpid()}-{i}.dcm", size=1, acked_at=0.0,
                                     group_value=study)
                with tx.step():
                    if journal.add_to_open_group(rec) is None:  # the first instance opens the group
                        rec.group_id, _ = journal.join_group("clara", "CLARA", "bench", study, settings, 3600)
                        journal.add_member(rec)
        commits += 1
    results.put((n, commits, time.perf_counter() - t0))
    journal.close()


def run(dsn: str, writers: int, total: int, batch: int, same_study: bool, root: str) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    per = total // writers
    procs = [ctx.Process(target=writer, args=(dsn, root, "1.9" if same_study else f"1.9.{w}", per, batch, ready,
                                              start, results)) for w in range(writers)]
    for p in procs:
        p.start()
    for _ in procs:  # every writer connected before the clock starts
        ready.get(timeout=300)
    t0 = time.perf_counter()
    start.set()
    got = [results.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return sum(g[0] for g in got) / wall, sum(g[1] for g in got) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", default="1,2,4,8")
    ap.add_argument("--instances", type=int, default=1500)
    ap.add_argument("--batch", default="1,8")
    args = ap.parse_args()
    import psycopg
    from postgres_server import DurablePostgresServer, running

    # DurablePostgresServer: no command-line overrides, so ALTER SYSTEM below really switches durability
    with running(DurablePostgresServer) as pg, tempfile.TemporaryDirectory(prefix="clara-bench-") as root:
        for durable in (True, False):
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                for key in ("fsync", "synchronous_commit", "full_page_writes"):
                    conn.execute(f"ALTER SYSTEM SET {key} = {'on' if durable else 'off'}")
                conn.execute("SELECT pg_reload_conf()")
                fsync, sync = (conn.execute(f"SHOW {key}").fetchone()[0] for key in ("fsync", "synchronous_commit"))
            print(f"PostgreSQL fsync {fsync}, synchronous_commit {sync} (as the server reports; {load()})")
            for batch in map(int, args.batch.split(",")):
                for same in (True, False):
                    for n in map(int, args.writers.split(",")):
                        dsn = pg.fresh_database(f"b{n}_{batch}_{int(same)}_{int(durable)}")
                        ips, cps = run(dsn, n, args.instances, batch, same, root)
                        print(f"  batch {batch:2d}  {'one study ' if same else 'own study'}  {n:2d} writers  "
                              f"{ips:7.0f} instances/s  {cps:6.0f} commits/s  ({load()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
