"""The scheduler alone, through its channels: fair round-robin, the in-flight limit, least-loaded backend."""

from __future__ import annotations

import functools
from typing import Any

import trio
import trio.testing

from actors import scheduler as sched
from actors._util import ask
from actors.comfy import SubmitPrompt


async def drain(rx: trio.MemoryReceiveChannel[Any]) -> list[str]:
    await trio.testing.wait_all_tasks_blocked()
    out = []
    while True:
        try:
            msg = rx.receive_nowait()
        except trio.WouldBlock:
            return out
        assert isinstance(msg, SubmitPrompt)
        out.append(msg.task_id)


def job(user: str, n: int) -> sched.Job:
    return sched.Job(f"{user}{n}", user, f"p-{user}{n}", {})


async def test_round_robin_one_users_batch_does_not_starve_another(nursery: trio.Nursery) -> None:
    b_tx, b_rx = trio.open_memory_channel[Any](100)
    tx, rx = trio.open_memory_channel[sched.SchedulerMsg](100)
    await nursery.start(
        lambda task_status: sched.run(rx, backends={"b0": b_tx}, max_inflight=1, task_status=task_status)
    )
    await tx.send(sched.SetBackend("b0", True))
    for i in range(1, 11):
        await tx.send(sched.Enqueue(job("A", i)))
    position = await ask(tx, lambda r: sched.Enqueue(job("B", 1), r))
    assert position == 2  # behind A2 only, not behind A2..A10
    dispatched = await drain(b_rx)
    assert dispatched == ["A1"]
    order = []
    for _ in range(3):
        await tx.send(sched.Release(dispatched[-1] if not order else order[-1]))
        order += await drain(b_rx)
    assert order[:2].count("B1") == 1  # B's single task within the next 2 dispatches
    assert order == ["A2", "B1", "A3"]


async def test_inflight_limit_and_least_loaded_backend(nursery: trio.Nursery) -> None:
    chans = {name: trio.open_memory_channel[Any](100) for name in ("b0", "b1")}
    tx, rx = trio.open_memory_channel[sched.SchedulerMsg](100)
    await nursery.start(
        lambda task_status: sched.run(
            rx, backends={n: c[0] for n, c in chans.items()}, max_inflight=2, task_status=task_status
        )
    )
    await tx.send(sched.SetBackend("b0", True))
    for i in range(6):
        await tx.send(sched.Enqueue(job("u", i)))
    assert len(await drain(chans["b0"][1])) == 2  # only b0 is up: 2 in flight, 4 waiting
    await tx.send(sched.SetBackend("b1", True))
    assert len(await drain(chans["b1"][1])) == 2
    stats = await ask(tx, lambda r: sched.GetStats(r))
    assert stats.waiting == 2 and dict(stats.inflight) == {"b0": 2, "b1": 2}
    await tx.send(sched.Release("u0"))
    assert await drain(chans["b0"][1]) == ["u4"]
    await tx.send(sched.Release("unknown-task"))  # ignored, no double release
    await tx.send(sched.SetBackend("b1", False))
    await tx.send(sched.Release("u2"))  # a permit of a down backend: nothing goes there
    assert await drain(chans["b1"][1]) == []
    withdrawn = await ask(tx, lambda r: sched.Withdraw("u5", r))
    assert withdrawn is True
    assert (await ask(tx, lambda r: sched.GetStats(r))).waiting == 0


async def test_per_user_inflight_cap_lets_others_through(nursery: trio.Nursery) -> None:
    b_tx, b_rx = trio.open_memory_channel[Any](100)
    tx, rx = trio.open_memory_channel[sched.SchedulerMsg](100)
    await nursery.start(
        lambda task_status: sched.run(
            rx, backends={"b0": b_tx}, max_inflight=3, max_inflight_per_user=1, task_status=task_status
        )
    )
    await tx.send(sched.Occupy("A0", "b0", "A"))  # reloaded at start-up: counts against A's cap too
    for i in range(1, 4):
        await tx.send(sched.Enqueue(job("A", i)))
    await tx.send(sched.Enqueue(job("B", 1)))
    await tx.send(sched.SetBackend("b0", True))
    assert await drain(b_rx) == ["B1"]  # A already has one inside ComfyUI; a free permit stays free for others
    await tx.send(sched.Release("A0"))
    assert await drain(b_rx) == ["A1"]
    await tx.send(sched.Release("B1"))
    assert await drain(b_rx) == []  # only A waits, and A is at its cap
    await tx.send(sched.Release("A1"))
    assert await drain(b_rx) == ["A2"]
    stats = await ask(tx, lambda r: sched.GetStats(r))
    assert stats.waiting == 1 and dict(stats.inflight) == {"b0": 1}


async def test_late_user_is_dispatched_within_two_dispatches_at_any_point(nursery: trio.Nursery) -> None:
    """Whenever B arrives, A's backlog delays B's single task by at most one dispatch."""
    for already in range(6):
        b_tx, b_rx = trio.open_memory_channel[Any](100)
        tx, rx = trio.open_memory_channel[sched.SchedulerMsg](100)
        async with trio.open_nursery() as inner:
            await inner.start(functools.partial(sched.run, rx, backends={"b0": b_tx}, max_inflight=1))
            await tx.send(sched.SetBackend("b0", True))
            for i in range(10):
                await tx.send(sched.Enqueue(job("A", i)))
            order = await drain(b_rx)
            for _ in range(already):
                await tx.send(sched.Release(order[-1]))
                order += await drain(b_rx)
            before = len(order)
            await tx.send(sched.Enqueue(job("B", 0)))
            for _ in range(3):
                await tx.send(sched.Release(order[-1]))
                order += await drain(b_rx)
            assert "B0" in order[before : before + 2], (already, order)
            inner.cancel_scope.cancel()
