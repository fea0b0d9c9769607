"""The SQLite store's plumbing: the connection in its own thread (``StoreThread``: calls in order, group commit),
transactions, and the small row helpers (``SqliteStore`` in ``_sqlite.py`` holds the SQL)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ._schema import migrate
from ._thread import StoreThread
from ._types import (
    MAX_AMOUNT,
    Hold,
    InvalidAmount,
)

T = TypeVar("T")


class SqliteBase:
    """The connection of a ``SqliteStore``: opening, migrating, and running each transaction in the store's thread."""

    def __init__(self, path: str, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = wall_clock
        self._thread = StoreThread(f"sqlite {Path(path).name}")  # one writer, in order; SQLite serialises anyway
        self._db: sqlite3.Connection | None = None
        self._tx_time = 0.0  # the running transaction's wall-clock time (read in the store's thread)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}>"

    # -- lifecycle

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            with trio.CancelScope(shield=True):
                await self._thread.run(db.close)
            self._thread.close()

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes (kill -9)
        db.execute("PRAGMA foreign_keys=ON")
        try:
            migrate(db, self.path)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # the clock is read here, in the trio thread (it may be trio's MockClock in tests), when the call is made
        return await self._thread.run(self._at, self._now(), fn, *args)

    def _at(self, now: float, fn: Callable[..., T], *args: Any) -> T:
        self._tx_time = now
        return fn(*args)

    def _time(self) -> float:
        return self._tx_time

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def ping(self) -> bool:
        def q() -> bool:
            return bool(self.db.execute("SELECT 1").fetchone()[0] == 1)

        return await self._run(q)


def check_amount(amount: object) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 <= amount <= MAX_AMOUNT:
        raise InvalidAmount(f"amount must be an int from 0 to 2^53, not {amount!r}")


def hold_row(r: sqlite3.Row) -> Hold:
    return Hold(r["task_id"], r["user_id"], r["amount"], r["state"], r["expires_at"])


class Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the exception propagates)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


__all__ = ["SqliteBase", "Tx", "check_amount", "hold_row"]
