"""The adapter's durable journal (SQLite, WAL).

It records every acknowledged instance and every group with its
last-acknowledged time, so a restarted adapter (after SIGKILL) resumes exactly
where it stopped. One connection guarded by a re-entrant lock: all writes are
short, and ``atomic()`` groups the writes of one C-STORE (instance + group)
into a single commit before the success status is sent.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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
CREATE INDEX IF NOT EXISTS instances_by_group ON instances(group_id);
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


def _instance(row: tuple) -> InstanceRecord:
    (id_, owner, ae, calling, sop, cls, ts, study, series, gval, path, size, acked, gid) = row
    return InstanceRecord(owner=owner, ae_title=ae, calling_ae=calling, sop_instance_uid=sop, sop_class_uid=cls,
                          transfer_syntax=ts, study_uid=study, series_uid=series, group_value=gval, path=Path(path),
                          size=size, acked_at=acked, group_id=gid, id=id_)


def _group(row: tuple) -> GroupRecord:
    (id_, owner, ae, proc, value, settings, state, opened, last, closed) = row
    return GroupRecord(id=id_, owner=owner, ae_title=ae, processor=proc, group_value=value,
                       settings=json.loads(settings), state=state, opened_at=opened, last_ack=last, closed_at=closed)


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a process crash (SIGKILL); fsync happens at checkpoints.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            self.epoch = uuid.uuid4().hex[:12]
            self._db.execute("INSERT INTO meta(key, value) VALUES ('epoch', ?)", (self.epoch,))
        else:
            self.epoch = row[0]

    # -- transactions -------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator["Journal"]:
        """Group writes into one commit; nestable; serialises writers."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self.atomic():
            return self._db.execute(sql, args)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()

    # -- instances ----------------------------------------------------------
    def add_instance(self, rec: InstanceRecord) -> int:
        cur = self._exec(
            f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES (NULL,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (rec.owner, rec.ae_title, rec.calling_ae, rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax,
             rec.study_uid, rec.series_uid, rec.group_value, str(rec.path), rec.size, rec.acked_at, rec.group_id),
        )
        rec.id = int(cur.lastrowid)
        return rec.id

    def update_instance(self, rec: InstanceRecord) -> None:
        self._exec("UPDATE instances SET path=?, size=?, acked_at=?, group_id=?, group_value=? WHERE id=?",
                   (str(rec.path), rec.size, rec.acked_at, rec.group_id, rec.group_value, rec.id))

    def remove_instances(self, ids: list[int]) -> None:
        with self.atomic():
            self._db.executemany("DELETE FROM instances WHERE id=?", [(i,) for i in ids])

    def instances(self, owner: str | None = None, group_id: int | None = None) -> list[InstanceRecord]:
        sql, args = f"SELECT {_INSTANCE_COLUMNS} FROM instances", []
        if group_id is not None:
            sql += " WHERE group_id=?"
            args.append(group_id)
        elif owner is not None:
            sql += " WHERE owner=?"
            args.append(owner)
        return [_instance(r) for r in self._query(sql + " ORDER BY id", tuple(args))]

    def instance_paths(self) -> set[str]:
        return {r[0] for r in self._query("SELECT path FROM instances")}

    def count_instances(self) -> int:
        return int(self._query("SELECT count(*) FROM instances")[0][0])

    # -- groups -------------------------------------------------------------
    def open_group(self, owner: str, ae_title: str, processor: str, value: str, settings: dict, now: float) -> GroupRecord:
        cur = self._exec(
            "INSERT INTO groups (owner, ae_title, processor, group_value, settings, state, opened_at, last_ack) "
            "VALUES (?,?,?,?,?,'open',?,?)",
            (owner, ae_title, processor, value, json.dumps(settings, sort_keys=True), now, now),
        )
        return GroupRecord(id=int(cur.lastrowid), owner=owner, ae_title=ae_title, processor=processor,
                           group_value=value, settings=settings, state="open", opened_at=now, last_ack=now)

    def touch_group(self, group_id: int, last_ack: float) -> None:
        self._exec("UPDATE groups SET last_ack=max(last_ack, ?) WHERE id=?", (last_ack, group_id))

    def close_group(self, group_id: int, now: float) -> None:
        self._exec("UPDATE groups SET state='closed', closed_at=? WHERE id=?", (now, group_id))

    def finish_group(self, group_id: int) -> None:
        """Every job exists: release the group's instances and forget the group."""
        with self.atomic():
            self._db.execute("DELETE FROM instances WHERE group_id=?", (group_id,))
            self._db.execute("DELETE FROM groups WHERE id=?", (group_id,))
            self._db.execute("DELETE FROM jobs WHERE group_id=?", (group_id,))

    def groups(self, owner: str | None = None) -> list[GroupRecord]:
        sql = "SELECT id, owner, ae_title, processor, group_value, settings, state, opened_at, last_ack, closed_at FROM groups"
        rows = self._query(sql + (" WHERE owner=?" if owner else "") + " ORDER BY id", (owner,) if owner else ())
        return [_group(r) for r in rows]

    def next_sequence(self) -> int:
        """A number never handed out before by this journal."""
        with self.atomic():
            cur = self._db.execute("INSERT INTO sequences DEFAULT VALUES")
            self._db.execute("DELETE FROM sequences WHERE id < ?", (cur.lastrowid,))
            return int(cur.lastrowid)

    # -- jobs ---------------------------------------------------------------
    def record_job(self, name: str, group_id: int, now: float) -> None:
        self._exec("INSERT OR IGNORE INTO jobs (name, group_id, created_at) VALUES (?,?,?)", (name, group_id, now))

    def jobs_of_group(self, group_id: int) -> set[str]:
        return {r[0] for r in self._query("SELECT name FROM jobs WHERE group_id=?", (group_id,))}

    # -- owners (processor instances) ---------------------------------------
    def save_owner(self, owner: str, ae_title: str, processor: str, spec: dict) -> None:
        self._exec("INSERT INTO owners (owner, ae_title, processor, spec) VALUES (?,?,?,?) "
                   "ON CONFLICT(owner) DO UPDATE SET ae_title=excluded.ae_title, processor=excluded.processor, "
                   "spec=excluded.spec", (owner, ae_title, processor, json.dumps(spec, sort_keys=True)))

    def owners(self) -> dict[str, tuple[str, str, dict]]:
        return {o: (ae, p, json.loads(s)) for o, ae, p, s in self._query("SELECT owner, ae_title, processor, spec FROM owners")}

    def forget_owner(self, owner: str) -> None:
        self._exec("DELETE FROM owners WHERE owner=?", (owner,))
