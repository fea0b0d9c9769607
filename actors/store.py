"""Persistence behind one small interface: every actor's durable state goes through a ``Store``.

The default store is one SQLite file in WAL mode under the data directory. SQLite calls are blocking, so
they run in a worker thread (``trio.to_thread``) behind the store's own ``CapacityLimiter(1)``: one writer,
no lock contention, and the default thread limiter stays free for others. A Redis store will implement the
same async methods (ledger primitives atomically, as Lua scripts), so actors never know which one runs.

Tables (schema version 1):
    accounts(user_id, balance, frozen)                   -- the ledger's accounts; available = balance - frozen
    holds(task_id, user_id, amount, state, ...)          -- two-phase holds: pending -> settled | released
    journal(id, ts, user_id, kind, task_id, amount, ...) -- append-only; balances can be rebuilt from it
    tasks(task_id, ..., state, reason, backend, ...)     -- the registry's task records
    images(task_id, n, ...)                              -- each task's output images (for /api/images)

Ledger primitives are single transactions and idempotent by task id (see ``actors/ledger.py``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    # version -> SQL that brings the previous version to this one. Append only; never edit a shipped one.
    1: """
    CREATE TABLE accounts (
        user_id TEXT PRIMARY KEY,
        balance INTEGER NOT NULL,
        frozen INTEGER NOT NULL DEFAULT 0 CHECK (frozen >= 0),
        created_at REAL NOT NULL
    );
    CREATE TABLE holds (
        task_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount >= 0),
        state TEXT NOT NULL CHECK (state IN ('pending', 'settled', 'released')),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        resolved_at REAL
    );
    CREATE INDEX holds_pending ON holds(state, expires_at);
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('open', 'grant', 'freeze', 'settle', 'release')),
        task_id TEXT,
        amount INTEGER NOT NULL,
        balance_after INTEGER NOT NULL,
        frozen_after INTEGER NOT NULL,
        note TEXT
    );
    CREATE INDEX journal_user ON journal(user_id, id);
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        prompt_id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        reason TEXT,
        backend TEXT,
        size INTEGER NOT NULL,
        cost INTEGER NOT NULL,
        workflow TEXT NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX tasks_state ON tasks(state);
    CREATE INDEX tasks_user ON tasks(user_id, seq);
    CREATE TABLE images (
        task_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        backend TEXT NOT NULL,
        filename TEXT NOT NULL,
        subfolder TEXT NOT NULL,
        type TEXT NOT NULL,
        PRIMARY KEY (task_id, n)
    );
    """,
}

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


# ---- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    balance: int
    frozen: int

    @property
    def available(self) -> int:
        return self.balance - self.frozen

    def as_json(self) -> dict[str, Any]:
        return {"userId": self.user_id, "balance": self.balance, "frozen": self.frozen, "available": self.available}


@dataclass(frozen=True, slots=True)
class Hold:
    task_id: str
    user_id: str
    amount: int
    state: str  # pending | settled | released
    expires_at: float


@dataclass(frozen=True, slots=True)
class ImageRef:
    backend: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    seq: int
    user_id: str
    client_id: str
    prompt_id: str
    state: str
    size: int
    cost: int
    workflow: dict[str, Any]
    created_at: float
    updated_at: float
    reason: str | None = None
    backend: str | None = None
    error: dict[str, Any] | None = None
    images: tuple[ImageRef, ...] = field(default=())


class LedgerError(Exception):
    """Base of the ledger's refusals; nothing was changed when one is raised."""


class InsufficientCredits(LedgerError):
    def __init__(self, user_id: str, available: int, amount: int) -> None:
        super().__init__(f"user {user_id!r} has {available} credits available, {amount} needed")
        self.available = available
        self.amount = amount


class HoldConflict(LedgerError):
    """The task id already has a hold that disagrees (other amount or user, or already resolved the other way)."""


class UnknownHold(LedgerError):
    pass


# ---- the SQLite store -----------------------------------------------------------------------------


class SqliteStore:
    """All SQL lives here. Public methods are async and run one blocking transaction in the store's thread."""

    def __init__(self, path: str, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = wall_clock
        self._limiter = trio.CapacityLimiter(1)  # one writer; SQLite serialises anyway
        self._db: sqlite3.Connection | None = None
        self._tx_time = 0.0

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path!r}>"

    # -- lifecycle

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(db.close, limiter=self._limiter)

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes (kill -9)
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this gateway ({SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            log.info("store %s: migrating schema to version %d", self.path, v)
            # executescript commits any open transaction first, so the script carries its own BEGIN/COMMIT
            db.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATIONS[v]}\nPRAGMA user_version = {v};\nCOMMIT;")
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # the clock is read here, in the trio thread (it may be trio's MockClock in tests), not in the worker
        self._tx_time = self._now()
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _time(self) -> float:
        return self._tx_time

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def ping(self) -> bool:
        def q() -> bool:
            return self.db.execute("SELECT 1").fetchone()[0] == 1

        return await self._run(q)

    # -- ledger primitives (each one transaction, idempotent by task id)

    async def account(self, user_id: str, initial: int) -> Account:
        def q() -> Account:
            with _tx(self.db):
                return self._account(user_id, initial)

        return await self._run(q)

    async def grant(self, user_id: str, amount: int, initial: int, note: str | None = None) -> Account:
        def q() -> Account:
            with _tx(self.db):
                acc = self._account(user_id, initial)
                acc = Account(user_id, acc.balance + amount, acc.frozen)
                self._write_account(acc, "grant", None, amount, note)
                return acc

        return await self._run(q)

    async def freeze(self, user_id: str, task_id: str, amount: int, initial: int, ttl: float) -> tuple[Account, bool]:
        """Hold ``amount`` for ``task_id``. Returns (account, changed); repeating the same freeze is a no-op."""

        def q() -> tuple[Account, bool]:
            with _tx(self.db):
                acc = self._account(user_id, initial)
                hold = self._hold(task_id)
                if hold is not None:
                    if hold.user_id == user_id and hold.amount == amount:
                        return acc, False
                    raise HoldConflict(f"task {task_id!r} already holds {hold.amount} for {hold.user_id!r}")
                if acc.available < amount:
                    raise InsufficientCredits(user_id, acc.available, amount)
                now = self._time()
                self.db.execute(
                    "INSERT INTO holds(task_id, user_id, amount, state, created_at, expires_at) VALUES (?,?,?,?,?,?)",
                    (task_id, user_id, amount, "pending", now, now + ttl),
                )
                acc = Account(user_id, acc.balance, acc.frozen + amount)
                self._write_account(acc, "freeze", task_id, amount)
                return acc, True

        return await self._run(q)

    async def resolve(self, task_id: str, outcome: str, amount: int | None = None) -> tuple[Account, bool]:
        """Settle (post) or release (void) a pending hold, exactly once.

        Repeating the same resolution is a no-op success; resolving the other way, or with another amount,
        raises HoldConflict; an unknown task id raises UnknownHold.
        """
        if outcome not in ("settled", "released"):
            raise ValueError(f"outcome must be 'settled' or 'released', not {outcome!r}")

        def q() -> tuple[Account, bool]:
            with _tx(self.db):
                hold = self._hold(task_id)
                if hold is None:
                    raise UnknownHold(f"no hold for task {task_id!r}")
                if amount is not None and amount != hold.amount:
                    raise HoldConflict(f"task {task_id!r} holds {hold.amount}, not {amount}")
                acc = self._account(hold.user_id, 0)
                if hold.state == outcome:
                    return acc, False
                if hold.state != "pending":
                    raise HoldConflict(f"task {task_id!r} is already {hold.state}")
                self.db.execute(
                    "UPDATE holds SET state = ?, resolved_at = ? WHERE task_id = ? AND state = 'pending'",
                    (outcome, self._time(), task_id),
                )
                if outcome == "settled":
                    acc = Account(acc.user_id, acc.balance - hold.amount, acc.frozen - hold.amount)
                    self._write_account(acc, "settle", task_id, hold.amount)
                else:
                    acc = Account(acc.user_id, acc.balance, acc.frozen - hold.amount)
                    self._write_account(acc, "release", task_id, hold.amount)
                return acc, True

        return await self._run(q)

    async def hold(self, task_id: str) -> Hold | None:
        return await self._run(self._hold, task_id)

    async def expired_holds(self, now: float) -> list[Hold]:
        def q() -> list[Hold]:
            rows = self.db.execute(
                "SELECT * FROM holds WHERE state = 'pending' AND expires_at <= ? ORDER BY expires_at", (now,)
            ).fetchall()
            return [_hold_row(r) for r in rows]

        return await self._run(q)

    async def audit(self) -> list[str]:
        """Rebuild every balance from the journal and compare: returns one line per discrepancy (none: [])."""

        def q() -> list[str]:
            problems: list[str] = []
            rebuilt: dict[str, list[int]] = {}
            for r in self.db.execute("SELECT user_id, kind, amount FROM journal ORDER BY id"):
                bal = rebuilt.setdefault(r["user_id"], [0, 0])
                kind, amount = r["kind"], r["amount"]
                if kind in ("open", "grant"):
                    bal[0] += amount
                elif kind == "freeze":
                    bal[1] += amount
                elif kind == "settle":
                    bal[0] -= amount
                    bal[1] -= amount
                elif kind == "release":
                    bal[1] -= amount
            pending: dict[str, int] = {}
            for r in self.db.execute("SELECT user_id, SUM(amount) AS s FROM holds WHERE state='pending' GROUP BY user_id"):
                pending[r["user_id"]] = r["s"]
            for r in self.db.execute("SELECT * FROM accounts"):
                want = rebuilt.get(r["user_id"], [0, 0])
                if [r["balance"], r["frozen"]] != want:
                    problems.append(f"{r['user_id']}: stored {r['balance']}/{r['frozen']}, journal {want[0]}/{want[1]}")
                if r["frozen"] != pending.get(r["user_id"], 0):
                    problems.append(f"{r['user_id']}: frozen {r['frozen']} but pending holds {pending.get(r['user_id'], 0)}")
            return problems

        return await self._run(q)

    # -- tasks

    async def save_task(self, rec: TaskRecord) -> None:
        def q() -> None:
            with _tx(self.db):
                self.db.execute(
                    """INSERT INTO tasks(task_id, seq, user_id, client_id, prompt_id, state, reason, backend, size,
                                         cost, workflow, error, created_at, updated_at)
                       VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                       ON CONFLICT(task_id) DO UPDATE SET state=excluded.state, reason=excluded.reason,
                           backend=excluded.backend, error=excluded.error, updated_at=excluded.updated_at""",
                    (
                        rec.task_id, rec.seq, rec.user_id, rec.client_id, rec.prompt_id, rec.state, rec.reason,
                        rec.backend, rec.size, rec.cost, json.dumps(rec.workflow, separators=(",", ":")),
                        json.dumps(rec.error) if rec.error is not None else None, rec.created_at, rec.updated_at,
                    ),
                )
                for n, img in enumerate(rec.images):
                    self.db.execute(
                        "INSERT OR IGNORE INTO images(task_id, n, backend, filename, subfolder, type) VALUES (?,?,?,?,?,?)",
                        (rec.task_id, n, img.backend, img.filename, img.subfolder, img.type),
                    )

        await self._run(q)

    async def load_active_tasks(self) -> list[TaskRecord]:
        """Every non-terminal task, oldest first (their queue order)."""

        def q() -> list[TaskRecord]:
            rows = self.db.execute(
                "SELECT * FROM tasks WHERE state NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY seq"
            ).fetchall()
            return [self._task_row(r) for r in rows]

        return await self._run(q)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def q() -> TaskRecord | None:
            r = self.db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return self._task_row(r) if r is not None else None

        return await self._run(q)

    async def list_results(self, user_id: str, limit: int, before_seq: int | None) -> list[TaskRecord]:
        """The user's finished tasks, newest first, ``limit`` at most, older than ``before_seq`` when given."""

        def q() -> list[TaskRecord]:
            rows = self.db.execute(
                """SELECT * FROM tasks WHERE user_id = ? AND state IN ('succeeded', 'failed', 'cancelled')
                   AND seq < ? ORDER BY seq DESC LIMIT ?""",
                (user_id, before_seq if before_seq is not None else 2**62, limit),
            ).fetchall()
            return [self._task_row(r) for r in rows]

        return await self._run(q)

    async def max_task_seq(self) -> int:
        def q() -> int:
            return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0]

        return await self._run(q)

    # -- sync internals (store thread only)

    def _account(self, user_id: str, initial: int) -> Account:
        r = self.db.execute("SELECT balance, frozen FROM accounts WHERE user_id = ?", (user_id,)).fetchone()
        if r is not None:
            return Account(user_id, r["balance"], r["frozen"])
        acc = Account(user_id, initial, 0)
        self.db.execute(
            "INSERT INTO accounts(user_id, balance, frozen, created_at) VALUES (?,?,?,?)",
            (user_id, initial, 0, self._time()),
        )
        self._journal(acc, "open", None, initial, "initial credits")
        return acc

    def _write_account(self, acc: Account, kind: str, task_id: str | None, amount: int, note: str | None = None) -> None:
        self.db.execute(
            "UPDATE accounts SET balance = ?, frozen = ? WHERE user_id = ?", (acc.balance, acc.frozen, acc.user_id)
        )
        self._journal(acc, kind, task_id, amount, note)

    def _journal(self, acc: Account, kind: str, task_id: str | None, amount: int, note: str | None) -> None:
        self.db.execute(
            """INSERT INTO journal(ts, user_id, kind, task_id, amount, balance_after, frozen_after, note)
               VALUES (?,?,?,?,?,?,?,?)""",
            (self._time(), acc.user_id, kind, task_id, amount, acc.balance, acc.frozen, note),
        )

    def _hold(self, task_id: str) -> Hold | None:
        r = self.db.execute("SELECT * FROM holds WHERE task_id = ?", (task_id,)).fetchone()
        return _hold_row(r) if r is not None else None

    def _task_row(self, r: sqlite3.Row) -> TaskRecord:
        imgs = self.db.execute(
            "SELECT backend, filename, subfolder, type FROM images WHERE task_id = ? ORDER BY n", (r["task_id"],)
        ).fetchall()
        return TaskRecord(
            task_id=r["task_id"], seq=r["seq"], user_id=r["user_id"], client_id=r["client_id"],
            prompt_id=r["prompt_id"], state=r["state"], size=r["size"], cost=r["cost"],
            workflow=json.loads(r["workflow"]), created_at=r["created_at"], updated_at=r["updated_at"],
            reason=r["reason"], backend=r["backend"], error=json.loads(r["error"]) if r["error"] else None,
            images=tuple(ImageRef(i["backend"], i["filename"], i["subfolder"], i["type"]) for i in imgs),
        )


def _hold_row(r: sqlite3.Row) -> Hold:
    return Hold(r["task_id"], r["user_id"], r["amount"], r["state"], r["expires_at"])


class _tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the exception propagates)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def parse_store_spec(spec: str, data_dir: str) -> str:
    """``sqlite:PATH`` (or empty: DATA/gateway.db) -> the SQLite path. Redis is not implemented yet."""
    if not spec:
        return str(Path(data_dir) / "gateway.db")
    if spec.startswith("sqlite:"):
        return spec[len("sqlite:"):] or str(Path(data_dir) / "gateway.db")
    if spec.startswith("redis://") or spec.startswith("rediss://"):
        raise ValueError("the Redis store is not implemented yet; use sqlite:PATH (the default)")
    raise ValueError(f"--store must be sqlite:PATH or redis://..., not {spec!r}")


@asynccontextmanager
async def open_store(path: str, *, wall_clock: Callable[[], float] = time.time) -> Iterator[SqliteStore]:  # type: ignore[misc]
    store = SqliteStore(path, wall_clock=wall_clock)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
