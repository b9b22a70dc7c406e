"""The adapter's durable journal (SQLite, WAL).

It records every acknowledged instance and every group with its
last-acknowledged time, so a restarted adapter (after SIGKILL) resumes exactly
where it stopped. One connection guarded by a re-entrant lock: all writes are
short. ``transaction()`` is "commit, then publish": processors write their
records through it and register memory/timer changes with
``Transaction.after_commit``, which run only once the commit succeeded.

File paths are stored relative to the storage root (SPEC §9), so the same
journal works whatever spelling of the root (relative, symlinked) a restart uses.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

SQLITE_FULL = 13

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
  id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: plug-ins may key work on it
  owner TEXT NOT NULL,              -- processor instance (ClaraAETitle object name)
  ae_title TEXT NOT NULL,           -- called AE title
  calling_ae TEXT NOT NULL,
  sop_instance_uid TEXT NOT NULL,
  sop_class_uid TEXT NOT NULL,
  transfer_syntax TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL,
  group_value TEXT,                 -- value of the processor's group tag (may be patient data)
  path TEXT NOT NULL,
  size INTEGER NOT NULL,
  acked_at REAL NOT NULL,
  group_id INTEGER
);
CREATE INDEX IF NOT EXISTS instances_by_owner ON instances(owner);
CREATE INDEX IF NOT EXISTS instances_by_group_sop ON instances(group_id, sop_instance_uid);
CREATE TABLE IF NOT EXISTS groups (
  -- AUTOINCREMENT: a group id is never reused, because job names hash it
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  owner TEXT NOT NULL,
  ae_title TEXT NOT NULL,
  processor TEXT NOT NULL,
  group_value TEXT NOT NULL,
  settings TEXT NOT NULL,           -- JobProcessor spec frozen when the group opened (JSON)
  state TEXT NOT NULL,              -- open | closed (jobs being created)
  opened_at REAL NOT NULL,
  last_ack REAL NOT NULL,
  closed_at REAL
);
CREATE INDEX IF NOT EXISTS groups_by_key ON groups(owner, group_value, state);
CREATE TABLE IF NOT EXISTS owners (
  owner TEXT PRIMARY KEY,
  ae_title TEXT NOT NULL,
  processor TEXT NOT NULL,
  spec TEXT NOT NULL                -- last JobProcessor spec (JSON), to recover after removal
);
CREATE TABLE IF NOT EXISTS sequences (id INTEGER PRIMARY KEY AUTOINCREMENT);
CREATE TABLE IF NOT EXISTS jobs (
  name TEXT PRIMARY KEY,
  group_id INTEGER NOT NULL,
  created_at REAL NOT NULL
);
"""


@dataclass
class InstanceRecord:
    owner: str
    ae_title: str
    calling_ae: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    path: Path
    size: int
    acked_at: float
    group_value: str | None = None
    group_id: int | None = None
    id: int | None = None
    tags: dict[int, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class GroupRecord:
    id: int
    owner: str
    ae_title: str
    processor: str
    group_value: str
    settings: dict[str, Any]
    state: str
    opened_at: float
    last_ack: float
    closed_at: float | None = None


_INSTANCE_COLUMNS = (
    "id, owner, ae_title, calling_ae, sop_instance_uid, sop_class_uid, transfer_syntax, study_uid, "
    "series_uid, group_value, path, size, acked_at, group_id"
)


def _instance(row: tuple, root: Path) -> InstanceRecord:
    (id_, owner, ae, calling, sop, cls, ts, study, series, gval, path, size, acked, gid) = row
    return InstanceRecord(owner=owner, ae_title=ae, calling_ae=calling, sop_instance_uid=sop, sop_class_uid=cls,
                          transfer_syntax=ts, study_uid=study, series_uid=series, group_value=gval,
                          path=root / path, size=size, acked_at=acked, group_id=gid, id=id_)


def _group(row: tuple) -> GroupRecord:
    (id_, owner, ae, proc, value, settings, state, opened, last, closed) = row
    return GroupRecord(id=id_, owner=owner, ae_title=ae, processor=proc, group_value=value,
                       settings=json.loads(settings), state=state, opened_at=opened, last_ack=last, closed_at=closed)


class TransactionAborted(Exception):
    """The whole transaction was rolled back (e.g. SQLite undid it after SQLITE_FULL)."""


class Transaction:
    """One journal transaction, possibly holding the records of several instances.

    ``journal`` writes join the transaction; ``after_commit(fn)`` queues a
    memory/timer change that runs, in order, only once the commit succeeded.
    ``now`` (wall clock, for records) and ``mono`` (monotonic, for timers) are
    the same instant, taken when the transaction began.
    """

    def __init__(self, journal: "JournalBase", now: float, mono: float):
        self.journal = journal
        self.now = now
        self.mono = mono
        self.pending: dict[Any, Any] = {}  # plug-ins' decisions not yet published (see processors/base.py)
        self._callbacks: list[Callable[[], None]] = []
        self._savepoints = 0

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)

    @property
    def has_callbacks(self) -> bool:
        return bool(self._callbacks)

    @contextmanager
    def step(self) -> Iterator["Transaction"]:
        """A savepoint: if the body raises, its writes and its ``after_commit``
        callbacks are undone and the rest of the transaction goes on."""
        journal = self.journal
        self._savepoints += 1
        name = f"s{self._savepoints}"
        mark, pending = len(self._callbacks), dict(self.pending)
        journal._execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException as exc:
            del self._callbacks[mark:]
            self.pending = pending
            try:
                journal._execute(f"ROLLBACK TO SAVEPOINT {name}")
                journal._execute(f"RELEASE SAVEPOINT {name}")
            except Exception:  # SQLite already rolled the whole transaction back (e.g. SQLITE_FULL)
                raise TransactionAborted(f"transaction rolled back: {exc}") from exc
            raise
        journal._execute(f"RELEASE SAVEPOINT {name}")

    def publish(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # the record is committed; one bad callback must not stop the others
                log.exception("after-commit callback failed")


def is_out_of_resources(exc: BaseException) -> bool:
    """Disk full, or the journal's database out of reach: worth a retry by the sender (0xA700)."""
    if isinstance(exc, TransactionAborted) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(exc)
    if isinstance(exc, OSError):
        return exc.errno in (28, 122)  # ENOSPC, EDQUOT
    module = type(exc).__module__ or ""
    if module.startswith(("psycopg", "psycopg_pool")):
        import psycopg

        return isinstance(exc, (psycopg.OperationalError, psycopg.errors.DiskFull, psycopg.errors.OutOfMemory))
    return False


class GroupTakenOver(Exception):
    """This replica closed the group, then stalled long enough (no heartbeat for
    ``dead_after``) for another replica to take it over: its late writes match no row."""


class JournalBase:
    """The journal's records and rules in SQL both back-ends speak (``?``
    placeholders, ``RETURNING``, ``ON CONFLICT``). A back-end supplies the
    connection primitives: ``_execute``, ``_executemany``, ``_begin``,
    ``_commit``, ``_rollback_raw`` and ``close``. Every call runs under one
    re-entrant lock; a transaction spans ``atomic()``.

    ``shared``: several adapter processes (replicas) may use this journal at
    once; groups then live in the database alone (see journal_pg.py and
    shared_groups.py) instead of in one process's memory and timers."""

    shared = False
    # Transactions that may run at once, each on its own connection (``transaction(concurrent=True)``);
    # 1: every transaction is serialised under ``lock`` (SQLite: one connection, one writer).
    concurrent_transactions = 1

    def _setup(self, root: Path) -> None:
        self.root = root
        self._abs_root = os.path.join(os.path.abspath(root), "")  # with its trailing separator
        self._lock = threading.RLock()
        self._depth = 0
        self.commits = 0  # committed write transactions (group-commit tests and benchmarks read it)

    def _load_epoch(self) -> None:
        with self.atomic():
            self._execute("INSERT INTO meta (key, value) VALUES ('epoch', ?) ON CONFLICT (key) DO NOTHING",
                          (uuid.uuid4().hex[:12],))
        self.epoch = self._query("SELECT value FROM meta WHERE key='epoch'")[0][0]
        self._migrate_absolute_paths()

    def available(self) -> bool:
        """Can the journal take writes now? (New associations are refused while not.)"""
        return True

    # back-end primitives
    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback_raw(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- paths --------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        """``path`` relative to the storage root, however either is spelled."""
        text = os.path.abspath(path)
        base = self._abs_root
        if text.startswith(base):  # the usual case, without pathlib or resolve() (per instance, on the hot path)
            return text[len(base):]
        path = Path(text)
        try:
            return str(path.resolve().relative_to(self.root.resolve()))  # spelled differently (symlinks)
        except ValueError:
            return str(path)  # outside the root (a plug-in's own file): kept absolute

    def _migrate_absolute_paths(self) -> None:
        """Journals written before paths were relative held absolute paths as the
        root was spelled then; files always live in ``<root>/incoming``."""
        rows = self._query("SELECT id, path FROM instances WHERE substr(path, 1, 1) = '/'")
        if not rows:
            return
        updates = []
        for id_, text in rows:
            old = Path(text)
            rel = self._rel(old)
            if Path(rel).is_absolute() and old.parent.name == "incoming":
                rel = f"incoming/{old.name}"
            if rel != text:  # a plug-in's own file outside the root stays as it is
                updates.append((rel, id_))
        if not updates:
            return
        with self.atomic():
            self._executemany("UPDATE instances SET path=? WHERE id=?", updates)
        log.info("journal: %d instance paths made relative to the storage root", len(updates))

    # -- transactions -------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator["JournalBase"]:
        """Group writes into one commit; nestable; serialises writers."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._begin()
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._rollback()
                raise
            self._depth -= 1
            if outer:
                try:
                    self._commit()
                except BaseException:
                    self._rollback()
                    raise
                self.commits += 1

    def _rollback(self) -> None:
        try:
            self._rollback_raw()
        except Exception as exc:
            log.warning("journal rollback failed: %s", exc)

    @contextmanager
    def transaction(self, now: float, mono: float, concurrent: bool = False,
                    alone: bool = False) -> Iterator[Transaction]:
        """Commit, then publish: the body's writes are committed together, then
        its ``after_commit`` callbacks run (still under the lock, so timers and
        other writers see memory and journal agree). On any failure nothing is
        published. ``concurrent``: the body reads no process memory, so it may
        overlap other transactions where the back-end allows (journal_pg.py);
        here it is serialised all the same. ``alone``: the body journals one
        instance and nothing after it (a back-end may commit with that write:
        journal_pg.py); ignored here."""
        with self._lock:
            tx = Transaction(self, now, mono)
            with self.atomic():
                yield tx
            tx.publish()

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.atomic():
            return self._execute(sql, args)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._execute(sql, args)

    # -- instances ----------------------------------------------------------
    def add_instance(self, rec: InstanceRecord) -> int:
        rows = self._exec(
            f"INSERT INTO instances ({_INSTANCE_COLUMNS.removeprefix('id, ')}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "RETURNING id",
            (rec.owner, rec.ae_title, rec.calling_ae, rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax,
             rec.study_uid, rec.series_uid, rec.group_value, self._rel(rec.path), rec.size, rec.acked_at,
             rec.group_id),
        )
        rec.id = int(rows[0][0])
        return rec.id

    def update_instance(self, rec: InstanceRecord) -> None:
        self._exec("UPDATE instances SET path=?, size=?, acked_at=?, group_id=?, group_value=? WHERE id=?",
                   (self._rel(rec.path), rec.size, rec.acked_at, rec.group_id, rec.group_value, rec.id))

    def remove_instances(self, ids: list[int]) -> None:
        with self.atomic():
            self._executemany("DELETE FROM instances WHERE id=?", [(i,) for i in ids])

    def instances(self, owner: str | None = None, group_id: int | None = None) -> list[InstanceRecord]:
        sql, args = f"SELECT {_INSTANCE_COLUMNS} FROM instances", []
        if group_id is not None:
            sql += " WHERE group_id=?"
            args.append(group_id)
        elif owner is not None:
            sql += " WHERE owner=?"
            args.append(owner)
        return [_instance(r, self.root) for r in self._query(sql + " ORDER BY id", tuple(args))]

    def group_member(self, group_id: int, sop_instance_uid: str) -> InstanceRecord | None:
        """The instance with this SOP Instance UID in the group (sees the open transaction's writes)."""
        rows = self._query(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE group_id=? AND sop_instance_uid=? "
                           "ORDER BY id LIMIT 1", (group_id, sop_instance_uid))
        return _instance(rows[0], self.root) if rows else None

    def instance_paths(self) -> set[Path]:
        """Absolute paths (under the root as spelled now) of every held instance."""
        return {self.root / r[0] for r in self._query("SELECT path FROM instances")}

    def count_instances(self) -> int:
        return int(self._query("SELECT count(*) FROM instances")[0][0])

    # -- groups -------------------------------------------------------------
    def open_group(self, owner: str, ae_title: str, processor: str, value: str, settings: dict, now: float) -> GroupRecord:
        rows = self._exec(
            "INSERT INTO groups (owner, ae_title, processor, group_value, settings, state, opened_at, last_ack) "
            "VALUES (?,?,?,?,?,'open',?,?) RETURNING id",
            (owner, ae_title, processor, value, json.dumps(settings, sort_keys=True), now, now),
        )
        return GroupRecord(id=int(rows[0][0]), owner=owner, ae_title=ae_title, processor=processor,
                           group_value=value, settings=settings, state="open", opened_at=now, last_ack=now)

    def touch_group(self, group_id: int, last_ack: float) -> None:
        self._exec("UPDATE groups SET last_ack = CASE WHEN last_ack < ? THEN ? ELSE last_ack END WHERE id=?",
                   (last_ack, last_ack, group_id))

    def close_group(self, group_id: int, now: float) -> None:
        self._exec("UPDATE groups SET state='closed', closed_at=? WHERE id=?", (now, group_id))

    def owns_group(self, group_id: int) -> bool:
        """Is the closed group still this process's to finish? Always, on a journal
        no other process writes (a shared one fences replicas: journal_pg.py)."""
        return True

    def finish_group(self, group_id: int) -> None:
        """Every job exists (or the group was quarantined): release its instances and forget it."""
        with self.atomic():
            self._execute("DELETE FROM instances WHERE group_id=?", (group_id,))
            self._execute("DELETE FROM groups WHERE id=?", (group_id,))
            self._execute("DELETE FROM jobs WHERE group_id=?", (group_id,))

    def groups(self, owner: str | None = None) -> list[GroupRecord]:
        sql = "SELECT id, owner, ae_title, processor, group_value, settings, state, opened_at, last_ack, closed_at FROM groups"
        rows = self._query(sql + (" WHERE owner=?" if owner else "") + " ORDER BY id", (owner,) if owner else ())
        return [_group(r) for r in rows]

    def next_sequence(self) -> int:
        """A number never handed out before by this journal."""
        with self.atomic():
            number = int(self._execute("INSERT INTO sequences DEFAULT VALUES RETURNING id")[0][0])
            self._execute("DELETE FROM sequences WHERE id < ?", (number,))
            return number

    # -- jobs ---------------------------------------------------------------
    def record_job(self, name: str, group_id: int, now: float) -> None:
        self._exec("INSERT INTO jobs (name, group_id, created_at) VALUES (?,?,?) ON CONFLICT (name) DO NOTHING", (name, group_id, now))

    def jobs_of_group(self, group_id: int) -> set[str]:
        return {r[0] for r in self._query("SELECT name FROM jobs WHERE group_id=?", (group_id,))}

    # -- owners (processor instances) ---------------------------------------
    def save_owner(self, owner: str, ae_title: str, processor: str, spec: dict) -> None:
        self._exec("INSERT INTO owners (owner, ae_title, processor, spec) VALUES (?,?,?,?) "
                   "ON CONFLICT (owner) DO UPDATE SET ae_title=excluded.ae_title, processor=excluded.processor, "
                   "spec=excluded.spec", (owner, ae_title, processor, json.dumps(spec, sort_keys=True)))

    def owners(self) -> dict[str, tuple[str, str, dict]]:
        return {o: (ae, p, json.loads(s)) for o, ae, p, s in self._query("SELECT owner, ae_title, processor, spec FROM owners")}

    def forget_owner(self, owner: str) -> None:
        self._exec("DELETE FROM owners WHERE owner=?", (owner,))


class Journal(JournalBase):
    """The SQLite journal (WAL), a file under the storage root: the default."""

    def __init__(self, path: str | Path, root: str | Path | None = None, durable: bool = False):
        """``root``: the storage root that paths are relative to (default: the
        journal's folder). ``durable``: fsync every commit (``synchronous=FULL``),
        for power-loss safety; otherwise a commit survives a process crash."""
        self.path = Path(path)
        self.durable = durable
        self._setup(Path(root) if root is not None else self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(SCHEMA)
        self._load_epoch()

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        self._db.executemany(sql, rows)

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback_raw(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()


def open_journal(spec: str | None, root: str | Path, durable: bool = False) -> JournalBase:
    """The journal named by ``spec`` (setting ``journal``): empty for the SQLite file
    ``<root>/journal.sqlite``, a file path for SQLite elsewhere, or a
    PostgreSQL DSN (``postgresql://…`` or libpq ``key=value`` pairs)."""
    from clara_dicom.dsn import FOREIGN_URL_HINT, is_foreign_url, is_postgres_dsn, redacted
    from clara_dicom.errors import UserError

    if spec and is_foreign_url(spec):  # not a file name: refused, not made a SQLite file named after it
        raise UserError(f"journal {redacted(spec)}: {FOREIGN_URL_HINT}")
    if spec and is_postgres_dsn(spec):
        from clara_adapter.journal_pg import PostgresJournal

        try:
            return PostgresJournal(spec, root=root)
        except Exception as exc:  # unreachable, bad credentials, no such database: one line for the user
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"journal {redacted(spec)}: cannot open ({type(exc).__name__}: {first})") from None
    return Journal(Path(spec) if spec else Path(root) / "journal.sqlite", root=root, durable=durable)
