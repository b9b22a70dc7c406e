#!/usr/bin/env python3
"""Ingest benchmark: dcmtk storescu -> {dcmtk storescp, Orthanc, clara-dicom adapter}.

Two workloads, each sent over one association and over 4 parallel
associations, to each receiver in the same run:

* ``ct``: one synthetic CT study, 300 slices of 512x512 16-bit (512 KB each);
* ``small``: 2,000 instances of 64x64 (~10 KB each: per-instance overhead).

Every dcmtk-based peer (storescu, storescp, Orthanc) runs with TCP_NODELAY=1 in
its environment (without it each response waits ~40 ms for a delayed ACK).
storescp serves 4 associations with --fork. clara-dicom runs as `clara-dicom
up` with its journal and study grouping on (each repetition's group is closed
before the next). Prints seconds, instances/s, ratios and the load average.

    python bench/ingest.py [--slices 300] [--small 2000] [--repeat 3] [--only ct|small]
                           [--workers 0 --workers 2]   (clara-dicom receive workers; each measured)

Where the time goes: ``--profile DIR`` records every clara-dicom repetition
with py-spy (500 Hz, native frames, idle threads; ``pip install py-spy``), and
``python bench/profile_summary.py DIR/*.txt`` gives each thread's busy share by
function. py-spy stops the process at each sample, so runs are slower and the
CPU figures include its overhead: read the shares, not the times.

    python bench/ingest.py --only small --repeat 1 --workers 0 --associations-only 1 --no-anchors --profile /tmp/prof

Replicas (issue 16): ``--replicas N --journal postgresql`` runs, in the same
run, one `up` on the SQLite journal (the anchor), one on a PostgreSQL journal
and N sharing that PostgreSQL journal and one state folder, each fed the same
instances over ``--associations`` parallel associations spread round-robin
over the replicas; prints instances/s, the replicas' journal commits/s
(and instances per commit) and the ratios PostgreSQL/SQLite and N
replicas/one replica.

    python bench/ingest.py --replicas 2 --journal postgresql [--only ct|small] [--associations 4] [--studies 4]

``--studies K`` splits each workload into K studies (with K = associations, each
association sends a study of its own, and two replicas join different group
rows); the default, one study, has every replica join the same group row.

``--profile DIR`` covers the replicas too: each replica's every repetition, one file each
(``DIR/small-pg-1-r0-0.txt``: small study, 1 PostgreSQL replica, replica 0, repetition 0);
``--pg-only`` skips the SQLite anchor.

    python bench/ingest.py --replicas 1 --journal postgresql --only small --repeat 1 --pg-only --profile /tmp/prof
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from peers import LocalAdapter, Orthanc, StoreSCP, dcmtk, dcmtk_env, metric_value, wait_for  # noqa: E402

CACHE = Path.home() / ".cache" / "clara-dicom" / "bench"

def bench_config(source_name: str = "storescu", source_ae: str = "STORESCU") -> str:
    """One AE title grouping by study (5 s), and the sending AE as its one ClaraSource."""
    return CONFIG.replace("{name: storescu}", f"{{name: {source_name}}}").replace(
        "{aeTitle: STORESCU,", f"{{aeTitle: {source_ae},")


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


def study(slices: int, size: int = 512, studies: int = 1) -> list[Path]:
    """``slices`` instances: one study, or ``studies`` studies of ``slices // studies``
    instances, interleaved so that ``files[i::studies]`` is study i (with as many
    associations as studies, each association sends one study of its own)."""
    if studies > 1:
        per_study = [study_folder(CACHE / f"ct-{slices}x{size}x{size}-{studies}studies-v1" / f"study{k}",
                                  slices // studies, size, f"BENCH-{k + 1:04d}") for k in range(studies)]
        return [f for row in zip(*per_study) for f in row]
    return study_folder(CACHE / f"ct-{slices}x{size}x{size}-v1", slices, size, "BENCH-0001")


def study_folder(folder: Path, slices: int, size: int, patient_id: str) -> list[Path]:
    files = sorted(folder.glob("*.dcm"))
    if len(files) != slices:
        from clara_dicom.synthetic import write_study

        shutil.rmtree(folder, ignore_errors=True)
        files = write_study(folder, slices=slices, patient_id=patient_id, rows=size, cols=size)
    return files


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def send(ports: list[int], files: list[Path], parallel: int, called: str) -> float:
    """Seconds for ``parallel`` storescu associations at once, spread round-robin over ``ports``."""
    chunks = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([dcmtk("storescu"), "-aec", called, "127.0.0.1", str(ports[i % len(ports)]),
                          *map(str, chunk)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i, chunk in enumerate(chunks)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def cpu_seconds(session: int) -> dict[int, float]:
    """CPU time of each process in a receiver's session (its workers; reaped children count
    for their parent), by pid."""
    by_pid = {}
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if int(fields[3]) == session:  # field 6 of stat: the session id
            by_pid[int(entry)] = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime..cstime
    return by_pid


def cpu_split(session: int, before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """(the session leader's CPU seconds, every other process's) between two `cpu_seconds`."""
    lead = after.get(session, 0.0) - before.get(session, 0.0)
    rest = sum(v - before.get(pid, 0.0) for pid, v in after.items() if pid != session)
    return lead, rest


def measure(name: str, port: int, files: list[Path], parallel: int, repeat: int, called: str,
            after: callable = None, pid: int | None = None, profile: Path | None = None) -> float:
    import resource

    times, cpu, lead, rest, clients = [], [], [], [], []
    for i in range(repeat):
        spy = start_profile(pid, profile.with_name(f"{profile.name}-{i}.txt")) if profile else None
        before = cpu_seconds(pid) if pid else {}
        senders = resource.getrusage(resource.RUSAGE_CHILDREN)  # the storescu processes, once reaped
        times.append(send([port], files, parallel, called))
        split = cpu_split(pid, before, cpu_seconds(pid)) if pid else (0.0, 0.0)
        after_senders = resource.getrusage(resource.RUSAGE_CHILDREN)
        clients.append(after_senders.ru_utime + after_senders.ru_stime - senders.ru_utime - senders.ru_stime)
        lead.append(split[0])
        rest.append(split[1])
        cpu.append(sum(split))
        if spy:
            stop_profile(spy)
        if after:
            after()
    best = min(times)
    per = 1000 / len(files)
    # with receive workers: the coordinator's share and the workers' (a worker's CPU is not the coordinator's)
    split = (f" (main {per * statistics.median(lead):.2f} + workers {per * statistics.median(rest):.2f})"
             if name.startswith("clara-w") and not name.startswith("clara-w0") else "")
    print(f"  {name:<10} best {best:6.2f}s  median {statistics.median(times):6.2f}s  "
          f"{len(files) / best:7.0f} inst/s  CPU {per * statistics.median(cpu):5.2f} ms/inst{split}"
          f"  storescu CPU {per * statistics.median(clients):5.2f} ms/inst")
    return best


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling ``pid`` (and its receive workers) at 500 Hz, native frames and idle threads
    included, as collapsed stacks in ``out`` (summarise with bench/profile_summary.py)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--native", "--idle", "--threads",
                            "--subprocesses", "-r", "500", "-f", "raw", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return spy


def stop_profile(spy: subprocess.Popen) -> None:
    import signal

    spy.send_signal(signal.SIGINT)
    spy.wait(30)


def run_workload(name: str, files: list[Path], repeat: int, tmp: Path,
                 workers: tuple[str, ...] | list[str] = ("default",), profile: Path | None = None,
                 associations: tuple[int, ...] = (1, 4), anchors: bool = True) -> dict[tuple[str, int], float]:
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"workload {name}: {len(files)} instances, {mb:.0f} MB ({load()})")
    results: dict[tuple[str, int], float] = {}
    for parallel in associations:
        print(f"{parallel} association(s):")
        if not anchors:
            for count in workers:
                label = "clara" if count == "default" else f"clara-w{count}"
                results[(label, parallel)] = run_adapter(label, count, name, files, parallel, repeat, tmp, profile)
            continue
        scp = StoreSCP(tmp / f"storescp-{name}-{parallel}", fork=parallel > 1)
        try:
            results[("storescp", parallel)] = measure("storescp", scp.port, files, parallel, repeat, "ANY",
                                                      pid=scp.proc.pid)
        finally:
            scp.stop()
        orthanc = Orthanc(tmp / f"orthanc-{name}-{parallel}")
        try:
            results[("orthanc", parallel)] = measure("orthanc", orthanc.dicom_port, files, parallel, repeat,
                                                     "ORTHANC", pid=orthanc.proc.pid)
        finally:
            orthanc.stop()
        for count in workers:
            label = "clara" if count == "default" else f"clara-w{count}"
            results[(label, parallel)] = run_adapter(label, count, name, files, parallel, repeat, tmp, profile)
            ours = results[(label, parallel)]
            print(f"  {label}: ratio (throughput, ours / anchor): vs storescp{' --fork' if parallel > 1 else ''} "
                  f"{results[('storescp', parallel)] / ours:.2f}x, vs Orthanc "
                  f"{results[('orthanc', parallel)] / ours:.2f}x  ({load()})")
    return results


def run_adapter(label: str, count: str, name: str, files: list[Path], parallel: int, repeat: int, tmp: Path,
                profile: Path | None) -> float:
    adapter = LocalAdapter(tmp / "config.yaml", tmp / f"adapter-{name}-{parallel}-{count}",
                           extra=["--log-level", "WARNING"] + ([] if count == "default" else
                                                               ["--receive-workers", count]))
    try:
        # Wait for each repetition's group to close so runs don't overlap in one group.
        def drained() -> None:
            wait_for(lambda: adapter.status()["instancesHeld"] == 0, 120, what="group closed")

        return measure(label, adapter.dicom_port, files, parallel, repeat, "CLARA", after=drained,
                       pid=adapter.proc.pid, profile=profile / f"{name}-{parallel}assoc-{label}" if profile else None)
    finally:
        adapter.stop()


def _journal_commits(adapters: list[LocalAdapter]) -> float:
    """The receive path's journal transactions, summed over the replicas (their own count:
    PostgreSQL 15's pg_stat_database lags by up to seconds, which distorts runs this short)."""
    return sum(metric_value(a.metrics(), "clara_journal_transaction_instances_count") for a in adapters)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` (its reaped children included) and of its live children
    (the PostgreSQL server: postmaster and backends)."""
    total = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if int(entry) == pid:
            total += sum(int(v) for v in fields[11:15])
        elif int(fields[1]) == pid:  # field 4 of stat: the parent
            total += sum(int(v) for v in fields[11:13])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds every core of the machine spent busy (not idle, not waiting for I/O)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]  # guest time is in user
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def measure_replicas(label: str, n: int, journal: str | None, files: list[Path], parallel: int, repeat: int,
                     state: Path, server_pid: int | None = None, profile: Path | None = None) -> float:
    """Best seconds for ``files`` over ``n`` replicas; prints instances/s, the replicas' journal
    commits and, for the best repetition, where the machine's CPU went. ``profile``: record each
    replica's every repetition with py-spy into ``profile``-r{replica}-{repetition}.txt."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    extra = ["--log-level", "WARNING"] + (["--journal", journal] if journal else [])
    with ThreadPoolExecutor(n) as pool:  # started together, as replicas of one Deployment would
        adapters = list(pool.map(lambda _: LocalAdapter(state / "config.yaml", state / "shared", extra=extra),
                                 range(n)))
    try:
        times, commits_made, cpu = [], [], []

        def sample() -> tuple[float, ...]:
            senders = resource.getrusage(resource.RUSAGE_CHILDREN)
            return (sum(sum(cpu_seconds(a.proc.pid).values()) for a in adapters),  # each adapter's session
                    process_tree_cpu(server_pid) if server_pid else 0.0,
                    senders.ru_utime + senders.ru_stime, machine_busy())

        for i in range(repeat):
            spies = [start_profile(a.proc.pid, profile.with_name(f"{profile.name}-r{k}-{i}.txt"))
                     for k, a in enumerate(adapters)] if profile else []
            before, cpu_before = _journal_commits(adapters), sample()
            took = send([a.dicom_port for a in adapters], files, parallel, "CLARA")
            cpu.append([b - a for a, b in zip(cpu_before, sample())])
            for spy in spies:
                stop_profile(spy)
            commits_made.append(_journal_commits(adapters) - before)
            times.append(took)
            wait_for(lambda: adapters[0].status()["instancesHeld"] == 0, 120, what="groups closed")
        best = min(times)
        made = commits_made[times.index(best)]
        commits = f"  {made / best:6.0f} commits/s, {len(files) / made:4.2f} instances/commit" if made else ""
        ours, server, senders, busy = cpu[times.index(best)]
        cores = os.cpu_count() or 1
        per_instance = statistics.median(c[0] for c in cpu) * 1000 / len(files)
        commits += (f"\n  {'':<22} adapters' CPU {per_instance:4.2f} ms/instance (median of the repetitions)"
                    f"\n  {'':<22} CPU, share of {cores} cores over the run: adapters {ours / best / cores:4.0%}, "
                    f"PostgreSQL {server / best / cores:4.0%}, storescu {senders / best / cores:4.0%}, "
                    f"whole machine {busy / best / cores:4.0%}")
        print(f"  {label:<22} best {best:6.2f}s  median {statistics.median(times):6.2f}s  "
              f"{len(files) / best:7.0f} inst/s{commits}  ({load()})")
        return best
    finally:
        for a in adapters:
            a.stop()


def run_replicas(name: str, files: list[Path], replicas: int, parallel: int, repeat: int, tmp: Path,
                 profile: Path | None = None, only_pg: bool = False) -> None:
    from postgres_server import DurablePostgresServer, running

    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"workload {name}: {len(files)} instances, {mb:.0f} MB, {parallel} associations ({load()})")
    with running(DurablePostgresServer) as pg:  # durable defaults, as in production
        (tmp / f"{name}-sqlite").mkdir()
        (tmp / f"{name}-sqlite" / "config.yaml").write_text(CONFIG)
        sqlite = None if only_pg else measure_replicas(
            "1 replica, SQLite", 1, None, files, parallel, repeat, tmp / f"{name}-sqlite",
            profile=profile / f"{name}-sqlite-1" if profile else None)
        results = {}
        for n in sorted({1, replicas}):
            state = tmp / f"{name}-pg-{n}"
            state.mkdir()
            (state / "config.yaml").write_text(CONFIG)
            dsn = pg.fresh_database(f"bench_{name}_{n}")
            results[n] = measure_replicas(f"{n} replica(s), PostgreSQL", n, dsn, files, parallel, repeat, state,
                                          server_pid=pg.proc.pid,
                                          profile=profile / f"{name}-pg-{n}" if profile else None)
    print("  ratio (throughput): "
          + (f"PostgreSQL/SQLite, 1 replica {sqlite / results[1]:.2f}x" if sqlite else "")
          + (f"; {replicas} replicas / 1 replica {results[1] / results[replicas]:.2f}x" if replicas > 1 else "")
          + f"  ({load()})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=("ct", "small"))
    ap.add_argument("--workers", action="append", metavar="N|default",
                    help="clara-dicom receive workers (repeatable: each is measured; default: the adapter's default, 0)")
    ap.add_argument("--associations-only", type=int, action="append", metavar="N",
                    help="measure only N parallel associations (repeatable; default 1 and 4)")
    ap.add_argument("--no-anchors", action="store_true", help="measure clara-dicom only (no storescp, no Orthanc)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record each clara-dicom repetition with py-spy (500 Hz, native, idle) into DIR; "
                         "the CPU figures then include py-spy's overhead")
    ap.add_argument("--replicas", type=int, default=0, metavar="N",
                    help="compare N `up` replicas on a shared journal with one (needs --journal postgresql)")
    ap.add_argument("--journal", choices=("postgresql",), help="the shared journal of --replicas")
    ap.add_argument("--associations", type=int, default=4, help="parallel associations with --replicas (default 4)")
    ap.add_argument("--studies", type=int, default=1, metavar="K",
                    help="split each workload into K studies, study i sent on association i when K equals the "
                         "associations (default 1: one study, every instance joins the same group)")
    ap.add_argument("--pg-only", action="store_true",
                    help="with --replicas: skip the SQLite anchor (profiling; prints no PostgreSQL/SQLite ratio)")
    args = ap.parse_args()
    if args.studies < 1:
        ap.error("--studies must be at least 1")
    workers = args.workers or ["default"]
    tag = f"-{args.studies}studies" if args.studies > 1 else ""
    workloads = [(name + tag, files) for name, files in
                 (("ct", lambda: study(args.slices, studies=args.studies)),
                  ("small", lambda: study(args.small, 64, args.studies)))
                 if args.only in (None, name)]
    if args.replicas:
        if args.journal != "postgresql":
            ap.error("--replicas needs --journal postgresql (replicas share a PostgreSQL journal)")
        with tempfile.TemporaryDirectory(prefix="clara-bench-") as tmp:
            for name, files in workloads:
                run_replicas(name, files(), args.replicas, args.associations, args.repeat, Path(tmp),
                             args.profile, args.pg_only)
        return 0
    with tempfile.TemporaryDirectory(prefix="clara-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(CONFIG)
        assocs = tuple(args.associations_only or (1, 4))
        for name, files in workloads:
            run_workload(name, files(), args.repeat, tmp, workers, args.profile, assocs, not args.no_anchors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
