"""The core lease: on a shared Redis store, exactly one process at a time runs the core actors.

``hold_core`` loops forever: take the lease (``SET NX PX`` plus a new fencing token from ``INCR``, one script),
run the core (``run_core``) while renewing it every ``ttl / 3``, and stop the core as soon as the lease is lost:
a renewal that finds another holder, no successful renewal for ``ttl`` seconds (Redis unreachable: by then the
lease may have lapsed and another process may hold it), or a write refused for a stale token (``LeaseLost``,
e.g. after this process was paused past its lease). Then it runs as an edge (``run_edge``: its requests go to
the core through Redis) and tries again every ``ttl / 3``.

The store carries the token (``store.fence``) and every core write sends it; the scripts refuse a stale one, so
a deposed core that wakes up (SIGSTOP/SIGCONT, a long GC pause) cannot change a task or a balance even in the
moment before its renewer notices. On SQLite there is no lease: the one process is the core.

``LeaseState`` is what ``/healthz`` and ``/readyz`` report: this process's role and the holder it last saw.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from coredis.exceptions import RedisError

from .store import CoreStepDown, LeaseLost, RedisStore, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 5.0  # seconds; a new core takes over within about this long after the old one dies


@dataclass
class LeaseState:
    """This process's view (owned by ``hold_core``; read by the web layer)."""

    holder_id: str  # this process's id in the lease
    role: str = "edge"  # "core" while this process runs the core actors
    holder: str | None = None  # who held the lease when last looked at
    token: int = 0  # our fencing token while core (0: none)
    terms: int = 0  # how many times this process became core
    resign_asked: trio.Event = field(default_factory=trio.Event)
    resigned: trio.Event = field(default_factory=trio.Event)  # set when the core stopped and the lease is released

    def as_json(self) -> dict[str, object]:
        return {"role": self.role, "lease": {"holder": self.holder, "self": self.holder_id, "token": self.token}}

    async def resign(self, timeout: float) -> None:
        """Graceful shutdown: stop the core actors and release the lease (so another process takes over at once,
        not after the TTL), waiting at most ``timeout`` seconds. Done while the store's connections still work."""
        self.resign_asked.set()
        with trio.move_on_after(timeout):
            await self.resigned.wait()


def _store_ended_term(exc: BaseException) -> bool:
    """True when ``exc`` (maybe a group from the core's nursery) says the store ended this term: our writes were
    refused for a stale token, or Redis could not be reached (the core steps down and takes the lease again once
    Redis answers, reloading as a restart does). A cancellation in it means something else is going on."""
    kinds = (CoreStepDown, RedisError, OSError)
    if isinstance(exc, kinds):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kinds) is not None and exc.subgroup(trio.Cancelled) is None
    return False


# any failure to reach Redis (coredis errors, OSError, groups of them from its pool) is logged and retried;
# cancellation (a BaseException) is never caught
_REDIS_ERRORS = (StoreUnavailable, Exception)


async def hold_core(
    store: RedisStore,
    state: LeaseState,
    run_core: Callable[[trio.TaskStatus[None]], Awaitable[None]],
    run_edge: Callable[[trio.TaskStatus[None]], Awaitable[None]],
    *,
    ttl: float = DEFAULT_LEASE_TTL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run_core`` whenever this process holds the lease, ``run_edge`` whenever it does not. Reports started
    after the first attempt (as core once the core has started, or as an edge once the edge has)."""
    started = False

    def report_started() -> None:
        nonlocal started
        if not started:
            started = True
            task_status.started()

    while not state.resign_asked.is_set():
        token = await _acquire(store, state, ttl)
        if token == 0:
            async with trio.open_nursery() as edge:
                await edge.start(run_edge)
                report_started()
                while token == 0 and not state.resign_asked.is_set():
                    with trio.move_on_after(ttl / 3):
                        await state.resign_asked.wait()
                    if not state.resign_asked.is_set():
                        token = await _acquire(store, state, ttl)
                edge.cancel_scope.cancel()
            if token == 0:
                continue
        store.fence = str(token)
        state.role, state.holder, state.token = "core", state.holder_id, token
        state.terms += 1
        log.info("lease: %s is the core (fencing token %d, term %d)", state.holder_id, token, state.terms)
        try:
            async with trio.open_nursery() as term:
                term.start_soon(_renew, store, state, token, ttl, term.cancel_scope)
                term.start_soon(_cancel_when, state.resign_asked, term.cancel_scope)
                await term.start(run_core)
                report_started()
        except BaseException as exc:
            if not _store_ended_term(exc):
                raise
            stale = isinstance(exc, BaseExceptionGroup) and exc.subgroup(LeaseLost) is not None
            log.warning("lease: %s steps down: %s", state.holder_id,
                        "a write was refused for a stale fencing token" if stale or isinstance(exc, LeaseLost)
                        else f"the store failed ({exc!r:.300})")
        # the token stays in store.fence: anything still in flight from the old term is refused
        state.role, state.token, state.holder = "edge", 0, None
        if not state.resign_asked.is_set():
            log.warning("lease: %s stopped its core actors (lease lost)", state.holder_id)
    try:
        await store.release_lease(state.holder_id)  # a no-op unless we hold it
    except Exception as exc:
        log.warning("lease: could not release the lease: %s", exc)
    state.holder = None
    log.info("lease: %s resigned", state.holder_id)
    state.resigned.set()
    report_started()
    await trio.sleep_forever()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _acquire(store: RedisStore, state: LeaseState, ttl: float) -> int:
    try:
        token = await store.acquire_lease(state.holder_id, ttl)
        if token == 0:
            state.holder = await store.lease_holder()
        return token
    except _REDIS_ERRORS as exc:
        log.warning("lease: cannot reach the store to take the lease: %s", exc)
        state.holder = None
        return 0


async def _renew(store: RedisStore, state: LeaseState, token: int, ttl: float, term: trio.CancelScope) -> None:
    """Renew every ttl/3; cancel the term when the lease is another's or was not renewed for ttl seconds."""
    last_ok = trio.current_time()
    while True:
        await trio.sleep(ttl / 3)
        sent = trio.current_time()
        try:
            with trio.fail_after(ttl / 3):
                ok = await store.renew_lease(state.holder_id, token, ttl)
        except (trio.TooSlowError, *_REDIS_ERRORS) as exc:
            log.warning("lease: renewal failed: %s", exc)
            if trio.current_time() - last_ok >= ttl:
                log.warning("lease: not renewed for %.1fs: giving up the core", ttl)
                term.cancel()
                return
            continue
        if not ok:
            state.holder = None
            log.warning("lease: another process holds the lease now")
            term.cancel()
            return
        last_ok = sent
