"""Persistence behind one small interface: every actor's durable state goes through a ``Store``.

The default store is one SQLite file in WAL mode under the data directory. SQLite calls are blocking, so
they run in the store's own thread (``_thread.StoreThread``), one after another in the order called: one writer,
no lock contention, and trio's thread pool stays free for others. Calls waiting together run in one turn of that
thread (group commit), each still its own transaction, and each caller waits for its own commit. ``--store redis://…`` selects
``RedisStore``, the same async methods on Redis (ledger primitives and task writes as atomic Lua scripts,
fenced by the core lease), so actors never know which one runs.

Modules: ``_types`` (records, errors, the ``Store`` interface), ``_sqlite`` (``SqliteStore``), ``_sqlite_base`` (its
connection and transactions), ``_thread`` (``StoreThread``),
``_schema`` (schema version and forward migrations), ``_audit`` (journal and task/hold audits, shared),
``_redis`` (``RedisStore``) and ``_redis_lua`` (its scripts and key layout).

Tables (schema version 3; ``_schema.migrate`` brings any older file forward on open, a transaction a step):
    accounts(user_id, balance, frozen)                   -- the ledger's accounts; available = balance - frozen
    holds(task_id, user_id, amount, state, ...)          -- two-phase holds: pending -> settled | released
    journal(id, ts, user_id, kind, task_id, amount, ...) -- append-only; balances can be rebuilt from it
    tasks(task_id, ..., state, reason, backend, crashes) -- the registry's task records (crashes: quarantine)
    images(task_id, n, ...)                              -- each task's output images (for /api/images)
    meta(key, value)                                     -- 'boot' (``next_boot``), 'running' (``begin_run``)

Ledger primitives are single transactions and idempotent by task id (see ``actors/ledger.py``). ``Store`` is the
interface (a ``Protocol``): ``SqliteStore`` and ``RedisStore`` implement it.

Durability: WAL with ``synchronous=NORMAL`` survives a killed process (kill -9) with every committed transaction;
only an OS crash or power loss may lose the last few (then ``synchronous=FULL`` would be needed).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from ..task_machine import ACTIVE_STATES, TERMINAL_STATES  # the task states are the machine's (defined once)
from ._redis import RedisStore, as_text, split_redis_url
from ._schema import _MIGRATIONS, SCHEMA_VERSION
from ._sqlite import SqliteStore
from ._types import (
    MAX_AMOUNT,
    Account,
    CoreStepDown,
    Hold,
    HoldConflict,
    ImageRef,
    InsufficientCredits,
    InvalidAmount,
    JournalEntry,
    LeaseLost,
    LedgerError,
    LedgerFault,
    NegativeBalance,
    Store,
    StoreUnavailable,
    SweptHold,
    TaskRecord,
    UnknownHold,
)

__all__ = [
    "ACTIVE_STATES",
    "MAX_AMOUNT",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "_MIGRATIONS",
    "Account",
    "CoreStepDown",
    "Hold",
    "HoldConflict",
    "ImageRef",
    "InsufficientCredits",
    "InvalidAmount",
    "JournalEntry",
    "LeaseLost",
    "LedgerError",
    "LedgerFault",
    "NegativeBalance",
    "RedisStore",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
    "SweptHold",
    "TaskRecord",
    "UnknownHold",
    "as_text",
    "is_redis",
    "open_store",
    "parse_store_spec",
]


def parse_store_spec(spec: str, data_dir: str) -> str:
    """``sqlite:PATH`` (or empty: DATA/gateway.db) -> the SQLite path; ``redis://…``/``rediss://…`` -> the URL."""
    if not spec:
        return str(Path(data_dir) / "gateway.db")
    if spec.startswith("sqlite:"):
        return spec[len("sqlite:") :] or str(Path(data_dir) / "gateway.db")
    if is_redis(spec):
        split_redis_url(spec)  # refuses a malformed one now, not at start-up
        return spec
    raise ValueError(f"--store must be sqlite:PATH or redis://..., not {spec!r}")


def is_redis(spec: str) -> bool:
    return spec.startswith(("redis://", "rediss://"))


@asynccontextmanager
async def open_store(path: str, *, wall_clock: Callable[[], float] = time.time) -> AsyncIterator[Store]:
    """Open the store ``path`` names: a ``redis://``/``rediss://`` URL, or an SQLite file."""
    store: SqliteStore | RedisStore = (RedisStore if is_redis(path) else SqliteStore)(path, wall_clock=wall_clock)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
