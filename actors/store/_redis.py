"""``RedisStore``: the same ``Store`` on Redis (``--store redis://HOST:PORT/DB``, ``rediss://``, a password in the URL).

Each ledger operation and each task write is one Lua script (``_redis_lua``): atomic, idempotent by task id, with
the same rules and the same journal as ``SqliteStore``. Writes carry this process's fencing token (``fence``, set
by the core lease, ``actors/lease.py``); a script refuses a stale one with ``LeaseLost``, so a deposed core changes
nothing. Without a lease (``fence == ""``: tools, tests) writes are unfenced. The client is ``coredis`` (anyio,
so native under trio; STACK-NOTES "Redis from trio"). Key layout: see ``_redis_lua``.

Durability is Redis's: with ``appendonly yes`` and ``appendfsync everysec`` a Redis crash may lose the last
second of acknowledged writes (a gateway crash loses nothing Redis acknowledged); ``appendfsync always`` loses
none, at the cost of an fsync per write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import coredis
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError, ResponseError

from ..task_machine import ACTIVE_STATES  # the task states are the machine's (defined once)
from . import _redis_lua as lua
from ._audit import audit_ledger, audit_tasks
from ._types import (
    MAX_AMOUNT,
    Account,
    Hold,
    HoldConflict,
    ImageRef,
    InsufficientCredits,
    InvalidAmount,
    JournalEntry,
    LeaseLost,
    NegativeBalance,
    StoreUnavailable,
    SweptHold,
    TaskRecord,
    UnknownHold,
)

T = TypeVar("T")
_UNREACHABLE = (RedisConnectionError, TimeoutError, OSError)  # BusyLoadingError (restarting) is a ConnectionError
DEFAULT_PREFIX = "cg:"
CONNECT_TIMEOUT = 5.0  # seconds


def split_redis_url(url: str) -> tuple[str, str, str]:
    """``redis://…?prefix=p`` -> (the URL for coredis, the key prefix, the URL with its password hidden)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"a Redis store URL starts with redis:// or rediss://, not {url!r}")
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", DEFAULT_PREFIX)
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    shown = parts.netloc.rpartition("@")
    netloc = f"***@{shown[2]}" if shown[1] else parts.netloc
    return clean, prefix, urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    """The ``Store`` interface on Redis. ``open()`` connects; every method is one script or one read."""

    def __init__(self, url: str, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.url, self.prefix, self.path = split_redis_url(url)
        self._now = wall_clock
        self.fence = ""  # this process's fencing token ("" = unfenced)
        self._stack: AsyncExitStack | None = None
        self._client: coredis.Redis[str] | None = None
        self._scripts: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<RedisStore {self.path!r} fence={self.fence!r}>"

    async def open(self) -> None:
        """Connect (``StoreUnavailable`` with the reason when Redis refuses or cannot be reached)."""
        client = coredis.Redis.from_url(self.url, decode_responses=True, connect_timeout=CONNECT_TIMEOUT)
        try:
            async with AsyncExitStack() as stack:
                self._client = await stack.enter_async_context(client)
                for name in (
                    "ACCOUNT",
                    "GRANT",
                    "FREEZE",
                    "RESOLVE",
                    "SWEEP",
                    "SAVE_TASK",
                    "TASKS",
                    "SNAPSHOT",
                    "ACQUIRE",
                    "RENEW",
                    "RELEASE",
                    "END_RUN",
                    "MARK_DISPATCHED",
                    "COUNT_CRASH",
                ):
                    self._scripts[name] = client.register_script(getattr(lua, name))
                await client.ping()
                self._stack = stack.pop_all()
        except BaseException as exc:
            self._client = None
            cause = _redis_failure(exc)
            if cause is None:
                raise
            raise StoreUnavailable(f"{self.path}: {cause}") from exc

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> coredis.Redis[str]:
        if self._client is None:
            raise RuntimeError("store is not open")
        return self._client

    async def _script(self, name: str, *args: Any, fenced: bool = False) -> Any:
        argv = [self.fence, *args] if fenced else list(args)
        try:
            return await self._scripts[name](keys=[self.prefix], args=[_arg(a) for a in argv])
        except ResponseError as exc:
            raise _mapped(exc) from None
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc

    async def _io(self, request: Awaitable[T]) -> T:
        """One plain command; Redis unreachable is ``StoreUnavailable`` (the core steps down, see lease.py)."""
        try:
            return await request
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc

    def _ts(self) -> str:
        return repr(float(self._now()))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def next_boot(self) -> int:
        return int(await self._io(self.client.incr(self.prefix + "boot")))

    # -- crash accounting: a run is one core's term (see actors/gateway.py)

    async def begin_run(self) -> bool:
        """Mark a core term as running; True if the previous one did not end cleanly."""
        return await self._io(self.client.set(self.prefix + "running", "1", get=True)) == "1"

    async def end_run(self) -> None:
        await self._script("END_RUN", fenced=True)

    async def mark_dispatched(self, task_id: str, boot: int) -> None:
        await self._script("MARK_DISPATCHED", task_id, boot, fenced=True)

    async def count_crash(self, limit: int, crashed_boot: int) -> list[str]:
        return list(await self._script("COUNT_CRASH", limit, crashed_boot, fenced=True))

    # -- ledger primitives

    async def account(self, user_id: str, initial: int) -> Account:
        bal, frz = await self._script("ACCOUNT", user_id, initial, self._ts(), fenced=True)
        return Account(user_id, int(bal), int(frz))

    async def grant(
        self,
        user_id: str,
        amount: int,
        initial: int,
        note: str | None = None,
        allow_negative: bool = False,
        grant_id: str | None = None,
    ) -> Account:
        """As ``SqliteStore.grant``; a ``grant_id`` seen before is not applied again (the account is returned)."""
        if not isinstance(amount, int) or isinstance(amount, bool) or abs(amount) > MAX_AMOUNT:
            raise InvalidAmount(f"a grant must be an int within +-2^53, not {amount!r}")
        bal, frz = await self._script(
            "GRANT",
            user_id,
            amount,
            initial,
            note or "",
            note is not None,
            self._ts(),
            allow_negative,
            MAX_AMOUNT,
            grant_id or "",
            fenced=True,
        )
        return Account(user_id, int(bal), int(frz))

    async def freeze(self, user_id: str, task_id: str, amount: int, initial: int, ttl: float) -> tuple[Account, bool]:
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 <= amount <= MAX_AMOUNT:
            raise InvalidAmount(f"amount must be an int from 0 to 2^53, not {amount!r}")
        now = float(self._now())
        try:
            bal, frz, did = await self._script(
                "FREEZE", user_id, task_id, amount, initial, repr(now), repr(now + ttl), fenced=True
            )
        except InsufficientCredits as exc:
            raise InsufficientCredits(user_id, exc.available, exc.amount) from None
        return Account(user_id, int(bal), int(frz)), bool(did)

    async def resolve(
        self, task_id: str, outcome: str, amount: int | None = None, note: str | None = None
    ) -> tuple[Account, bool]:
        if outcome not in ("settled", "released"):
            raise ValueError(f"outcome must be 'settled' or 'released', not {outcome!r}")
        user, bal, frz, did = await self._script(
            "RESOLVE",
            task_id,
            outcome,
            "" if amount is None else amount,
            note or "",
            note is not None,
            self._ts(),
            fenced=True,
        )
        return Account(user, int(bal), int(frz)), bool(did)

    async def sweep_holds(self, now: float | None, ttl: float) -> list[SweptHold]:
        """As ``SqliteStore.sweep_holds``, in one script."""
        ts = float(self._now())
        why = "expired" if now is not None else "recovered at start-up"
        rows = await self._script(
            "SWEEP",
            "" if now is None else repr(float(now)),
            repr(float(now) + ttl) if now is not None else "",
            why,
            repr(ts),
            fenced=True,
        )
        out = []
        for task, user, amount, state, exp, outcome, bal, frz, st in rows:
            hold = Hold(task, user, int(amount), state, float(exp))
            out.append(SweptHold(hold, outcome, Account(user, int(bal), int(frz)), st or None))
        return out

    async def hold(self, task_id: str) -> Hold | None:
        h = await self._io(
            self.client.hmget(self.prefix + "hold:" + task_id, ["user", "amount", "state", "expires_at"])
        )
        user, amount, state, expires_at = h
        if user is None or amount is None or state is None or expires_at is None:
            return None
        return Hold(task_id, user, int(amount), state, float(expires_at))

    async def expired_holds(self, now: float) -> list[Hold]:
        ids = await self._io(self.client.zrangebyscore(self.prefix + "holds:pending", float("-inf"), float(now)))
        holds = [await self.hold(as_text(t)) for t in ids if isinstance(t, (str, bytes))]  # members, no scores
        return [h for h in holds if h is not None]

    async def _snapshot(self) -> tuple[list[Account], list[Hold]]:
        accts, holds = await self._script("SNAPSHOT")
        return (
            [Account(u, int(b), int(f)) for u, b, f in accts],
            [Hold(t, u, int(a), s, float(e)) for t, u, a, s, e in holds],
        )

    async def accounts(self) -> list[Account]:
        return (await self._snapshot())[0]

    async def journal(self, user_id: str | None = None) -> list[JournalEntry]:
        out = []
        for entry in await self._io(self.client.xrange(self.prefix + "journal")):
            f = entry.field_values
            if user_id is not None and f["user"] != user_id:
                continue
            out.append(
                JournalEntry(
                    int(f["id"]),
                    float(f["ts"]),
                    as_text(f["user"]),
                    as_text(f["kind"]),
                    _optional_text(f.get("task")),
                    int(f["amount"]),
                    int(f["bal"]),
                    int(f["frz"]),
                    _optional_text(f.get("note")),
                )
            )
        return out

    async def audit(self) -> list[str]:
        """The same checks as SQLite's (``_audit.audit_ledger``). The journal is read before the snapshot; on a
        live store a write between the two reads shows as a problem, so audit a quiescent store (or re-run)."""
        journal = await self.journal()
        accounts, holds = await self._snapshot()
        return audit_ledger(journal, accounts, holds)

    async def audit_tasks(self) -> list[str]:
        return audit_tasks(await self.all_tasks(), (await self._snapshot())[1])

    # -- tasks

    async def save_task(self, rec: TaskRecord) -> None:
        fields: list[Any] = [
            "task_id",
            rec.task_id,
            "seq",
            rec.seq,
            "user_id",
            rec.user_id,
            "client_id",
            rec.client_id,
            "prompt_id",
            rec.prompt_id,
            "state",
            rec.state,
            "size",
            rec.size,
            "cost",
            rec.cost,
            "workflow",
            json.dumps(rec.workflow, separators=(",", ":")),
            "created_at",
            repr(float(rec.created_at)),
            "updated_at",
            repr(float(rec.updated_at)),
            "images",
            json.dumps([[i.backend, i.filename, i.subfolder, i.type] for i in rec.images]),
            "crashes",
            0,  # a save is progress (crash quarantine)
        ]
        if rec.template is not None:
            fields += ["template", rec.template, "params", json.dumps(rec.params, separators=(",", ":"))]
        for name, value in (
            ("reason", rec.reason),
            ("backend", rec.backend),
            ("error", None if rec.error is None else json.dumps(rec.error)),
        ):
            fields += [name, value] if value is not None else ["-" + name, ""]
        await self._script("SAVE_TASK", rec.task_id, rec.seq, rec.user_id, rec.state, *fields, fenced=True)

    async def _tasks(
        self, index: str, lo: str = "-inf", hi: str = "+inf", limit: int = -1, reverse: bool = False
    ) -> list[TaskRecord]:
        rows = await self._script("TASKS", index, lo, hi, limit, reverse)
        return [_task(r) for r in rows if r]

    async def load_active_tasks(self) -> list[TaskRecord]:
        return await self._tasks("tasks:active")

    async def all_tasks(self) -> list[TaskRecord]:
        return await self._tasks("tasks")

    async def get_task(self, task_id: str) -> TaskRecord | None:
        r = await self._io(self.client.hgetall(self.prefix + "task:" + task_id))
        return _task(r) if r else None

    async def list_results(self, user_id: str, limit: int, before_seq: int | None) -> list[TaskRecord]:
        hi = f"({before_seq}" if before_seq is not None else "+inf"
        return await self._tasks("results:" + user_id, "-inf", hi, limit, reverse=True)

    async def max_task_seq(self) -> int:
        top = await self._io(self.client.zrange(self.prefix + "tasks", -1, -1, withscores=True))
        return int(top[0][1]) if top else 0

    # -- the core lease (see actors/lease.py)

    async def acquire_lease(self, holder: str, ttl: float) -> int:
        """Take the lease when free: returns the new fencing token, or 0 when another process holds it."""
        return int(await self._script("ACQUIRE", holder, int(ttl * 1000)))

    async def renew_lease(self, holder: str, token: int, ttl: float) -> bool:
        return bool(await self._script("RENEW", holder, token, int(ttl * 1000)))

    async def release_lease(self, holder: str) -> None:
        await self._script("RELEASE", holder)

    async def lease_holder(self) -> str | None:
        return await self._io(self.client.get(self.prefix + "lease"))


def _redis_failure(exc: BaseException) -> BaseException | None:
    """The Redis or socket error behind ``exc`` (coredis raises from its pool's task group, so often inside an
    exception group), or None when it is anything else (a cancellation, a bug): those propagate unchanged."""
    if isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        return _redis_failure(exc.exceptions[0])
    return exc if isinstance(exc, (RedisError, OSError)) else None


def _arg(a: str | int | bool) -> str | int:
    if isinstance(a, bool):
        return "1" if a else "0"
    return a


def as_text(value: str | bytes) -> str:
    """A value read from Redis: str (the client decodes responses), typed by coredis as str or bytes."""
    return value.decode() if isinstance(value, bytes) else value


def _optional_text(value: str | bytes | None) -> str | None:
    return None if value is None else as_text(value)


def _task(r: dict[str, str] | Sequence[str]) -> TaskRecord:
    if not isinstance(r, dict):
        r = dict(zip(r[::2], r[1::2], strict=True))
    return TaskRecord(
        task_id=r["task_id"],
        seq=int(r["seq"]),
        user_id=r["user_id"],
        client_id=r["client_id"],
        prompt_id=r["prompt_id"],
        state=r["state"],
        size=int(r["size"]),
        cost=int(r["cost"]),
        workflow=json.loads(r["workflow"]),
        created_at=float(r["created_at"]),
        updated_at=float(r["updated_at"]),
        reason=r.get("reason"),
        backend=r.get("backend"),
        error=json.loads(r["error"]) if r.get("error") else None,
        images=tuple(ImageRef(*i) for i in json.loads(r.get("images", "[]"))),
        template=r.get("template"),
        params=json.loads(r["params"]) if r.get("params") else None,
    )


def _mapped(exc: ResponseError) -> BaseException:
    """A script's error reply -> the store's exception (the same classes as SQLite's)."""
    text = str(exc).split(" script: ")[0]
    code, _, rest = text.partition(" ")
    if code == "INSUFFICIENT":
        available, amount = rest.split()[:2]
        return InsufficientCredits("?", int(available), int(amount))
    if code == "CONFLICT":
        return HoldConflict(rest)
    if code == "UNKNOWN":
        return UnknownHold(rest)
    if code == "FENCED":
        return LeaseLost(rest)
    if code == "INVALID":
        return InvalidAmount(rest)
    if code == "NEGATIVE":
        return NegativeBalance(rest)
    return exc


assert {"queued", "submitted", "running"} == ACTIVE_STATES  # the scripts name them (SWEEP, SAVE_TASK)
