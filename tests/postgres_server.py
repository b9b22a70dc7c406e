"""A throw-away PostgreSQL server (Debian binaries) on 127.0.0.1, for the
adapter's journal tests and the Results Service tests (tests/results/conftest.py).
Without the binaries the tests skip, except under CI=true where they fail loudly."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Iterator

import pytest

from peers import free_port


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PostgresServer:
    # Tests trade durability for speed (a throw-away server); DurablePostgresServer does not.
    SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.tmp = tempfile.mkdtemp(prefix="clara-journal-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres refuses to run as root
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            self.run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            [os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env, cwd=self.tmp,
            **self.run_as,
        )
        self.launch()

    def launch(self) -> None:
        """Start the server on the existing data folder (after ``start`` or ``halt``)."""
        self.log = open(os.path.join(self.tmp, "postgres.log"), "ab")
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.tmp}",
             *(arg for setting in self.SETTINGS for arg in ("-c", setting)),
             "-c", "max_connections=60", "-c", "shared_buffers=32MB"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp, **self.run_as,
        )
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {open(os.path.join(self.tmp, 'postgres.log')).read()[-2000:]}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def halt(self) -> None:
        """Stop the server, keeping its data (``launch`` brings it back)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        with contextlib.suppress(Exception):
            self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def fresh_database(self, name: str) -> str:
        """An empty database ``name`` (dropped first if it exists); its DSN."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn.rsplit("/", 1)[0] + f"/{name}"


class DurablePostgresServer(PostgresServer):
    """PostgreSQL's durable defaults (fsync, synchronous_commit and full_page_writes
    on: a commit is flushed to disk before it returns), as in production: for benchmarks."""

    SETTINGS = ()


def bindir_or_skip() -> str:
    bindir = _pg_bindir()
    if bindir is None:
        message = "PostgreSQL binaries (initdb, postgres) not found: install Debian postgresql"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return bindir


@contextlib.contextmanager
def running(cls: type[PostgresServer] = PostgresServer) -> Iterator[PostgresServer]:
    """A started server of ``cls``, stopped (and its folder removed) afterwards."""
    pg = cls(bindir_or_skip())
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session (tests take a fresh database each)."""
    with running() as pg:
        yield pg


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A server of this test's own, which the test may halt and launch again."""
    with running() as pg:
        yield pg


@contextlib.contextmanager
def packets_dropped(port: int):
    """The network between here and ``port`` on 127.0.0.1 drops every packet (a partition:
    no reset, nothing answered), with iptables, for this test's own server port only."""
    rules = [["OUTPUT", "-o", "lo", "-p", "tcp", flag, str(port), "-j", "DROP"] for flag in ("--dport", "--sport")]
    usable = shutil.which("iptables") is not None and os.geteuid() == 0 and subprocess.run(
        ["iptables", "-S", "OUTPUT"], capture_output=True).returncode == 0
    from local_setup import require

    require(usable, "iptables as root (apt-get install iptables)")
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=True)
