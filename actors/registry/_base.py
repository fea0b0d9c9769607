"""The registry's state and the plumbing every part of it uses: timers, persistence, publishing, and requests to
other actors whose answers come back as messages (the registry never waits for another actor in its loop)."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from .. import ledger as ledger_api
from .. import scheduler as sched
from .._util import ActorGone, Forwarder
from ..comfy import ComfyCommand
from ..sessions import Broadcast, Publish
from ..store import Store, TaskRecord
from ..task_machine import State, TimerKind
from ..wire import Status, WireMessage
from ._api import RegistryConfig, image_url
from ._table import Task, TaskTable

__all__ = ["PENDING_REPLIES", "Continuation", "RegistryBase"]

log = logging.getLogger(__name__)

PENDING_REPLIES = 1024  # requests to one actor whose answers the registry still expects (beyond: it waits to send)

Continuation = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Answer:
    """Another actor's answer to a request the registry sent, delivered to the registry's loop as a message."""

    then: Continuation
    value: Any  # the answer, or ActorGone when the actor closed the reply channel
    task_id: str | None  # the task it is about (crash isolation)
    on_error: Callable[[], None] | None = None  # what to tell a waiting requester if ``then`` raises


@dataclass(slots=True)
class _Outstanding:
    """Requests sent to one actor, answered in the order sent (each actor handles its inbox in order)."""

    name: str
    send: trio.MemorySendChannel[tuple[trio.MemoryReceiveChannel[Any], Answer]]
    recv: trio.MemoryReceiveChannel[tuple[trio.MemoryReceiveChannel[Any], Answer]]


class RegistryBase:
    def __init__(
        self,
        cfg: RegistryConfig,
        *,
        store: Store,
        ledger: trio.MemorySendChannel[ledger_api.LedgerMsg],
        scheduler: trio.MemorySendChannel[sched.SchedulerMsg],
        comfy: Mapping[str, trio.MemorySendChannel[ComfyCommand]],
        sessions: trio.MemorySendChannel[Publish | Broadcast],
        wall_clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.ledger = ledger
        self.scheduler = scheduler
        self.comfy = comfy
        self.sessions = sessions
        self.to_hub = Forwarder(sessions)  # no checkpoint per message: progress bursts reach the hub whole
        self.now = wall_clock
        self.tasks = TaskTable()  # the live tasks, counted by state, user and backend
        self.by_prompt: dict[str, str] = {}
        self.up: set[str] = set()
        self.lost_since: dict[str, float] = {}  # backend -> trio time it was last seen going away (absent: up)
        self.abandoned: dict[str, set[str]] = {}  # backend -> prompt_ids given up on; deleted/interrupted on return
        # queued tasks reloaded at start-up: a crash between dispatch and the store's "submitted" may have left
        # them inside a ComfyUI already. prompt_id -> backends that said "not here"; dispatched once all did.
        self.unverified: dict[str, set[str]] = {}
        self.last_cross_check: dict[str, float] = {}  # backend -> trio time of the last status-triggered check
        self.seq = 0
        self.timers: list[tuple[float, int, TimerKind, str]] = []  # (trio time, tiebreak, kind, task_id or backend)
        self.timer_due: dict[tuple[TimerKind, str], float] = {}  # (kind, key) -> the one live due time
        self._timer_ids = 0
        self.last_status: Status | None = None
        self.buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, trio time) for the submit rate
        self.answering: dict[str, list[Any]] = {}  # task id -> Submits waiting for its answer (repeats included)
        self.freezing: dict[str, int] = {}  # user -> submits waiting for the ledger's freeze (count as queued)
        self.nursery: trio.Nursery | None = None  # set by run(): where the answer forwarders live
        self.answers: trio.MemorySendChannel[Any] | None = None  # into the loop (set by run())
        self._outstanding: dict[int, _Outstanding] = {}

    # -- talking to other actors without waiting for them

    async def request(
        self,
        target: trio.MemorySendChannel[Any],
        build: Callable[[trio.MemorySendChannel[Any]], Any],
        then: Continuation,
        *,
        task_id: str | None,
        name: str,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        """Send ``build(reply)`` to an actor and go on; its answer comes back through the loop as an ``Answer``
        that runs ``then(answer)``. Answers from one actor run in the order its requests were sent."""
        out = self._outstanding.get(id(target))
        if out is None:
            assert self.nursery is not None and self.answers is not None, "request() before run() started"
            send, recv = trio.open_memory_channel[tuple[trio.MemoryReceiveChannel[Any], Answer]](PENDING_REPLIES)
            out = self._outstanding[id(target)] = _Outstanding(name, send, recv)
            self.nursery.start_soon(self._forward, out, self.answers.clone())
        reply_send, reply_recv = trio.open_memory_channel[Any](1)
        try:
            await target.send(build(reply_send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reply_recv.close()
            raise ActorGone(name) from None
        await out.send.send((reply_recv, Answer(then, None, task_id, on_error)))

    @staticmethod
    async def _forward(out: _Outstanding, answers: trio.MemorySendChannel[Any]) -> None:
        async with answers:
            async for reply_recv, answer in out.recv:
                with reply_recv:
                    try:
                        value: Any = await reply_recv.receive()
                    except (trio.EndOfChannel, trio.BrokenResourceError):
                        value = ActorGone(out.name)
                await answers.send(replace(answer, value=value))

    # -- helpers

    def url(self, task_id: str, n: int) -> str:
        return image_url(self.cfg, task_id, n)

    def urls(self, rec: TaskRecord) -> list[str]:
        return [self.url(rec.task_id, n) for n in range(len(rec.images))]

    def after(self, delay: float, kind: TimerKind, key: str) -> None:
        """Run ``on_timer(kind, key)`` in ``delay`` seconds. One live timer per (kind, key): an earlier one wins."""
        due = trio.current_time() + delay
        if self.timer_due.get((kind, key), float("inf")) <= due:
            return
        self.timer_due[(kind, key)] = due
        self._timer_ids += 1
        heapq.heappush(self.timers, (due, self._timer_ids, kind, key))

    def next_due(self) -> float:
        return self.timers[0][0] if self.timers else float("inf")

    def pop_timer(self) -> tuple[TimerKind, str] | None:
        """The next due timer's (kind, key), or None if that heap entry was superseded by an earlier one."""
        due, _, kind, key = heapq.heappop(self.timers)
        if self.timer_due.get((kind, key)) != due:
            return None
        del self.timer_due[(kind, key)]
        return kind, key

    async def publish(self, task: Task, msg: WireMessage) -> None:
        if task.held is not None:  # its "queued" announcement has not gone out yet: keep the order
            task.held.append(msg)
            return
        await self.to_hub.send(Publish(task.rec.user_id, task.rec.client_id, msg.to_wire()))

    async def save(self, task: Task, **changes: Any) -> TaskRecord:
        """Persist a change of the task's record, then take it in memory: if the store fails, memory keeps what the
        store holds (a task whose end could not be written is not "ended" here, so failing it still works)."""
        rec = replace(task.rec, updated_at=self.now(), **changes)
        await self.store.save_task(rec)
        self.tasks.set_record(task, rec)
        return rec

    def inflight_on(self, backend: str) -> list[Task]:
        return self.tasks.inflight_on(backend)

    async def broadcast_status(self) -> None:
        count = self.tasks.count
        status = Status(
            queued=count(State.QUEUED),
            running=count(State.SUBMITTED) + count(State.RUNNING),
            backends_up=len(self.up),
            backends_total=len(self.comfy),
        )
        if status != self.last_status:
            self.last_status = status
            await self.sessions.send(Broadcast(status.to_wire()))
