"""The ledger actor: accounts and two-phase credit holds, in the manner of TigerBeetle's pending transfers.

A ``Freeze`` is a pending transfer (refused when it would make ``available`` negative); ``Settle`` posts it;
``Release`` voids it. Each hold is resolved exactly once. Repeating an operation with the same task id and
amount is a no-op success; a different amount, or resolving the other way, is a ``HoldConflict`` and
changes nothing. Every change is one store transaction plus a journal entry, and is pushed to the user as a
``balance`` message. A hold past its deadline is swept by the actor itself (a safety net; the deadline is
longer than any task's): released, or settled if its task is recorded as succeeded, or given a new deadline
if its task is still active (``Store.sweep_holds``).

Crash recovery: before it reports started (so before the registry runs), the actor sweeps every pending hold
once. A gateway killed between a freeze and saving its task leaves a hold with no task: released. Killed
between saving a task's outcome and settling or releasing: resolved as the outcome says. Holds of tasks still
active are left for the registry, which reloads those tasks and resolves them.

The actor is a leaf: it never waits on another actor, so anyone may ``ask`` it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._util import Request, ask, reply_once
from .sessions import Publish
from .store import (
    Account,
    HoldConflict,
    InsufficientCredits,
    InvalidAmount,
    LedgerError,
    LedgerFault,
    NegativeBalance,
    Store,
    SweptHold,
    UnknownHold,
)
from .wire import Balance

log = logging.getLogger(__name__)

__all__ = [
    "Account",
    "Audit",
    "Freeze",
    "GetAccount",
    "Grant",
    "HoldConflict",
    "InsufficientCredits",
    "InvalidAmount",
    "LedgerError",
    "LedgerFault",
    "LedgerMsg",
    "NegativeBalance",
    "Resolve",
    "Sweep",
    "UnknownHold",
    "audit",
    "freeze",
    "get_account",
    "grant",
    "release",
    "run",
    "settle",
    "sweep",
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
    allow_negative: bool = False  # may leave ``available`` below zero (the admin asked for it explicitly)
    grant_id: str | None = None  # an edge's request id: the same grant read again by the next core is applied once


@dataclass(frozen=True, slots=True)
class GetAccount:
    user_id: str
    reply: trio.MemorySendChannel[Account | LedgerError]


@dataclass(frozen=True, slots=True)
class Audit:
    reply: trio.MemorySendChannel[list[str]]


@dataclass(frozen=True, slots=True)
class Sweep:
    """Sweep expired holds now (the actor also does it every ``expiry_interval``); replies with what changed."""

    reply: trio.MemorySendChannel[list[SweptHold]]


LedgerMsg = Freeze | Resolve | Grant | GetAccount | Audit | Sweep


def balance_message(acc: Account) -> dict[str, object]:
    return Balance(acc.balance, acc.frozen, acc.available).to_wire()


async def run(
    inbox: trio.MemoryReceiveChannel[LedgerMsg],
    *,
    store: Store,
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

    async def sweep(now: float | None) -> list[SweptHold]:
        swept = await store.sweep_holds(now, hold_ttl)
        for s in swept:
            if s.outcome == "extended":
                log.warning(
                    "ledger: hold of task %s expired while the task is %s: deadline extended by %ss",
                    s.hold.task_id,
                    s.task_state,
                    hold_ttl,
                )
                continue
            log.warning(
                "ledger: hold of task %s (%d credits of %s) %s %s (task %s)",
                s.hold.task_id,
                s.hold.amount,
                s.hold.user_id,
                "expired:" if now is not None else "recovered at start-up:",
                s.outcome,
                s.task_state or "never saved",
            )
            await changed(s.account)
        return swept

    async def handle(msg: LedgerMsg) -> None:
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
            case Grant(user_id, amount, note, reply, allow_negative, grant_id):
                try:
                    acc = await store.grant(user_id, amount, initial_credits, note, allow_negative, grant_id)
                except LedgerError as exc:  # not an int, out of range, or negative: refused, nothing stored
                    reply_once(reply, exc)
                else:
                    log.info("ledger: granted %d to %s (%s) -> %d", amount, user_id, note, acc.balance)
                    reply_once(reply, acc)
                    await changed(acc)
            case GetAccount(user_id, reply):
                reply_once(reply, await store.account(user_id, initial_credits))
            case Audit(reply):
                reply_once(reply, await store.audit())
            case Sweep(reply):
                reply_once(reply, await sweep(wall_clock()))

    await sweep(None)  # crash recovery, before anyone can freeze (the registry starts after us)
    task_status.started()
    next_expiry = trio.current_time()
    with inbox:
        while True:
            if trio.current_time() >= next_expiry:
                next_expiry = trio.current_time() + expiry_interval
                try:
                    await sweep(wall_clock())
                except Exception:  # a store error: try again at the next interval
                    log.exception("ledger: sweeping expired holds failed")
            msg = None
            with trio.move_on_at(next_expiry):
                try:
                    msg = await inbox.receive()
                except trio.EndOfChannel:
                    return
            if msg is None:
                continue
            try:
                await handle(msg)
            except Exception as exc:  # crash isolation: a store error fails this one request, the ledger goes on
                log.exception(
                    "ledger: %s failed (task %s, user %s)",
                    type(msg).__name__,
                    getattr(msg, "task_id", "-"),
                    getattr(msg, "user_id", "-"),
                )
                reply = getattr(msg, "reply", None)
                if reply is not None and isinstance(msg, (Freeze, Resolve, Grant, GetAccount)):
                    reply_once(reply, LedgerFault(f"the ledger failed: {type(exc).__name__}"))
                elif reply is not None:
                    reply.close()  # the asker gets ActorGone-like EndOfChannel, never a hang


# ---- client side: what other actors and the web layer call ------------------------------------------


async def _ask_ledger(
    ledger: trio.MemorySendChannel[LedgerMsg],
    build: Callable[[trio.MemorySendChannel[Account | LedgerError]], Request[Account | LedgerError]],
) -> Account:
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


async def grant(
    ledger: trio.MemorySendChannel[LedgerMsg],
    user_id: str,
    amount: int,
    note: str | None = None,
    *,
    allow_negative: bool = False,
) -> Account:
    return await _ask_ledger(ledger, lambda r: Grant(user_id, amount, note, r, allow_negative))


async def get_account(ledger: trio.MemorySendChannel[LedgerMsg], user_id: str) -> Account:
    return await _ask_ledger(ledger, lambda r: GetAccount(user_id, r))


async def audit(ledger: trio.MemorySendChannel[LedgerMsg]) -> list[str]:
    """Rebuild the balances from the journal and check them (``Store.audit``); [] means consistent."""
    return await ask(ledger, Audit, name="ledger")


async def sweep(ledger: trio.MemorySendChannel[LedgerMsg]) -> list[SweptHold]:
    return await ask(ledger, Sweep, name="ledger")
