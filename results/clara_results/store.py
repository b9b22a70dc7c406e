"""Task storage: SQLite (embedded, the default) and PostgreSQL (production).

Both back-ends implement :class:`TaskStore` with the same SQL and the same
rules; only connection handling and the DDL differ. All state transitions
happen here, so the server alone decides retries:

* ``lease``: Pending tasks whose ``available_at`` has come, and InProgress tasks
  whose lease has expired, become InProgress with a fresh lease (FIFO).
  Concurrent callers never receive the same task (SQLite: one writer at a
  time; PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
* A task whose lease has expired is *reported* as Pending (``get``/``list``)
  even before someone leases it again; nothing has to sweep it.
* ``report_success``: a leased task (lease current or expired) becomes
  Succeeded; reporting success again is a no-op.
* ``report_failure``: a leased task gets ``retries + 1``; it goes back to
  Pending (available after ``retry_delay * 2**(retries-1)`` seconds) while
  ``retry_later`` and ``retries < max_retries``, else it becomes Failed.
* Expiring a lease does not count as a retry.
* ``purge``: finished tasks older than ``retention_seconds`` are deleted.

Times come from ``clock`` (seconds since the epoch) so tests can control them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

from clara_results.models import NewTask, Task, TaskState

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
DEFAULT_LEASE_SECONDS = 300.0
DEFAULT_RETRY_DELAY = 10.0
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0


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
    "state, retries, created_at, updated_at, available_at, lease_expires_at, finished_at"
)


def _now_effective_state(state: int, lease_expires_at: float | None, now: float) -> TaskState:
    if state == TaskState.IN_PROGRESS and lease_expires_at is not None and lease_expires_at <= now:
        return TaskState.PENDING
    return TaskState(state)


def _row_to_task(row: Sequence[Any], now: float) -> Task:
    (_seq, id_, key, job_id, pipeline_id, payload_id, operator, agent, parameters, uris, state, retries,
     created_at, updated_at, available_at, lease_expires_at, finished_at) = row
    eff = _now_effective_state(state, lease_expires_at, now)
    return Task(
        id=id_,
        job_id=job_id,
        pipeline_id=pipeline_id,
        payload_id=payload_id,
        agent=agent,
        parameters=parameters,
        uris=tuple(json.loads(uris)),
        state=eff,
        retries=retries,
        created_at=created_at,
        updated_at=updated_at,
        operator=operator,
        idempotency_key=key,
        available_at=available_at,
        lease_expires_at=lease_expires_at if eff == TaskState.IN_PROGRESS else None,
        finished_at=finished_at,
    )


class TaskStore:
    """Common logic; subclasses supply ``_transaction()`` and the DDL."""

    placeholder = "?"
    kind = "abstract"

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

    def _lease_sql(self) -> str:
        raise NotImplementedError

    def _select_for_update(self) -> str:
        return ""

    def close(self) -> None:
        pass

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
                 new.agent, new.parameters, json.dumps(list(new.uris)), int(TaskState.PENDING), now, now, now),
            )
            row = cur.fetchone()
            if row is not None:
                return _row_to_task(row, now), True
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM tasks WHERE idempotency_key = ?"), (new.idempotency_key,))
            row = cur.fetchone()
        if row is None:  # deleted between the two statements: extremely unlikely
            raise StoreUnavailable("task vanished while being created; try again")
        return _row_to_task(row, now), False

    def lease(self, agent: str, size: int) -> list[Task]:
        """Lease up to ``size`` tasks for ``agent`` (oldest first)."""
        now = self.clock()
        with self._transaction() as cur:
            cur.execute(
                self._lease_sql(),
                (int(TaskState.IN_PROGRESS), now + self.lease_seconds, now,
                 agent, int(TaskState.PENDING), now, int(TaskState.IN_PROGRESS), now, size),
            )
            rows = cur.fetchall()
        tasks = [_row_to_task(r, now) for r in rows]
        tasks.sort(key=lambda t: (t.created_at, t.id))
        return tasks

    def _locked_row(self, cur: Any, task_id: str) -> Sequence[Any]:
        cur.execute(self._sql(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?{self._select_for_update()}"), (task_id,))
        row = cur.fetchone()
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return row

    def report_success(self, task_id: str) -> Task:
        now = self.clock()
        with self._transaction() as cur:
            row = self._locked_row(cur, task_id)
            state = row[10]
            if state == TaskState.SUCCEEDED:
                return _row_to_task(row, now)
            if state == TaskState.FAILED:
                raise TaskConflict(f"task {task_id} has already failed; it cannot succeed now")
            if state != TaskState.IN_PROGRESS:
                raise TaskConflict(f"task {task_id} is not leased; lease it before reporting its result")
            cur.execute(
                self._sql(
                    f"UPDATE tasks SET state = ?, lease_expires_at = NULL, finished_at = ?, updated_at = ? "
                    f"WHERE id = ? RETURNING {_COLUMNS}"
                ),
                (int(TaskState.SUCCEEDED), now, now, task_id),
            )
            return _row_to_task(cur.fetchone(), now)

    def report_failure(self, task_id: str, retry_later: bool) -> Task:
        now = self.clock()
        with self._transaction() as cur:
            row = self._locked_row(cur, task_id)
            state, retries = row[10], row[11]
            if state in (TaskState.SUCCEEDED, TaskState.FAILED):
                raise TaskConflict(f"task {task_id} is already finished ({TaskState(state).name.lower()})")
            if state != TaskState.IN_PROGRESS:
                raise TaskConflict(f"task {task_id} is not leased; lease it before reporting its result")
            retries += 1
            if retry_later and retries < self.max_retries:
                delay = self.retry_delay * (2 ** (retries - 1))
                cur.execute(
                    self._sql(
                        f"UPDATE tasks SET state = ?, retries = ?, lease_expires_at = NULL, available_at = ?, "
                        f"updated_at = ? WHERE id = ? RETURNING {_COLUMNS}"
                    ),
                    (int(TaskState.PENDING), retries, now + delay, now, task_id),
                )
            else:
                cur.execute(
                    self._sql(
                        f"UPDATE tasks SET state = ?, retries = ?, lease_expires_at = NULL, finished_at = ?, "
                        f"updated_at = ? WHERE id = ? RETURNING {_COLUMNS}"
                    ),
                    (int(TaskState.FAILED), retries, now, now, task_id),
                )
            return _row_to_task(cur.fetchone(), now)

    def get(self, task_id: str) -> Task:
        now = self.clock()
        with self._transaction() as cur:
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?"), (task_id,))
            row = cur.fetchone()
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return _row_to_task(row, now)

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
            if state == TaskState.PENDING:
                where.append("(state = ? OR (state = ? AND lease_expires_at <= ?))")
                params += [int(TaskState.PENDING), int(TaskState.IN_PROGRESS), now]
            elif state == TaskState.IN_PROGRESS:
                where.append("(state = ? AND lease_expires_at > ?)")
                params += [int(TaskState.IN_PROGRESS), now]
            else:
                where.append("state = ?")
                params.append(int(state))
        sql = f"SELECT {_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self._transaction() as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
        return [_row_to_task(r, now) for r in rows]

    def count_by_state(self) -> dict[TaskState, int]:
        now = self.clock()
        counts = {s: 0 for s in TaskState}
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT CASE WHEN state = ? AND lease_expires_at <= ? THEN ? ELSE state END AS s, COUNT(*) "
                    "FROM tasks GROUP BY 1"
                ),
                (int(TaskState.IN_PROGRESS), now, int(TaskState.PENDING)),
            )
            for s, n in cur.fetchall():
                counts[TaskState(int(s))] += int(n)
        return counts

    def purge(self) -> int:
        """Delete finished tasks older than the retention period; returns how many."""
        cutoff = self.clock() - self.retention_seconds
        with self._transaction() as cur:
            cur.execute(
                self._sql("DELETE FROM tasks WHERE state IN (?, ?) AND finished_at <= ?"),
                (int(TaskState.SUCCEEDED), int(TaskState.FAILED), cutoff),
            )
            return max(cur.rowcount, 0)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        with self._transaction() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()


# The lease statement: one UPDATE ... RETURNING over the oldest eligible tasks.
_LEASE_WHERE = (
    "agent = ? AND ((state = ? AND available_at <= ?) OR (state = ? AND lease_expires_at <= ?)) "
    "ORDER BY seq LIMIT ?"
)


class SQLiteStore(TaskStore):
    """SQLite file (or ``:memory:``); one connection, one writer at a time."""

    kind = "sqlite"

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
            self._conn.executescript(
                """
                CREATE TABLE IF NOT EXISTS tasks (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
                    created_at REAL NOT NULL,
                    updated_at REAL NOT NULL,
                    available_at REAL NOT NULL,
                    lease_expires_at REAL,
                    finished_at REAL
                );
                CREATE INDEX IF NOT EXISTS tasks_agent_state ON tasks (agent, state, seq);
                CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (state, finished_at);
                CREATE INDEX IF NOT EXISTS tasks_job ON tasks (job_id);
                """
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {path}: {exc}") from exc

    def _lease_sql(self) -> str:
        return (
            f"UPDATE tasks SET state = ?, lease_expires_at = ?, updated_at = ? WHERE seq IN "
            f"(SELECT seq FROM tasks WHERE {_LEASE_WHERE}) RETURNING {_COLUMNS}"
        )

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


class PostgresStore(TaskStore):
    """PostgreSQL through psycopg 3, with a small connection pool."""

    kind = "postgres"
    placeholder = "%s"

    def __init__(self, dsn: str, pool_size: int = 8, connect_timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import psycopg  # noqa: F401  (fail early if missing)

        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._idle: "queue.LifoQueue[Any]" = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False
        with self._transaction() as cur:
            # Serialise concurrent schema creation (several servers on one database).
            cur.execute("SELECT pg_advisory_xact_lock(7316541)")
            cur.execute(
                """
                CREATE TABLE IF NOT EXISTS tasks (
                    seq BIGSERIAL PRIMARY KEY,
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
                    created_at DOUBLE PRECISION NOT NULL,
                    updated_at DOUBLE PRECISION NOT NULL,
                    available_at DOUBLE PRECISION NOT NULL,
                    lease_expires_at DOUBLE PRECISION,
                    finished_at DOUBLE PRECISION
                )
                """
            )
            cur.execute("CREATE INDEX IF NOT EXISTS tasks_agent_state ON tasks (agent, state, seq)")
            cur.execute("CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (state, finished_at)")
            cur.execute("CREATE INDEX IF NOT EXISTS tasks_job ON tasks (job_id)")

    def _lease_sql(self) -> str:
        return self._sql(
            f"UPDATE tasks SET state = ?, lease_expires_at = ?, updated_at = ? WHERE seq IN "
            f"(SELECT seq FROM tasks WHERE {_LEASE_WHERE} FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}"
        )

    def _select_for_update(self) -> str:
        return " FOR UPDATE"

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self._dsn, connect_timeout=max(1, int(self._connect_timeout)))
        except psycopg.Error as exc:
            # The DSN may hold a password: never echo it.
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {str(exc).splitlines()[0] if str(exc) else exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        import psycopg

        if self._closed:
            raise StoreUnavailable("the store is closed")
        if not self._slots.acquire(timeout=30):
            raise StoreUnavailable("all PostgreSQL connections are busy")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except psycopg.Error:
                    pass
                raise
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
        finally:
            if conn is not None:
                if conn.closed or conn.broken or self._closed:
                    with contextlib.suppress(Exception):
                        conn.close()
                else:
                    self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(Exception):
                conn.close()


def describe_database(dsn: str) -> str:
    """A loggable description of a DSN (no password)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        rest = dsn.split("://", 1)[1]
        host = rest.rsplit("@", 1)[-1]
        return f"postgresql://{host}"
    if is_postgres_dsn(dsn):
        return "postgresql (key=value DSN)"
    return f"sqlite:{sqlite_path(dsn)}"


def is_postgres_dsn(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://")) or dsn.strip().startswith(("host=", "dbname="))


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
    return SQLiteStore(sqlite_path(dsn), **kwargs)
