"""Task storage: SQLite (embedded, the default) and PostgreSQL (production).

Both back-ends implement :class:`TaskStore` with the same SQL and the same
rules; only connection handling and the DDL differ. All state transitions
happen here, so the server alone decides retries (SPEC §4, §9 "Results Service
leases"):

* ``lease``: Pending tasks whose ``available_at`` has come, and InProgress tasks
  whose lease has expired (and whose back-off has passed), become InProgress with
  a fresh lease: a new ``lease_id`` and ``lease_expires_at`` (FIFO). Concurrent
  callers, in one process or in several on one database, never receive the same
  task (SQLite: one writer at a time; PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
* An expired lease counts as a failed attempt with ``retryLater``: the task is
  *reported* with ``retries + 1`` and as Pending (available after the usual
  back-off, counted from the expiry) or, at ``max_retries``, as Failed — so a
  task that kills or hangs its agent cannot loop forever. Nothing has to sweep
  it: reads project the expiry, ``lease`` applies it when it hands the task out
  again, ``purge`` writes the Failed ones.
* Reports (``report_success``/``report_failure``) and ``renew`` are fenced by the
  lease: a ``lease_id`` that is not the task's current one → TaskConflict, no
  change. Until the task is leased again, an expired lease is still the current
  one: its holder may renew it or report (then the expiry is not counted).
  Repeating the report that ended a lease, with that lease, returns the task
  unchanged. Without a ``lease_id`` (clients written for Clara) a report is
  accepted while the task is InProgress, and success is idempotent.
* ``report_failure``: ``retries + 1``; back to Pending (available after
  ``retry_delay * 2**(retries-1)`` seconds) while ``retry_later`` and
  ``retries < max_retries``, else Failed.
* ``purge``: finished tasks older than ``retention_seconds`` are deleted.

Times come from ``clock`` (seconds since the epoch) so tests can control them. On
PostgreSQL the default clock is the database's: replicas of the service compare
lease expiries on one clock, so one whose host clock runs ahead cannot hand out a
lease another holds.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

from clara_dicom.dsn import (FOREIGN_URL_HINT, IDLE_IN_TRANSACTION_SECONDS, NETWORK_TIMEOUT_SECONDS,
                             is_foreign_url, is_postgres_dsn, redacted, session_limits)
from clara_results.models import NewTask, Task, TaskState

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
DEFAULT_LEASE_SECONDS = 300.0
DEFAULT_RETRY_DELAY = 10.0
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0
#: The back-off doubles per retry up to this many doublings.
MAX_BACKOFF_DOUBLINGS = 20


class StoreError(Exception):
    """Base class of the errors the store raises on purpose."""


class TaskNotFound(StoreError):
    pass


class TaskConflict(StoreError):
    """The task exists but is not in a state that allows the operation."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or used right now (HTTP 503)."""


_COLUMNS = (
    "seq, id, idempotency_key, job_id, pipeline_id, payload_id, operator, agent, parameters, uris, "
    "state, retries, created_at, updated_at, available_at, lease_expires_at, finished_at, lease_id"
)
# Positions in a row of _COLUMNS.
_STATE, _RETRIES, _LEASE_EXPIRES, _LEASE_ID = 10, 11, 15, 17

_IN_PROGRESS, _PENDING, _SUCCEEDED, _FAILED = (int(s) for s in (
    TaskState.IN_PROGRESS, TaskState.PENDING, TaskState.SUCCEEDED, TaskState.FAILED))


def _short(value: str, n: int = 40) -> str:
    return value if len(value) <= n else value[:n] + "…"


class TaskStore:
    """Common logic; subclasses supply ``_transaction()``, the DDL and ``_new_lease_id_sql``."""

    placeholder = "?"
    kind = "abstract"
    #: SQL giving a fresh, random lease id (32 hex digits) for every row it is evaluated for.
    _new_lease_id_sql = ""

    def __init__(
        self,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_retries < 1:
            raise ValueError("max_retries must be at least 1")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if retry_delay < 0 or retention_seconds < 0:
            raise ValueError("retry_delay and retention_seconds must not be negative")
        self.max_retries = max_retries
        self.lease_seconds = float(lease_seconds)
        self.retry_delay = float(retry_delay)
        self.retention_seconds = float(retention_seconds)
        self.clock = clock

    # -- back-end hooks -------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _skip_locked(self) -> str:
        return ""

    def _select_for_update(self) -> str:
        return ""

    def close(self) -> None:
        pass

    # -- rules ----------------------------------------------------------------
    def backoff(self, retries: int) -> float:
        """Seconds a task waits after its ``retries``-th failed attempt before it can be leased again."""
        return self.retry_delay * (2 ** min(max(retries - 1, 0), MAX_BACKOFF_DOUBLINGS))

    def _expired(self, row: Sequence[Any], now: float) -> bool:
        return row[_STATE] == _IN_PROGRESS and row[_LEASE_EXPIRES] is not None and row[_LEASE_EXPIRES] <= now

    def _row_to_task(self, row: Sequence[Any], now: float, *, with_lease: bool = False) -> Task:
        """The task as it stands at ``now``: an expired lease is projected as the failed attempt it counts as."""
        (_seq, id_, key, job_id, pipeline_id, payload_id, operator, agent, parameters, uris, state, retries,
         created_at, updated_at, available_at, lease_expires_at, finished_at, lease_id) = row
        if self._expired(row, now):
            retries, updated_at = retries + 1, lease_expires_at
            if retries >= self.max_retries:
                state, finished_at = _FAILED, lease_expires_at
            else:
                state, available_at = _PENDING, lease_expires_at + self.backoff(retries)
        return Task(
            id=id_,
            job_id=job_id,
            pipeline_id=pipeline_id,
            payload_id=payload_id,
            agent=agent,
            parameters=parameters,
            uris=tuple(json.loads(uris)),
            state=TaskState(state),
            retries=retries,
            created_at=created_at,
            updated_at=updated_at,
            operator=operator,
            idempotency_key=key,
            available_at=available_at,
            lease_expires_at=lease_expires_at if state == _IN_PROGRESS else None,
            finished_at=finished_at,
            lease_id=lease_id if with_lease else None,
        )

    def _effective_state_sql(self, now: float) -> tuple[str, list[Any]]:
        """SQL for a row's state at ``now`` (see :meth:`_row_to_task`), with its parameters."""
        return (
            "(CASE WHEN state = ? AND lease_expires_at <= ? THEN (CASE WHEN retries + 1 >= ? THEN ? ELSE ? END) "
            "ELSE state END)",
            [_IN_PROGRESS, now, self.max_retries, _FAILED, _PENDING],
        )

    # -- operations -----------------------------------------------------------
    def create(self, new: NewTask) -> tuple[Task, bool]:
        """Insert a task; returns (task, created). An existing idempotency key returns the stored task."""
        now = self.clock()
        task_id = str(uuid.uuid4())
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    f"INSERT INTO tasks (id, idempotency_key, job_id, pipeline_id, payload_id, operator, agent, "
                    f"parameters, uris, state, retries, created_at, updated_at, available_at) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) "
                    f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_COLUMNS}"
                ),
                (task_id, new.idempotency_key, new.job_id, new.pipeline_id, new.payload_id, new.operator,
                 new.agent, new.parameters, json.dumps(list(new.uris)), _PENDING, now, now, now),
            )
            row = cur.fetchone()
            if row is not None:
                return self._row_to_task(row, now), True
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM tasks WHERE idempotency_key = ?"), (new.idempotency_key,))
            row = cur.fetchone()
        if row is None:  # deleted between the two statements: extremely unlikely
            raise StoreUnavailable("task vanished while being created; try again")
        return self._row_to_task(row, now), False

    def lease(self, agent: str, size: int) -> list[Task]:
        """Lease up to ``size`` tasks for ``agent`` (oldest first), each with a new lease id.

        A task taken over from an expired lease gets ``retries + 1`` (the expired lease was an
        attempt); one whose expired lease used up ``max_retries`` is not handed out again.
        """
        now = self.clock()
        sql = self._sql(
            f"UPDATE tasks SET retries = retries + (CASE WHEN state = ? THEN 1 ELSE 0 END), state = ?, "
            f"lease_id = {self._new_lease_id_sql}, lease_expires_at = ?, updated_at = ? "
            f"WHERE seq IN (SELECT seq FROM tasks WHERE agent = ? AND ("
            f"(state = ? AND available_at <= ?) OR "
            f"(state = ? AND lease_expires_at <= ? AND retries + 1 < ? AND lease_expires_at + ? * "
            f"(1 << (CASE WHEN retries > ? THEN ? ELSE retries END)) <= ?)"
            f") ORDER BY seq LIMIT ?{self._skip_locked()}) RETURNING {_COLUMNS}"
        )
        with self._transaction() as cur:
            cur.execute(sql, (
                _IN_PROGRESS, _IN_PROGRESS, now + self.lease_seconds, now,
                agent, _PENDING, now,
                _IN_PROGRESS, now, self.max_retries, self.retry_delay,
                MAX_BACKOFF_DOUBLINGS, MAX_BACKOFF_DOUBLINGS, now,
                size,
            ))
            rows = cur.fetchall()
        tasks = [self._row_to_task(r, now, with_lease=True) for r in rows]
        tasks.sort(key=lambda t: (t.created_at, t.id))
        return tasks

    def _locked_row(self, cur: Any, task_id: str) -> Sequence[Any]:
        cur.execute(self._sql(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?{self._select_for_update()}"), (task_id,))
        row = cur.fetchone()
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return row

    @staticmethod
    def _check_lease(row: Sequence[Any], task_id: str, lease_id: str | None) -> None:
        if lease_id is not None and row[_LEASE_ID] != lease_id:
            raise TaskConflict(
                f"lease {_short(lease_id)!r} is not the current lease of task {task_id} (a newer lease "
                f"superseded it, or it is unknown); nothing was changed")

    def _live(self, row: Sequence[Any], now: float, task_id: str) -> None:
        """Raise TaskConflict unless the row's lease can still take a report or a renewal."""
        state = row[_STATE]
        if state == _IN_PROGRESS and self._expired(row, now) and row[_RETRIES] + 1 >= self.max_retries:
            raise TaskConflict(f"task {task_id} has failed: its lease expired and that was its last attempt "
                               f"(--max-retries {self.max_retries})")
        if state == _SUCCEEDED:
            raise TaskConflict(f"task {task_id} has already succeeded")
        if state == _FAILED:
            raise TaskConflict(f"task {task_id} has already failed")
        if state != _IN_PROGRESS:
            raise TaskConflict(f"task {task_id} is not leased; lease it before reporting its result")

    def report_success(self, task_id: str, lease_id: str | None = None) -> Task:
        now = self.clock()
        with self._transaction() as cur:
            row = self._locked_row(cur, task_id)
            self._check_lease(row, task_id, lease_id)
            if row[_STATE] == _SUCCEEDED:  # a repeated report: harmless
                return self._row_to_task(row, now)
            self._live(row, now, task_id)
            cur.execute(
                self._sql(
                    f"UPDATE tasks SET state = ?, lease_expires_at = NULL, finished_at = ?, updated_at = ? "
                    f"WHERE id = ? RETURNING {_COLUMNS}"
                ),
                (_SUCCEEDED, now, now, task_id),
            )
            return self._row_to_task(cur.fetchone(), now)

    def report_failure(self, task_id: str, retry_later: bool, lease_id: str | None = None) -> Task:
        now = self.clock()
        with self._transaction() as cur:
            row = self._locked_row(cur, task_id)
            self._check_lease(row, task_id, lease_id)
            # With its lease, a failure report repeated after it ended the lease (task back to
            # Pending, or Failed) is harmless: a lease id only leaves InProgress by being reported.
            if lease_id is not None and row[_STATE] in (_PENDING, _FAILED):
                return self._row_to_task(row, now)
            self._live(row, now, task_id)
            retries = row[_RETRIES] + 1
            if retry_later and retries < self.max_retries:
                cur.execute(
                    self._sql(
                        f"UPDATE tasks SET state = ?, retries = ?, lease_expires_at = NULL, available_at = ?, "
                        f"updated_at = ? WHERE id = ? RETURNING {_COLUMNS}"
                    ),
                    (_PENDING, retries, now + self.backoff(retries), now, task_id),
                )
            else:
                cur.execute(
                    self._sql(
                        f"UPDATE tasks SET state = ?, retries = ?, lease_expires_at = NULL, finished_at = ?, "
                        f"updated_at = ? WHERE id = ? RETURNING {_COLUMNS}"
                    ),
                    (_FAILED, retries, now, now, task_id),
                )
            return self._row_to_task(cur.fetchone(), now)

    def renew(self, task_id: str, lease_id: str) -> float:
        """Extend the lease ``lease_id`` of a task to ``lease_seconds`` from now; returns the new expiry.

        Works for an expired lease not yet handed to anyone else; TaskConflict once another
        lease exists or the task is finished."""
        now = self.clock()
        with self._transaction() as cur:
            row = self._locked_row(cur, task_id)
            self._check_lease(row, task_id, lease_id)
            if row[_STATE] == _PENDING:
                raise TaskConflict(f"lease {_short(lease_id)!r} of task {task_id} has ended with a failure report")
            self._live(row, now, task_id)
            expires = now + self.lease_seconds
            cur.execute(self._sql("UPDATE tasks SET lease_expires_at = ?, updated_at = ? WHERE id = ?"),
                        (expires, now, task_id))
            return expires

    def get(self, task_id: str) -> Task:
        now = self.clock()
        with self._transaction() as cur:
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?"), (task_id,))
            row = cur.fetchone()
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return self._row_to_task(row, now)

    def list(
        self,
        *,
        agent: str | None = None,
        state: TaskState | None = None,
        job_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        """Tasks matching all given filters, oldest first. ``state`` is the effective state."""
        now = self.clock()
        where, params = [], []
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        if state is not None:
            effective, eff_params = self._effective_state_sql(now)
            where.append(f"{effective} = ?")
            params += eff_params + [int(state)]
        sql = f"SELECT {_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self._transaction() as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
        return [self._row_to_task(r, now) for r in rows]

    def count_by_state(self) -> dict[TaskState, int]:
        now = self.clock()
        counts = {s: 0 for s in TaskState}
        effective, params = self._effective_state_sql(now)
        with self._transaction() as cur:
            cur.execute(self._sql(f"SELECT {effective} AS s, COUNT(*) FROM tasks GROUP BY 1"), params)
            for s, n in cur.fetchall():
                counts[TaskState(int(s))] += int(n)
        return counts

    def purge(self) -> int:
        """Write the tasks whose last attempt was an expired lease as Failed, then delete finished
        tasks older than the retention period; returns how many were deleted."""
        now = self.clock()
        cutoff = now - self.retention_seconds
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "UPDATE tasks SET state = ?, retries = retries + 1, finished_at = lease_expires_at, "
                    "updated_at = lease_expires_at, lease_expires_at = NULL "
                    "WHERE state = ? AND lease_expires_at <= ? AND retries + 1 >= ?"
                ),
                (_FAILED, _IN_PROGRESS, now, self.max_retries),
            )
            cur.execute(
                self._sql("DELETE FROM tasks WHERE state IN (?, ?) AND finished_at <= ?"),
                (_SUCCEEDED, _FAILED, cutoff),
            )
            return max(cur.rowcount, 0)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        with self._transaction() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()


_TABLE_COLUMNS = """
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    job_id TEXT NOT NULL,
    pipeline_id TEXT NOT NULL,
    payload_id TEXT NOT NULL,
    operator TEXT,
    agent TEXT NOT NULL,
    parameters TEXT,
    uris TEXT NOT NULL,
    state INTEGER NOT NULL,
    retries INTEGER NOT NULL DEFAULT 0,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    available_at {real} NOT NULL,
    lease_expires_at {real},
    finished_at {real},
    lease_id TEXT
"""
_INDEXES = {  # name: its DDL
    "tasks_agent_state": "CREATE INDEX IF NOT EXISTS tasks_agent_state ON tasks (agent, state, seq)",
    "tasks_finished": "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (state, finished_at)",
    "tasks_job": "CREATE INDEX IF NOT EXISTS tasks_job ON tasks (job_id)",
}


class SQLiteStore(TaskStore):
    """SQLite file (or ``:memory:``); one connection, one writer at a time."""

    kind = "sqlite"
    _new_lease_id_sql = "lower(hex(randomblob(16)))"

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise StoreUnavailable(f"directory {parent} for the SQLite database does not exist")
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
        with self._transaction() as cur:  # BEGIN IMMEDIATE: processes starting together take turns
            cur.execute("CREATE TABLE IF NOT EXISTS tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                        + _TABLE_COLUMNS.format(real="REAL") + ")")
            cur.execute("PRAGMA table_info(tasks)")
            if "lease_id" not in {r[1] for r in cur.fetchall()}:  # a database made before leases were fenced
                cur.execute("ALTER TABLE tasks ADD COLUMN lease_id TEXT")
            for ddl in _INDEXES.values():
                cur.execute(ddl)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                else:
                    self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite: {exc}") from exc
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStore(TaskStore):
    """PostgreSQL through psycopg 3 and a ``psycopg_pool.ConnectionPool``.

    Several processes may share one database: leases use ``FOR UPDATE SKIP LOCKED``,
    reports and renewals lock their row, and schema creation and migrations run under
    a transaction-level advisory lock so replicas starting together on an empty
    database take turns.
    """

    kind = "postgres"
    placeholder = "%s"
    _new_lease_id_sql = "replace(gen_random_uuid()::text, '-', '')"
    #: pg_advisory_xact_lock key serialising schema creation and migrations.
    SCHEMA_LOCK = 7316541

    def __init__(self, dsn: str, pool_size: int = 8, connect_timeout: float = 5.0,
                 pool_timeout: float = 10.0, clock: Callable[[], float] | None = None,
                 idle_in_transaction: float = IDLE_IN_TRANSACTION_SECONDS,
                 network_timeout: float = NETWORK_TIMEOUT_SECONDS, **kwargs: Any) -> None:
        """``clock``: for tests; by default the database's clock (see the module docstring).
        ``idle_in_transaction``, ``network_timeout``: ``clara_dicom.dsn.session_limits`` (a
        stalled replica's locked task row is freed; a cut-off database answers 503)."""
        super().__init__(clock=clock or self._database_now, **kwargs)
        import psycopg
        from psycopg_pool import ConnectionPool

        connect_kwargs: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout)),
                                          **session_limits(idle_in_transaction, network_timeout)}
        # The schema on a connection of its own: its failure carries libpq's own reason
        # (a pool would only say it timed out).
        try:
            with psycopg.connect(dsn, **connect_kwargs) as conn:
                self._create_schema(conn)
        except psycopg.Error as exc:
            # The DSN may hold a password: never echo it.
            raise StoreUnavailable(f"cannot use PostgreSQL: {_first_line(exc)}") from exc
        self._pool = ConnectionPool(dsn, kwargs=connect_kwargs, min_size=1, max_size=pool_size,
                                    timeout=pool_timeout, name="clara-results", open=True)

    @classmethod
    def _create_schema(cls, conn: Any) -> None:
        """DDL only when something is missing: even ``ALTER TABLE … IF NOT EXISTS`` and
        ``CREATE INDEX IF NOT EXISTS`` lock the table, so a replica starting (a rolling
        update) would wait for every open transaction on ``tasks`` and make every other
        replica's requests queue behind it."""
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (cls.SCHEMA_LOCK,))
            cur.execute("SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('tasks') "
                        "AND attname = 'lease_id' AND NOT attisdropped) "
                        "AND NOT EXISTS (SELECT FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL)",
                        (list(_INDEXES),))
            if cur.fetchone()[0]:
                return
            cur.execute("CREATE TABLE IF NOT EXISTS tasks (seq BIGSERIAL PRIMARY KEY,"
                        + _TABLE_COLUMNS.format(real="DOUBLE PRECISION") + ")")
            cur.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS lease_id TEXT")
            for ddl in _INDEXES.values():
                cur.execute(ddl)

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _select_for_update(self) -> str:
        return " FOR UPDATE"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        import psycopg
        from psycopg_pool import PoolClosed, PoolTimeout

        try:
            # The pool commits when the block ends, rolls back on an exception, and
            # discards connections that broke.
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except PoolTimeout as exc:
            raise StoreUnavailable(f"no PostgreSQL connection available: {_first_line(exc)}") from exc
        except PoolClosed as exc:
            raise StoreUnavailable("the store is closed") from exc
        except (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout) as exc:
            # the latter: this replica stalled mid-transaction and the server ended its session
            raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}") from exc

    def _database_now(self) -> float:
        with self._transaction() as cur:
            cur.execute("SELECT extract(epoch from clock_timestamp())::double precision")
            return float(cur.fetchone()[0])

    def close(self) -> None:
        self._pool.close()


def describe_database(dsn: str) -> str:
    """A loggable description of a DSN (no password)."""
    if is_postgres_dsn(dsn) or is_foreign_url(dsn):
        return redacted(dsn)
    return f"sqlite:{sqlite_path(dsn)}"


def sqlite_path(dsn: str) -> str:
    """``sqlite:///rel.db`` → ``rel.db``; ``sqlite:////abs.db`` → ``/abs.db``; a bare path is itself."""
    if dsn.startswith("sqlite:///"):
        return dsn[len("sqlite:///"):] or ":memory:"
    if dsn.startswith("sqlite://"):
        return dsn[len("sqlite://"):] or ":memory:"
    if dsn.startswith("sqlite:"):
        return dsn[len("sqlite:"):] or ":memory:"
    return dsn


def open_store(dsn: str, **kwargs: Any) -> TaskStore:
    """Open the store a DSN names: ``postgresql://…`` (or ``postgres://``, or a libpq
    ``key=value`` string) → PostgreSQL; ``sqlite:///path``, ``:memory:`` or a plain
    file path → SQLite. Raises StoreUnavailable (with a one-line message) on failure."""
    if is_postgres_dsn(dsn):
        return PostgresStore(dsn, **kwargs)
    if is_foreign_url(dsn):  # not a file name: refused, not made a SQLite file named after it
        raise StoreUnavailable(f"{FOREIGN_URL_HINT} (sqlite:///PATH)")
    return SQLiteStore(sqlite_path(dsn), **kwargs)
