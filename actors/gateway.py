"""``run_gateway``: open the store, start every actor in one nursery, hand the web layer a ``Handles``.

Cancelling the nursery stops everything; in-flight tasks stay recorded in the store and are reconciled on
the next start. Inbox sizes are the backpressure budget (docs/STYLE.md: small N for bursty inboxes).

The sessions hub lives as long as the process. The *core* actors (ledger, scheduler, registry, comfy) run in a
term: on SQLite one term for the whole run; on Redis a term per tenure of the core lease (``actors/lease.py``),
so a process that loses the lease stops them and one that takes it starts them afresh, reloading and
reconciling exactly as a restart does. The web layer sends to stable front inboxes; each term forwards them to
its own fresh actor inboxes, so nothing a previous term left in a channel reaches the next one.

A term is a *run* for crash accounting (``Store.begin_run``/``end_run``, the boot number, quarantine): on SQLite
the process, on Redis one tenure of the lease, so a core killed mid-term counts as a crash for the next core.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar, cast

import httpx
import trio

from . import bridge, comfy, ledger, registry, scheduler, sessions
from .image_urls import ImageUrls
from .lease import DEFAULT_LEASE_TTL, LeaseState, hold_core
from .store import RedisStore, Store, open_store

log = logging.getLogger(__name__)
M = TypeVar("M")  # the message type _forward passes on

REGISTRY_INBOX = 256  # comfy progress events arrive in bursts
SCHEDULER_INBOX = 64
LEDGER_INBOX = 64
HUB_INBOX = 1024
COMFY_INBOX = 64
SEQ_EPOCH = 10**9  # session seqs of the n-th start on a data dir begin at (n-1) * 10^9 (9 million below 2^53)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    comfyui_urls: tuple[str, ...] = ("http://127.0.0.1:8188",)
    store_path: str = "data/gateway.db"
    max_inflight: int = 2
    max_inflight_per_user: int = 0
    max_queued_per_user: int = 32
    initial_credits: int = 100
    price: int = 1
    task_timeout: float = 30 * 60.0
    backend_lost_after: float = 5 * 60.0  # an unreachable backend's in-flight tasks fail (backend_lost) after this
    hold_ttl: float = 2 * 60 * 60.0  # must be longer than task_timeout (a safety net, not the normal path)
    public_url: str = ""
    comfy_policy: comfy.RestartPolicy = field(default_factory=comfy.RestartPolicy)
    comfy_timeouts: comfy.ComfyTimeouts = field(default_factory=comfy.ComfyTimeouts)
    replay_max: int = sessions.DEFAULT_REPLAY_MAX
    replay_age: float = sessions.DEFAULT_REPLAY_AGE
    max_sessions_per_user: int = sessions.DEFAULT_MAX_SESSIONS_PER_USER
    submit_rate: float = 5.0  # submits per user per second (token bucket) ...
    submit_burst: int = 20  # ... this many at once
    quarantine_after: int = 2  # unclean restarts a task may stay active across without progress
    image_urls: ImageUrls | None = None  # signs the image URLs handed out (None: unsigned, header auth only)
    lease_ttl: float = DEFAULT_LEASE_TTL  # Redis store: seconds the core lease lasts unless renewed

    def __post_init__(self) -> None:
        if not self.comfyui_urls:
            raise ValueError("at least one ComfyUI URL is needed")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, not {self.max_inflight}")
        if self.price < 0 or self.initial_credits < 0:
            raise ValueError("price and initial_credits must be >= 0")
        if self.hold_ttl <= self.task_timeout:
            raise ValueError("hold_ttl must be longer than task_timeout")
        if self.backend_lost_after <= 0 or self.task_timeout <= 0:
            raise ValueError("backend_lost_after and task_timeout must be > 0")
        if (
            self.submit_rate <= 0
            or self.submit_burst < 1
            or self.quarantine_after < 1
            or self.max_sessions_per_user < 1
        ):
            raise ValueError("submit_rate, submit_burst, quarantine_after and max_sessions_per_user must be >= 1")
        if self.lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, not {self.lease_ttl}")

    @property
    def backend_urls(self) -> dict[str, str]:
        return {f"b{i}": url.rstrip("/") for i, url in enumerate(self.comfyui_urls)}


@dataclass(frozen=True, slots=True)
class Handles:
    """What the web layer gets: send ends of the actors' inboxes, and shared clients. Frozen: no swapping."""

    config: GatewayConfig
    registry: trio.MemorySendChannel[registry.RegistryMsg]
    ledger: trio.MemorySendChannel[ledger.LedgerMsg]
    scheduler: trio.MemorySendChannel[scheduler.SchedulerMsg]
    sessions: trio.MemorySendChannel[sessions.HubMsg]
    store: Store
    http: httpx.AsyncClient
    backend_urls: Mapping[str, str]
    comfy_stats: Mapping[str, comfy.ComfyCounters]
    client_ids: Mapping[str, str]
    lease: LeaseState  # this process's role (core or edge) and the lease holder


async def run_gateway(cfg: GatewayConfig, *, task_status: trio.TaskStatus[Handles] = trio.TASK_STATUS_IGNORED) -> None:
    backend_urls = cfg.backend_urls
    # One persistent ComfyUI clientId per gateway process and backend: ComfyUI routes a prompt's events only
    # to the socket registered under the clientId it was submitted with.
    run_id = uuid.uuid4().hex[:12]
    client_ids = {name: f"comfy-gateway-{run_id}-{name}" for name in backend_urls}

    async with open_store(cfg.store_path) as store, httpx.AsyncClient(timeout=cfg.comfy_timeouts.http) as http:
        # the front inboxes the web layer sends to; each core term forwards them to its own actors
        reg_tx, reg_rx = trio.open_memory_channel[registry.RegistryMsg](REGISTRY_INBOX)
        sched_tx, sched_rx = trio.open_memory_channel[scheduler.SchedulerMsg](SCHEDULER_INBOX)
        ledger_tx, ledger_rx = trio.open_memory_channel[ledger.LedgerMsg](LEDGER_INBOX)
        hub_tx, hub_rx = trio.open_memory_channel[sessions.HubMsg](HUB_INBOX)
        stats = {name: comfy.ComfyCounters() for name in backend_urls}
        lease = LeaseState(holder_id=f"{run_id}")
        # Redis: the askers an edge term leaves waiting, answered by this process's next term (bridge._requests)
        handover = bridge.Handover(lease.holder_id)
        shared = isinstance(store, RedisStore)  # Redis: session messages go through it, for every process
        # where the core actors' messages for the sessions go: this process's hub, or Redis (publish_to_redis)
        pub_tx: trio.MemorySendChannel[sessions.Publish | sessions.Broadcast] = hub_tx
        pub_rx: trio.MemoryReceiveChannel[sessions.Publish | sessions.Broadcast] | None = None
        if shared:
            pub_tx, pub_rx = trio.open_memory_channel[sessions.Publish | sessions.Broadcast](HUB_INBOX)

        first_run: list[tuple[bool, int]] = []  # SQLite: the process's run, begun before the hub starts

        async def run_core(task_status: trio.TaskStatus[None]) -> None:
            """One term of the core actors, on fresh inboxes fed from the front ones."""
            unclean, boot = first_run.pop() if first_run else await _begin_run(store)
            clean = False
            try:
                await _core_term(unclean, boot, task_status)
                clean = True
            except BaseException as exc:
                # on Redis only a shutdown ends a term cleanly. A lost lease (renewals failed: Redis slow, this
                # process starved) cuts the actors off mid-work as a crash does: what they had saved but not yet
                # published is gone, so the next core must count it as unclean and tell the sessions to resync
                clean = _only_cancelled(exc) and (not shared or lease.resign_asked.is_set())
                raise
            finally:
                if clean:
                    with trio.move_on_after(5, shield=True):
                        try:
                            await store.end_run()
                        except Exception as exc:  # Redis away: the next core counts this term as a crash
                            log.warning("gateway: could not record a clean end of the run: %r", exc)

        async def _core_term(unclean: bool, boot: int, task_status: trio.TaskStatus[None]) -> None:
            t_reg_tx, t_reg_rx = trio.open_memory_channel[registry.RegistryMsg](REGISTRY_INBOX)
            t_sched_tx, t_sched_rx = trio.open_memory_channel[scheduler.SchedulerMsg](SCHEDULER_INBOX)
            t_ledger_tx, t_ledger_rx = trio.open_memory_channel[ledger.LedgerMsg](LEDGER_INBOX)
            comfy_tx: dict[str, trio.MemorySendChannel[comfy.ComfyCommand]] = {}
            comfy_rx: dict[str, trio.MemoryReceiveChannel[comfy.ComfyCommand]] = {}
            for name in backend_urls:
                comfy_tx[name], comfy_rx[name] = trio.open_memory_channel[comfy.ComfyCommand](COMFY_INBOX)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        ledger.run,
                        t_ledger_rx,
                        store=store,
                        sessions=pub_tx.clone(),
                        initial_credits=cfg.initial_credits,
                        hold_ttl=cfg.hold_ttl,
                    )
                )
                await nursery.start(
                    partial(
                        scheduler.run,
                        t_sched_rx,
                        backends={n: c.clone() for n, c in comfy_tx.items()},
                        max_inflight=cfg.max_inflight,
                        max_inflight_per_user=cfg.max_inflight_per_user,
                    )
                )
                reg_cfg = registry.RegistryConfig(
                    price=cfg.price,
                    max_queued_per_user=cfg.max_queued_per_user,
                    task_timeout=cfg.task_timeout,
                    backend_lost_after=cfg.backend_lost_after,
                    public_url=cfg.public_url.rstrip("/"),
                    backend_urls=backend_urls,
                    image_urls=cfg.image_urls,
                    submit_rate=cfg.submit_rate,
                    submit_burst=cfg.submit_burst,
                    quarantine_after=cfg.quarantine_after,
                    unclean_start=unclean,
                    boot=boot,
                )
                await nursery.start(
                    partial(
                        registry.run,
                        t_reg_rx,
                        reg_cfg,
                        store=store,
                        ledger=t_ledger_tx.clone(),
                        scheduler=t_sched_tx.clone(),
                        comfy={n: c.clone() for n, c in comfy_tx.items()},
                        sessions=pub_tx.clone(),
                    )
                )
                for name, url in backend_urls.items():
                    await nursery.start(
                        partial(
                            comfy.run,
                            comfy.BackendSpec(name, url),
                            comfy_rx[name],
                            t_reg_tx.clone(),
                            http=http,
                            client_id=client_ids[name],
                            policy=cfg.comfy_policy,
                            timeouts=cfg.comfy_timeouts,
                            counters=stats[name],
                            on_dispatch=partial(store.mark_dispatched, boot=boot),
                            lean_submit=True,
                        )
                    )
                if isinstance(store, RedisStore):  # the edges' requests
                    await nursery.start(
                        partial(
                            bridge.serve_edges,
                            store,
                            {"registry": t_reg_tx.clone(), "ledger": t_ledger_tx.clone()},
                            handover=handover,
                        )
                    )
                    if unclean:  # the dead core's unpublished messages are lost: clients reload over HTTP
                        told = await bridge.resync_sessions(store, pub_tx)
                        log.warning("gateway: the previous core died mid-term: %d session(s) told to resync", told)
                nursery.start_soon(_forward, reg_rx.clone(), t_reg_tx)
                nursery.start_soon(_forward, sched_rx.clone(), t_sched_tx)
                nursery.start_soon(_forward, ledger_rx.clone(), t_ledger_tx)
                task_status.started()

        async def run_edge(task_status: trio.TaskStatus[None]) -> None:
            """While another process is the core: the web layer's requests go to it through Redis."""
            assert isinstance(store, RedisStore)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        bridge.ask_core,
                        store,
                        lease.holder_id,
                        {"registry": reg_rx.clone(), "ledger": ledger_rx.clone()},
                        handover=handover,
                    )
                )
                nursery.start_soon(_refuse, sched_rx.clone())  # scheduler statistics exist only on the core
                task_status.started()

        async with trio.open_nursery() as nursery:
            if isinstance(store, RedisStore):
                # seqs are numbered in Redis, per session and for good, so they need no per-run base
                real_tx, real_rx = trio.open_memory_channel[sessions.HubMsg](HUB_INBOX)
                await nursery.start(
                    partial(
                        sessions.run,
                        real_rx,
                        replay_max=cfg.replay_max,
                        replay_age=cfg.replay_age,
                        max_sessions_per_user=cfg.max_sessions_per_user,
                    )
                )
                # with Redis the hub's front carries the events stream's Live messages too, put there by feed_hub,
                # its only reader (sessions.run reads real_rx); hub_tx is typed for what the web layer sends
                live_tx = cast("trio.MemorySendChannel[sessions.HubMsg | bridge.Live]", hub_tx.clone())
                await nursery.start(partial(bridge.feed_hub, store, hub_rx, live_tx, real_tx))
                assert pub_rx is not None  # made above when shared
                await nursery.start(partial(bridge.publish_to_redis, store, pub_rx, replay_max=cfg.replay_max))
                await nursery.start(partial(hold_core, store, lease, run_core, run_edge, ttl=cfg.lease_ttl))
                await nursery.start(partial(bridge.announce, store, lease, cfg.public_url, every=cfg.lease_ttl / 3))
            else:
                first_run.append(await _begin_run(store))
                # seqs of this run start above every earlier run's, so resuming across a restart gets a resync
                seq_base = (first_run[0][1] - 1) * SEQ_EPOCH
                await nursery.start(
                    partial(
                        sessions.run,
                        hub_rx,
                        replay_max=cfg.replay_max,
                        replay_age=cfg.replay_age,
                        seq_base=seq_base,
                        max_sessions_per_user=cfg.max_sessions_per_user,
                    )
                )
                lease.role, lease.holder, lease.terms = "core", lease.holder_id, 1
                lease.resigned.set()  # no lease to give back: the actors stop with the process
                await nursery.start(run_core)
            log.info(
                "gateway: %d backend(s) %s, store %s, %s",
                len(backend_urls),
                list(backend_urls.values()),
                store.path,
                lease.role,
            )
            task_status.started(
                Handles(
                    config=cfg,
                    registry=reg_tx,
                    ledger=ledger_tx,
                    scheduler=sched_tx,
                    sessions=hub_tx,
                    store=store,
                    http=http,
                    backend_urls=backend_urls,
                    comfy_stats=stats,
                    client_ids=client_ids,
                    lease=lease,
                )
            )


async def _begin_run(store: Store) -> tuple[bool, int]:
    """(whether the previous run crashed, this run's boot number)."""
    unclean = await store.begin_run()
    boot = await store.next_boot()
    if unclean:
        log.warning("gateway: the previous run on %s did not stop cleanly (crashed or killed)", store.path)
    return unclean, boot


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return isinstance(exc, trio.Cancelled)


async def _refuse(front: trio.MemoryReceiveChannel[object]) -> None:
    """Answer nothing: each request's reply channel is closed, so its asker gets ``ActorGone`` at once."""
    with front:
        async for msg in front:
            reply = getattr(msg, "reply", None)
            if reply is not None:
                reply.close()


async def _forward(front: trio.MemoryReceiveChannel[M], inbox: trio.MemorySendChannel[M]) -> None:
    """Hand the web layer's requests to this term's actor (the term's end cancels it; a request taken but not
    delivered then has its reply channel closed, so its asker gets ``ActorGone``, a 503)."""
    with front, inbox:
        async for msg in front:
            await inbox.send(msg)
