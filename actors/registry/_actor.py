"""The registry's loop: one owner of every task's state, fed by its inbox, the answers of the actors it asked
(``Answer``) and its timers. It never waits for another actor's answer inside the loop: a request is sent and the
loop carries on; the answer is a message like any other (``RegistryBase.request``).

Who talks to whom (blocking sends only go "down" this list, so there is no cycle that can deadlock):
web -> registry -> ledger, scheduler, comfy command loops, sessions hub; comfy report tasks -> registry. Answers
come back through one-shot reply channels (never blocking the answering actor) and are forwarded into the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from .. import ledger as ledger_api
from .. import scheduler as sched
from .._util import reply_once
from ..comfy import BackendEvent, BackendEvents, ComfyCommand
from ..sessions import Broadcast, Publish
from ..store import Store
from ._api import Cancel, GetStats, GetTask, ImageLocation, ListResults, ListTasks, RegistryConfig, RegistryMsg, Submit
from ._base import Answer
from ._core import Registry
from ._views import StoreReads

__all__ = ["handle", "run"]

log = logging.getLogger(__name__)

_CLOSED = object()  # the inbox ended: the loop returns
READERS = 4  # store-only reads (results, image locations) served at once beside the loop


async def run(
    inbox: trio.MemoryReceiveChannel[RegistryMsg],
    cfg: RegistryConfig,
    *,
    store: Store,
    ledger: trio.MemorySendChannel[ledger_api.LedgerMsg],
    scheduler: trio.MemorySendChannel[sched.SchedulerMsg],
    comfy: Mapping[str, trio.MemorySendChannel[ComfyCommand]],
    sessions: trio.MemorySendChannel[Publish | Broadcast],
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    reg = Registry(
        cfg, store=store, ledger=ledger, scheduler=scheduler, comfy=comfy, sessions=sessions, wall_clock=wall_clock
    )
    # unbuffered: the inbox (bounded) stays the registry's only queue; answers wait in their forwarders
    loop_send, loop_recv = trio.open_memory_channel[Any](0)
    async with trio.open_nursery() as nursery:
        reg.nursery, reg.answers = nursery, loop_send
        await reg.load()
        reads_send, reads_recv = trio.open_memory_channel[ListResults | ImageLocation](0)
        for _ in range(READERS):
            nursery.start_soon(_read, reads_recv.clone(), StoreReads(cfg, store))
        reads_recv.close()
        nursery.start_soon(_pump, inbox, loop_send.clone(), reads_send)
        task_status.started()
        with loop_recv:
            while True:
                msg: Any = None
                with trio.move_on_at(reg.next_due()):
                    msg = await loop_recv.receive()
                if msg is None:
                    timer = reg.pop_timer()
                    if timer is not None:
                        try:
                            await reg.on_timer(*timer)
                        except Exception as exc:  # crash isolation: fail only the task the timer is about
                            await reg.contain(timer[1], exc)
                    continue
                if msg is _CLOSED:
                    break
                try:
                    await handle(reg, msg)
                except Exception as exc:  # crash isolation (trio.Cancelled is a BaseException and passes)
                    await reg.contain(msg, exc)
        nursery.cancel_scope.cancel()  # the answer forwarders


async def _pump(
    inbox: trio.MemoryReceiveChannel[RegistryMsg],
    loop: trio.MemorySendChannel[Any],
    reads: trio.MemorySendChannel[ListResults | ImageLocation],
) -> None:
    """The inbox, in order, into the loop; store-only reads to the readers instead."""
    async with loop, reads:
        with inbox:
            async for msg in inbox:
                if isinstance(msg, ListResults | ImageLocation):
                    await reads.send(msg)
                else:
                    await loop.send(msg)
        await loop.send(_CLOSED)


async def _read(requests: trio.MemoryReceiveChannel[ListResults | ImageLocation], reads: StoreReads) -> None:
    async with requests:
        async for msg in requests:
            try:
                if isinstance(msg, ListResults):
                    await reads.list_results(msg)
                else:
                    await reads.image_location(msg)
            except Exception as exc:  # this request fails (the asker sees no answer: a 503), not the registry
                log.error("registry: %s failed: %r", type(msg).__name__, exc, exc_info=exc)
                msg.reply.close()


async def handle(reg: Registry, msg: RegistryMsg | Answer) -> None:
    match msg:
        case Answer():
            await msg.then(msg.value)
        case Submit():
            await reg.submit(msg)
        case GetTask():
            await reg.get_task(msg)
        case Cancel():
            await reg.cancel(msg)
        case ListTasks():
            await reg.list_tasks(msg)
        case ListResults():  # the loop's pump gives these to the readers; handled here when called directly
            await StoreReads(reg.cfg, reg.store).list_results(msg)
        case ImageLocation():
            await StoreReads(reg.cfg, reg.store).image_location(msg)
        case GetStats(reply):
            reply_once(reply, reg.stats())
        case BackendEvents(backend, events):  # one read of a comfy socket: each event isolated as if it came alone
            for event in events:
                try:
                    await reg.on_event(backend, event)
                except Exception as exc:  # crash isolation (trio.Cancelled is a BaseException and passes)
                    await reg.contain(BackendEvent(backend, event), exc)
        case _:
            await reg.on_report(msg)
