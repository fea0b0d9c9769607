"""Requests from an edge to the core over Redis (``actors/bridge/_requests``) when the edge itself becomes the core.

An edge's web layer waits for the answers to the requests it handed to the core. When the core dies and this edge
takes the lease, those requests are still in the request stream, and the new core (this very process) applies them.
So their askers must get what the new core answered (or what the old core had answered just before), never a 503
for a request that was in fact applied: a client told 503 for a submit retries it, and runs and pays twice. A request
the new core does not apply (past its deadline) is the only one whose asker hears ``ActorGone`` (a 503), at once.

Real Redis (a private ``redis-server``), the real ``ask_core`` and ``serve_edges``; the registry is a stand-in that
records what it applied. The lease itself is not taken here: ``hold_core`` runs the edge term, cancels it, then runs
the core term, which is what these tests do by hand.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from _redis_server import RedisServer

from actors import registry as reg
from actors._util import ActorGone, ask, reply_once
from actors.bridge import Handover, ask_core, serve_edges
from actors.store import RedisStore, open_store

EDGE = "edge-1"
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {}}}


@asynccontextmanager
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    redis_server.flush()
    async with open_store(redis_server.url()) as store:
        assert isinstance(store, RedisStore)
        yield store


async def fake_registry(inbox: trio.MemoryReceiveChannel[Any], applied: list[reg.Submit]) -> None:
    """The core's registry as far as a submit goes: it applies a submit (records it) and accepts it; a repeated task
    id gets that task again, unapplied (as the registry answers an edge's repeated request)."""
    async for msg in inbox:
        if all(s.task_id != msg.task_id for s in applied):
            applied.append(msg)
        reply_once(msg.reply, reg.Accepted(msg.task_id, 1, 1))


async def submit(front: trio.MemorySendChannel[Any], results: list[Any]) -> None:
    """A web handler's ask; what it got (an answer, or the ActorGone a 503 is made of) goes to ``results``."""
    try:
        results.append(await ask(front, lambda r: reg.Submit("alice", "c1", WORKFLOW, 1, r), name="registry"))
    except ActorGone as exc:
        results.append(exc)


async def handed_to_redis(store: RedisStore, key: str) -> None:
    """Until the stream ``key`` holds an entry (a blocking XREAD: woken by the write, no polling)."""
    with trio.fail_after(10):
        while not await store.client.xread({key: "0-0"}, count=1, block=1000):
            pass


def registry_in(process: trio.Nursery, applied: list[reg.Submit]) -> trio.MemorySendChannel[Any]:
    """The core's registry inbox (a ``fake_registry`` running in ``process``)."""
    reg_tx, reg_rx = trio.open_memory_channel[Any](8)
    process.start_soon(fake_registry, reg_rx, applied)
    return reg_tx


async def answered(results: list[Any]) -> None:
    with trio.fail_after(10):
        while not results:  # the asker is woken by Redis I/O, which wait_all_tasks_blocked cannot see
            await trio.sleep(0.01)


async def run_edge_term(
    store: RedisStore,
    handover: Handover,
    process: trio.Nursery,
    results: list[Any],
    wall_clock: Callable[[], float] | None = None,
) -> None:
    """An edge term: its web layer (a task of the process, which outlives the term) submits once; once the request
    is in Redis the term ends, as ``hold_core`` ends it when the lease is ours: its nursery is cancelled."""
    front_tx, front_rx = trio.open_memory_channel[Any](8)
    extra = {"wall_clock": wall_clock} if wall_clock is not None else {}
    async with trio.open_nursery() as edge:
        await edge.start(partial(ask_core, store, EDGE, {"registry": front_rx}, handover=handover, **extra))
        process.start_soon(submit, front_tx, results)
        await handed_to_redis(store, store.prefix + "req")
        edge.cancel_scope.cancel()


async def test_an_answer_the_old_core_wrote_as_the_edge_term_ended_still_reaches_its_asker(
    redis_server: RedisServer,
) -> None:
    """The old core answered just before it died, but the edge term ended before it read that answer: the new core
    (this process) finds it in the edge's answer stream and hands it over; nothing is applied a second time."""
    results: list[Any] = []
    applied: list[reg.Submit] = []
    async with redis_store(redis_server) as store, trio.open_nursery() as process:
        handover = Handover(EDGE)
        await run_edge_term(store, handover, process, results)
        await trio.testing.wait_all_tasks_blocked()
        assert not results
        reg_tx = registry_in(process, applied)
        async with trio.open_nursery() as old_core:  # another process's core term: it answers, then dies
            await old_core.start(partial(serve_edges, store, {"registry": reg_tx}))
            await handed_to_redis(store, store.prefix + "rep:" + EDGE)
            with trio.fail_after(10):  # and acknowledged: the new core will not read the request again
                while (await store.client.xpending(store.prefix + "req", "core")).pending:
                    await trio.sleep(0.01)
            old_core.cancel_scope.cancel()
        assert not results and len(applied) == 1
        await process.start(partial(serve_edges, store, {"registry": reg_tx}, handover=handover))
        await answered(results)
        process.cancel_scope.cancel()
    [got] = results
    assert isinstance(got, reg.Accepted), got
    assert [s.task_id for s in applied] == [got.task_id]  # once


@pytest.mark.parametrize("late", [False, True], ids=["in-time", "past-deadline"])
async def test_an_edge_that_becomes_the_core_answers_its_waiting_request_itself(
    redis_server: RedisServer, late: bool
) -> None:
    """The core died with this edge's submit unread; the edge becomes the core and applies it: the asker gets the
    task it created (not a 503), applied once. Only a request that waited past its deadline is dropped unapplied,
    and its asker told at once (ActorGone: a 503)."""
    results: list[Any] = []
    applied: list[reg.Submit] = []
    now = [1000.0]
    async with redis_store(redis_server) as store, trio.open_nursery() as process:
        handover = Handover(EDGE)
        await run_edge_term(store, handover, process, results, lambda: now[0])
        await trio.testing.wait_all_tasks_blocked()
        assert not results  # the edge term's end did not answer it 503
        if late:
            now[0] += 60.0  # the lease took long to pass: the request's deadline is gone
        reg_tx = registry_in(process, applied)
        await process.start(
            partial(serve_edges, store, {"registry": reg_tx}, handover=handover, wall_clock=lambda: now[0])
        )
        await answered(results)
        process.cancel_scope.cancel()
    [got] = results
    if late:
        assert isinstance(got, ActorGone) and not applied
    else:
        assert isinstance(got, reg.Accepted) and [s.task_id for s in applied] == [got.task_id]


async def test_without_a_next_term_the_waiting_askers_hear_at_once(redis_server: RedisServer) -> None:
    """A process that stops (no handover given, as before this change) tells whoever still waits at once."""
    results: list[Any] = []
    async with redis_store(redis_server) as store:
        front_tx, front_rx = trio.open_memory_channel[Any](8)
        async with trio.open_nursery() as process:
            async with trio.open_nursery() as edge:
                await edge.start(partial(ask_core, store, EDGE, {"registry": front_rx}))
                process.start_soon(submit, front_tx, results)
                await handed_to_redis(store, store.prefix + "req")
                edge.cancel_scope.cancel()
            await answered(results)
    [got] = results
    assert isinstance(got, ActorGone)
