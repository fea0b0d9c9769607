"""The SQLite store's thread (``actors/store/_thread.py``): calls run in order, those waiting together run in one turn
(group commit), each caller gets its own answer or exception, and a cancelled caller's call runs either never or
once, never twice, never lost. The thread is held with a gate call, so which calls wait together is decided by the
test, not by timing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.store import InsufficientCredits, SqliteStore
from actors.store._thread import StoreThread


class Gate:
    """A call that holds the thread until ``open()``; ``entered()`` waits until the thread is inside it."""

    def __init__(self) -> None:
        self._in = threading.Event()
        self._open = threading.Event()

    def __call__(self) -> str:
        self._in.set()
        self._open.wait()
        return "gate"

    async def entered(self) -> None:
        await trio.to_thread.run_sync(self._in.wait)

    def open(self) -> None:
        self._open.set()


async def test_calls_waiting_together_run_in_one_turn_in_order_each_with_its_own_answer() -> None:
    t = StoreThread("test")
    gate, ran, answers = Gate(), [], {}

    def call(n: int) -> int:
        ran.append(n)
        if n == 2:
            raise ValueError("two fails")
        return n * 10

    async def caller(n: int) -> None:
        try:
            answers[n] = await t.run(call, n)
        except ValueError as exc:
            answers[n] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.run, gate)
        await gate.entered()
        for n in (1, 2, 3):  # queued in this order (trio does not promise to run new tasks in start order)
            nursery.start_soon(caller, n)
            await trio.testing.wait_all_tasks_blocked()
        gate.open()
    t.close()
    assert ran == [1, 2, 3]
    assert answers[1] == 10 and answers[3] == 30  # the failing call failed only its own caller
    assert isinstance(answers[2], ValueError)
    assert (t.turns, t.calls) == (2, 4)  # the gate's turn, then the three together


async def test_a_caller_cancelled_before_its_call_started_takes_it_back() -> None:
    t = StoreThread("test")
    gate, ran = Gate(), []
    outcome: dict[str, object] = {}

    async def caller(name: str, scope: trio.CancelScope) -> None:
        with scope:
            outcome[name] = await t.run(ran.append, name)
            return
        outcome[name] = "cancelled"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.run, gate)
        await gate.entered()
        scopes = {name: trio.CancelScope() for name in "abc"}
        for name in "abc":
            nursery.start_soon(caller, name, scopes[name])
            await trio.testing.wait_all_tasks_blocked()
        scopes["b"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == {"b": "cancelled"}  # answered at once, while the thread is still held
        gate.open()
    t.close()
    assert ran == ["a", "c"]  # b never ran; a and c ran once each, in order
    assert outcome == {"a": None, "b": "cancelled", "c": None}


async def test_a_caller_cancelled_while_its_call_runs_gets_its_answer_then_the_cancellation() -> None:
    t = StoreThread("test")
    gate, seen = Gate(), []

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            seen.append(await t.run(gate))
            await trio.lowlevel.checkpoint()
            seen.append("not cancelled")  # pragma: no cover - the checkpoint raises
        seen.append("cancelled")

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        nursery.start_soon(caller, scope)
        await gate.entered()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []  # still waiting: a started call is not abandoned
        gate.open()
    t.close()
    assert seen == ["gate", "cancelled"]
    assert t.calls == 1


async def test_an_idle_thread_ends_and_the_next_call_starts_a_new_one() -> None:
    t = StoreThread("test", idle_timeout=0.0)  # ends as soon as it finds nothing to do
    for n in range(5):
        assert await t.run(lambda n=n: n + 1) == n + 1
    assert t.calls == 5


async def test_store_writes_waiting_together_all_commit_and_a_refused_one_changes_nothing(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store.account("u", 10)
        gate = Gate()
        results: dict[str, object] = {}

        async def freeze(task_id: str, amount: int) -> None:
            try:
                results[task_id] = (await store.freeze("u", task_id, amount, 10, 60.0))[1]
            except InsufficientCredits as exc:
                results[task_id] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._thread.run, gate)
            await gate.entered()
            for task_id, amount in (("t1", 3), ("t2", 50), ("t3", 4)):
                nursery.start_soon(freeze, task_id, amount)
                await trio.testing.wait_all_tasks_blocked()
            gate.open()
        assert results["t1"] is True and results["t3"] is True
        assert isinstance(results["t2"], InsufficientCredits)
        acc = await store.account("u", 10)
        assert (acc.balance, acc.frozen) == (10, 7)
        assert [(j.kind, j.task_id) for j in await store.journal("u")] == [
            ("open", None),
            ("freeze", "t1"),
            ("freeze", "t3"),
        ]
        assert await store.audit() == []
    finally:
        await store.aclose()


@pytest.mark.parametrize("cancel", ["pending", "none"])
async def test_a_cancelled_store_write_is_either_absent_or_committed_once(tmp_path: Path, cancel: str) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        gate = Gate()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._thread.run, gate)
            await gate.entered()
            scope = trio.CancelScope()

            async def freeze() -> None:
                with scope:
                    await store.freeze("u", "t1", 3, 10, 60.0)

            nursery.start_soon(freeze)
            await trio.testing.wait_all_tasks_blocked()
            if cancel == "pending":
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
            gate.open()
        hold = await store.hold("t1")
        if cancel == "pending":
            assert hold is None
        else:
            assert hold is not None and hold.amount == 3
        assert await store.audit() == []
    finally:
        await store.aclose()
