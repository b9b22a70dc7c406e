#!/usr/bin/env python3
"""Results Service throughput: tasks registered and leased per second, SQLite and PostgreSQL.

    python bench/results/bench_results.py [--tasks 2000] [--clients 4] [--postgres-dsn DSN]

For each database, starts `clara-dicom results-service` as a separate process on
127.0.0.1 (so client and server do not share a GIL), then measures over HTTP:

* register: --clients threads POST tasks (10 URIs each) until --tasks exist;
* lease+renew+report: --clients pollers lease one task at a time, renew its lease once
  and report success with the lease id (the export agent's requests for a short export);
* lease batch: --clients pollers lease 10 at a time (no report).

and, without HTTP, the store itself (create / lease one at a time, one thread).
Without --postgres-dsn a throw-away PostgreSQL is started from the Debian binaries
(as the postgres user when run as root); if there are none, PostgreSQL is skipped.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        self.bindir = os.path.dirname(found[-1]) if found else None
        self.proc = None

    def start(self) -> str | None:
        if self.bindir is None:
            return None
        self.tmp = tempfile.mkdtemp(prefix="bench-results-pg-")
        kw = {}
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}
        data = os.path.join(self.tmp, "data")
        subprocess.run([f"{self.bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync",
                        "-E", "UTF8", "--locale=C"], check=True, stdout=subprocess.DEVNULL, env=env, cwd=self.tmp, **kw)
        port = free_port()
        # Durable settings (fsync on): the figures should mean something for production.
        self.proc = subprocess.Popen([f"{self.bindir}/postgres", "-D", data, "-p", str(port),
                                      "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.tmp}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=self.tmp, **kw)
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                return dsn
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
            shutil.rmtree(self.tmp, ignore_errors=True)


def parallel(n_threads: int, work) -> None:
    errors = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def bench_http(database: str, n: int, clients: int) -> dict[str, float]:
    from clara_results.client import ResultsClient

    port = free_port()
    env = {**os.environ, "CLARA_RESULTS_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "clara_dicom.cli", "--log-level", "WARNING", "results-service",
                             "--host", "127.0.0.1", "--port", str(port), "--database", database],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        probe = ResultsClient(url, TOKEN)
        deadline = time.monotonic() + 30
        while not probe.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("results-service did not start")
            time.sleep(0.05)
        uris = [f"operators/dicom-writer/dicom/1.2.3.{i}.dcm" for i in range(10)]
        per = n // clients

        def register(i: int) -> None:
            with ResultsClient(url, TOKEN) as c:
                for k in range(per):
                    c.create_task(job_id=f"job-{i}", pipeline_id="bench", payload_id="payload", agent="ClaraSCU",
                                  uris=uris, parameters='"Orthanc"', idempotency_key=f"bench-{i}-{k}")

        t0 = time.perf_counter()
        parallel(clients, register)
        register_rate = per * clients / (time.perf_counter() - t0)

        half = per * clients // 2
        counted = [0] * clients

        def lease_one(i: int) -> None:
            with ResultsClient(url, TOKEN) as c:
                while sum(counted) < half:
                    batch = c.lease("ClaraSCU", 1)
                    if not batch:
                        return
                    c.renew(batch[0].id, batch[0].lease_id)  # as the export agent does while it exports
                    c.report_success(batch[0].id, lease_id=batch[0].lease_id)
                    counted[i] += 1

        t0 = time.perf_counter()
        parallel(clients, lease_one)
        lease_one_rate = sum(counted) / (time.perf_counter() - t0)

        got = [0] * clients

        def lease_batch(i: int) -> None:
            with ResultsClient(url, TOKEN) as c:
                while True:
                    batch = c.lease("ClaraSCU", 10)
                    if not batch:
                        return
                    got[i] += len(batch)

        t0 = time.perf_counter()
        parallel(clients, lease_batch)
        lease_batch_rate = sum(got) / (time.perf_counter() - t0)
        probe.close()
        return {"register/s": register_rate, "lease+renew+report/s": lease_one_rate, "lease(batch 10)/s": lease_batch_rate}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def bench_store(database: str, n: int) -> dict[str, float]:
    from clara_results.models import NewTask
    from clara_results.store import open_store

    store = open_store(database)
    try:
        uris = tuple(f"operators/dicom-writer/dicom/1.2.3.{i}.dcm" for i in range(10))
        t0 = time.perf_counter()
        for k in range(n):
            store.create(NewTask(job_id="job", pipeline_id="bench", payload_id="payload", agent="direct",
                                 uris=uris, parameters='"Orthanc"'))
        create_rate = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        leased = 0
        while store.lease("direct", 1):
            leased += 1
        lease_rate = leased / (time.perf_counter() - t0)
        return {"store create/s": create_rate, "store lease/s": lease_rate}
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--postgres-dsn", default=None)
    args = parser.parse_args()

    targets = []
    tmpdir = tempfile.mkdtemp(prefix="bench-results-")
    targets.append(("sqlite", os.path.join(tmpdir, "results.db"), os.path.join(tmpdir, "direct.db")))
    pg = None
    if args.postgres_dsn:
        targets.append(("postgresql", args.postgres_dsn, args.postgres_dsn))
    else:
        pg = TempPostgres()
        dsn = pg.start()
        if dsn:
            targets.append(("postgresql", dsn, dsn))
        else:
            print("PostgreSQL binaries not found: PostgreSQL skipped", file=sys.stderr)
    try:
        print(f"{args.tasks} tasks (10 URIs each), {args.clients} HTTP clients, {os.cpu_count()} CPU(s)")
        results: dict[str, dict[str, float]] = {}
        for name, http_db, store_db in targets:
            figures = bench_http(http_db, args.tasks, args.clients)
            if name == "postgresql":
                import psycopg

                with psycopg.connect(store_db, autocommit=True) as conn:
                    conn.execute("DROP TABLE IF EXISTS tasks")
            figures.update(bench_store(store_db, args.tasks))
            results[name] = figures
            line = "  ".join(f"{k} {v:8.0f}" for k, v in figures.items())
            print(f"{name:11s} {line}")
        if len(results) == 2:  # the embedded database is the anchor
            line = "  ".join(f"{k} {results['postgresql'][k] / v:8.2f}" for k, v in results["sqlite"].items())
            print(f"{'pg/sqlite':11s} {line}")
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
