"""The ledger actor: accounts and two-phase credit holds, in the manner of TigerBeetle's pending transfers.

A ``Freeze`` is a pending transfer (refused when it would make ``available`` negative); ``Settle`` posts it;
``Release`` voids it. Each hold is resolved exactly once. Repeating an operation with the same task id and
amount is a no-op success; a different amount, or resolving the other way, is a ``HoldConflict`` and
changes nothing. Every change is one store transaction plus a journal entry, and is pushed to the user as a
``balance`` message. A hold past its deadline is released by the actor itself (a safety net for a task that
never ends; the deadline is longer than any task's).

The actor is a leaf: it never waits on another actor, so anyone may ``ask`` it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._util import ask, reply_once
from .sessions import Publish
from .store import Account, HoldConflict, InsufficientCredits, LedgerError, SqliteStore, UnknownHold

log = logging.getLogger(__name__)

__all__ = [
    "Account", "Freeze", "Resolve", "Grant", "GetAccount", "Audit", "LedgerMsg", "LedgerError",
    "InsufficientCredits", "HoldConflict", "UnknownHold", "run", "freeze", "settle", "release", "grant",
    "get_account",
]

EXPIRY_CHECK_INTERVAL = 60.0  # seconds between scans for expired holds


@dataclass(frozen=True, slots=True)
class Freeze:
    user_id: str
    task_id: str
    amount: int
    reply: trio.MemorySendChannel[Account | LedgerError]


@dataclass(frozen=True, slots=True)
class Resolve:
    """Settle (``outcome='settled'``) or release (``'released'``) the hold of ``task_id``."""

    task_id: str
    outcome: str
    amount: int | None = None
    reply: trio.MemorySendChannel[Account | LedgerError] | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    user_id: str
    amount: int
    note: str | None
    reply: trio.MemorySendChannel[Account | LedgerError]


@dataclass(frozen=True, slots=True)
class GetAccount:
    user_id: str
    reply: trio.MemorySendChannel[Account | LedgerError]


@dataclass(frozen=True, slots=True)
class Audit:
    reply: trio.MemorySendChannel[list[str]]


LedgerMsg = Freeze | Resolve | Grant | GetAccount | Audit


def balance_message(acc: Account) -> dict[str, object]:
    return {"type": "balance", "balance": acc.balance, "frozen": acc.frozen, "available": acc.available}


async def run(
    inbox: trio.MemoryReceiveChannel[LedgerMsg],
    *,
    store: SqliteStore,
    sessions: trio.MemorySendChannel[Publish],
    initial_credits: int,
    hold_ttl: float,
    wall_clock: Callable[[], float] = time.time,
    expiry_interval: float = EXPIRY_CHECK_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ledger requests until the inbox closes. ``hold_ttl`` is in seconds of wall-clock time."""

    async def changed(acc: Account) -> None:
        await sessions.send(Publish(acc.user_id, None, balance_message(acc)))

    async def expire() -> None:
        for hold in await store.expired_holds(wall_clock()):
            try:
                acc, did = await store.resolve(hold.task_id, "released")
            except LedgerError as exc:  # resolved meanwhile: nothing to do
                log.debug("ledger: expiry of %s skipped: %s", hold.task_id, exc)
                continue
            if did:
                log.warning("ledger: hold of task %s (%d credits) expired; released", hold.task_id, hold.amount)
                await changed(acc)

    task_status.started()
    next_expiry = trio.current_time()
    with inbox:
        while True:
            if trio.current_time() >= next_expiry:
                await expire()
                next_expiry = trio.current_time() + expiry_interval
            msg = None
            with trio.move_on_at(next_expiry):
                try:
                    msg = await inbox.receive()
                except trio.EndOfChannel:
                    return
            if msg is None:
                continue
            match msg:
                case Freeze(user_id, task_id, amount, reply):
                    try:
                        acc, did = await store.freeze(user_id, task_id, amount, initial_credits, hold_ttl)
                    except LedgerError as exc:
                        reply_once(reply, exc)
                    else:
                        reply_once(reply, acc)
                        if did:
                            await changed(acc)
                case Resolve(task_id, outcome, amount, reply):
                    try:
                        acc, did = await store.resolve(task_id, outcome, amount)
                    except LedgerError as exc:
                        log.warning("ledger: %s of task %s refused: %s", outcome, task_id, exc)
                        if reply is not None:
                            reply_once(reply, exc)
                    else:
                        if reply is not None:
                            reply_once(reply, acc)
                        if did:
                            await changed(acc)
                case Grant(user_id, amount, note, reply):
                    acc = await store.grant(user_id, amount, initial_credits, note)
                    log.info("ledger: granted %d to %s (%s) -> %d", amount, user_id, note, acc.balance)
                    reply_once(reply, acc)
                    await changed(acc)
                case GetAccount(user_id, reply):
                    reply_once(reply, await store.account(user_id, initial_credits))
                case Audit(reply):
                    reply_once(reply, await store.audit())


# ---- client side: what other actors and the web layer call ------------------------------------------


async def _ask_ledger(ledger: trio.MemorySendChannel[LedgerMsg], build: Callable) -> Account:
    result = await ask(ledger, build, name="ledger")
    if isinstance(result, LedgerError):
        raise result
    return result


async def freeze(ledger: trio.MemorySendChannel[LedgerMsg], user_id: str, task_id: str, amount: int) -> Account:
    return await _ask_ledger(ledger, lambda r: Freeze(user_id, task_id, amount, r))


async def settle(ledger: trio.MemorySendChannel[LedgerMsg], task_id: str, amount: int | None = None) -> Account:
    return await _ask_ledger(ledger, lambda r: Resolve(task_id, "settled", amount, r))


async def release(ledger: trio.MemorySendChannel[LedgerMsg], task_id: str, amount: int | None = None) -> Account:
    return await _ask_ledger(ledger, lambda r: Resolve(task_id, "released", amount, r))


async def grant(ledger: trio.MemorySendChannel[LedgerMsg], user_id: str, amount: int, note: str | None = None) -> Account:
    return await _ask_ledger(ledger, lambda r: Grant(user_id, amount, note, r))


async def get_account(ledger: trio.MemorySendChannel[LedgerMsg], user_id: str) -> Account:
    return await _ask_ledger(ledger, lambda r: GetAccount(user_id, r))

