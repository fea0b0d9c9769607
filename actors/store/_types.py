"""The store's records, its errors and the ``Store`` interface (see ``actors/store/__init__.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
class JournalEntry:
    """One line of the append-only journal. ``kind``: open | grant | freeze | settle | release."""

    id: int
    ts: float
    user_id: str
    kind: str
    task_id: str | None
    amount: int
    balance_after: int
    frozen_after: int
    note: str | None


@dataclass(frozen=True, slots=True)
class SweptHold:
    """A pending hold that ``sweep_holds`` resolved (``outcome`` settled | released) or extended (``extended``)."""

    hold: Hold
    outcome: str  # "settled" | "released" | "extended"
    account: Account
    task_state: str | None  # the task's state when swept (None: no such task)


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
    template: str | None = None  # the template it was built from (None: a raw workflow)
    params: dict[str, Any] | None = None  # the template's resolved parameters (the drawn seed included)


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


class InvalidAmount(LedgerError, ValueError):
    """An amount that is not an int >= 0, or is outside +-MAX_AMOUNT (refused, never stored)."""


class NegativeBalance(LedgerError):
    """A grant that would leave the account's available credits below zero (allowed only when asked for)."""


class LedgerFault(LedgerError):
    """The store failed on this one operation (an SQLite error, a bug): refused, nothing changed, the ledger goes on."""


MAX_AMOUNT = 2**53  # every amount and balance stays within +-2^53 (exact in a JavaScript number and in SQLite)


class CoreStepDown(BaseException):
    """The core must stop its actors now (Redis store only). Deliberately not an ``Exception``: the actors' crash
    isolation (``except Exception``: fail one task, go on) must not contain it; it ends the core's term, and the
    lease keeper (``actors/lease.py``) decides what comes next. Nothing was changed when it is raised."""


class StoreUnavailable(CoreStepDown):
    """The store cannot be reached or refused us (Redis down, a wrong password): the reason is in the message."""


class LeaseLost(CoreStepDown):
    """A write carried a stale fencing token: another process took the core lease, so this one may no longer
    change a task or a balance."""


class Store(Protocol):
    """What actors persist through. ``SqliteStore`` and ``RedisStore`` implement it (in Redis each ledger
    primitive is one atomic Lua script). Every method is one transaction; ledger refusals raise a
    ``LedgerError`` subclass and change nothing."""

    path: str

    async def ping(self) -> bool: ...
    async def next_boot(self) -> int: ...
    async def begin_run(self) -> bool: ...
    async def end_run(self) -> None: ...
    async def mark_dispatched(self, task_id: str, boot: int) -> None: ...
    async def count_crash(self, limit: int, crashed_boot: int) -> list[str]: ...
    # ledger
    async def account(self, user_id: str, initial: int) -> Account: ...
    async def grant(
        self,
        user_id: str,
        amount: int,
        initial: int,
        note: str | None = None,
        allow_negative: bool = False,
        grant_id: str | None = None,
    ) -> Account: ...
    async def freeze(
        self, user_id: str, task_id: str, amount: int, initial: int, ttl: float
    ) -> tuple[Account, bool]: ...
    async def resolve(
        self, task_id: str, outcome: str, amount: int | None = None, note: str | None = None
    ) -> tuple[Account, bool]: ...
    async def hold(self, task_id: str) -> Hold | None: ...
    async def expired_holds(self, now: float) -> list[Hold]: ...
    async def sweep_holds(self, now: float | None, ttl: float) -> list[SweptHold]: ...
    async def accounts(self) -> list[Account]: ...
    async def journal(self, user_id: str | None = None) -> list[JournalEntry]: ...
    async def audit(self) -> list[str]: ...
    async def audit_tasks(self) -> list[str]: ...
    # tasks
    async def save_task(self, rec: TaskRecord) -> None: ...
    async def load_active_tasks(self) -> list[TaskRecord]: ...
    async def get_task(self, task_id: str) -> TaskRecord | None: ...
    async def all_tasks(self) -> list[TaskRecord]: ...
    async def list_results(self, user_id: str, limit: int, before_seq: int | None) -> list[TaskRecord]: ...
    async def max_task_seq(self) -> int: ...
