"""The registry alone, through its channels, under MockClock: the orders ComfyUI really produces, reconciliation,
cancel, deadlines and lost backends, in exact virtual seconds.

The registry runs with the real scheduler (pure trio) and fakes for what does I/O: an in-memory store, a ledger
that records every resolve (so "exactly one refund" is checked), and capture channels for the comfy commands and
the sessions hub. Reports from ComfyUI are written straight into the registry's inbox.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import ledger as ledger_api
from actors import registry as reg
from actors import scheduler as sched
from actors._util import ask, reply_once
from actors.comfy import (
    BackendEvent,
    BackendEvents,
    BackendLost,
    BackendUp,
    CancelPrompt,
    CheckPrompts,
    Executed,
    Executing,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    Progress,
    PromptAccepted,
    PromptLocated,
    PromptSubmitUnknown,
    Status,
    SubmitPrompt,
)
from actors.sessions import Broadcast, Publish
from actors.store import Account, TaskRecord
from actors.wire import ProgressMsg

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {}}}
IMAGES = [{"filename": "gw_00001_.png", "subfolder": "", "type": "output"}]


class MemoryStore:
    """The registry's part of the store, in memory."""

    def __init__(self, tasks: list[TaskRecord] | None = None) -> None:
        self.tasks = {t.task_id: t for t in tasks or ()}
        self.writable: trio.Event | None = None  # set to an unset Event: saves wait (a slow disk)
        self.refuse: set[tuple[str, str]] = set()  # (task id, state): that save fails once (a disk error)

    async def save_task(self, rec: TaskRecord) -> None:
        if self.writable is not None:
            await self.writable.wait()
        if (rec.task_id, rec.state) in self.refuse:
            self.refuse.discard((rec.task_id, rec.state))
            raise OSError(f"injected: disk I/O error saving {rec.task_id} as {rec.state}")
        self.tasks[rec.task_id] = rec

    async def load_active_tasks(self) -> list[TaskRecord]:
        return sorted((t for t in self.tasks.values() if t.state in reg.ACTIVE_STATES), key=lambda t: t.seq)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return self.tasks.get(task_id)

    async def list_results(self, user_id: str, limit: int, before: int | None) -> list[TaskRecord]:
        done = [
            t
            for t in self.tasks.values()
            if t.user_id == user_id and t.state not in reg.ACTIVE_STATES and (before is None or t.seq < before)
        ]
        return sorted(done, key=lambda t: -t.seq)[:limit]

    async def hold(self, task_id: str) -> None:
        return None  # the fake ledger keeps no holds here

    async def max_task_seq(self) -> int:
        return max((t.seq for t in self.tasks.values()), default=0)


@dataclass
class Harness:
    registry: trio.MemorySendChannel[Any]
    commands: trio.MemoryReceiveChannel[Any]  # what the scheduler and the registry sent to backend b0
    commands_b1: trio.MemoryReceiveChannel[Any]
    published: trio.MemoryReceiveChannel[Any]
    store: MemoryStore
    resolves: list[tuple[str, str]] = field(default_factory=list)  # (task_id, "settled" | "released")

    async def report(self, *reports: Any) -> None:
        for r in reports:
            await self.registry.send(r)

    async def event(self, event: Any, backend: str = "b0") -> None:
        await self.registry.send(BackendEvent(backend, event))

    async def submit(self, user: str = "alice") -> str:
        answer = await ask(self.registry, lambda r: reg.Submit(user, "c1", WORKFLOW, 1, r))
        assert isinstance(answer, reg.Accepted)
        return answer.task_id

    async def commands_now(self, backend: str = "b0") -> list[Any]:
        return await drain(self.commands if backend == "b0" else self.commands_b1)

    async def messages(self, *types: str) -> list[dict[str, Any]]:
        """User messages published so far (those of ``types`` if given); status broadcasts are skipped."""
        return [
            dict(msg.body)
            for msg in await drain(self.published)
            if isinstance(msg, Publish) and (not types or msg.body["type"] in types)
        ]

    async def statuses(self) -> list[dict[str, Any]]:
        """The status broadcasts published so far; user messages are skipped."""
        return [dict(msg.body) for msg in await drain(self.published) if isinstance(msg, Broadcast)]

    async def prompt_of(self, task_id: str) -> str:
        view = await ask(self.registry, lambda r: reg.GetTask("alice", task_id, r))
        assert view is not None
        return view["prompt_id"]

    async def state(self, task_id: str, user: str = "alice") -> dict[str, Any] | None:
        return await ask(self.registry, lambda r: reg.GetTask(user, task_id, r))


async def drain(rx: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    """What ``rx`` holds once every task is blocked."""
    await trio.testing.wait_all_tasks_blocked()
    out = []
    while True:
        try:
            out.append(rx.receive_nowait())
        except trio.WouldBlock:
            return out


async def fake_ledger(
    inbox: trio.MemoryReceiveChannel[Any], resolves: list[tuple[str, str]], open_: list[trio.Event] | None = None
) -> None:
    """Answers at once; with ``open_``, each answer waits until ``open_[0]`` is set (a slow ledger)."""
    async for msg in inbox:
        if open_ is not None:
            await open_[0].wait()
        match msg:
            case ledger_api.Freeze(user_id, _task_id, amount, reply):
                reply_once(reply, Account(user_id, 100, amount))
            case ledger_api.Resolve(task_id, outcome, _amount, reply):
                resolves.append((task_id, outcome))
                if reply is not None:
                    reply_once(reply, Account("alice", 100, 0))


@asynccontextmanager
async def registry(
    *,
    tasks: list[TaskRecord] | None = None,
    max_inflight: int = 2,
    up: tuple[str, ...] = ("b0",),
    ledger_open: list[trio.Event] | None = None,
    **cfg: Any,
) -> AsyncIterator[Harness]:
    reg_tx, reg_rx = trio.open_memory_channel[Any](64)
    sched_tx, sched_rx = trio.open_memory_channel[Any](64)
    ledger_tx, ledger_rx = trio.open_memory_channel[Any](64)
    hub_tx, hub_rx = trio.open_memory_channel[Any](1000)
    b0_tx, b0_rx = trio.open_memory_channel[Any](1000)
    b1_tx, b1_rx = trio.open_memory_channel[Any](1000)
    store = MemoryStore(tasks)
    h = Harness(reg_tx, b0_rx, b1_rx, hub_rx, store)
    comfy = {"b0": b0_tx, "b1": b1_tx}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_ledger, ledger_rx, h.resolves, ledger_open)
        await nursery.start(
            lambda task_status: sched.run(sched_rx, backends=comfy, max_inflight=max_inflight, task_status=task_status)
        )
        config = reg.RegistryConfig(public_url="http://gw", backend_urls={"b0": "http://c0", "b1": "http://c1"}, **cfg)
        await nursery.start(
            lambda task_status: reg.run(
                reg_rx,
                config,
                store=store,
                ledger=ledger_tx,
                scheduler=sched_tx,
                comfy=comfy,
                sessions=hub_tx,
                wall_clock=trio.current_time,
                task_status=task_status,
            )
        )
        for backend in up:
            await reg_tx.send(BackendUp(backend, 0))
        await trio.testing.wait_all_tasks_blocked()
        yield h
        nursery.cancel_scope.cancel()


async def dispatched(h: Harness, backend: str = "b0") -> list[SubmitPrompt]:
    return [c for c in await h.commands_now(backend) if isinstance(c, SubmitPrompt)]


async def accepted(h: Harness, cmd: SubmitPrompt, backend: str = "b0") -> None:
    await h.report(PromptAccepted(backend, cmd.task_id, cmd.prompt_id, 1))


def history(prompt_id: str, terminal: str = "execution_success", **data: Any) -> dict[str, Any]:
    return {
        "prompt": [1, prompt_id, {}, {}, ["9"]],
        "outputs": {"9": {"images": IMAGES}},
        "status": {
            "status_str": "success" if terminal == "execution_success" else "error",
            "completed": terminal == "execution_success",
            "messages": [["execution_start", {"prompt_id": prompt_id}], [terminal, {"prompt_id": prompt_id, **data}]],
        },
    }


# ---- the registry never waits for another actor in its loop --------------------------------------------------


async def test_a_slow_ledger_stalls_no_other_task(autojump_clock: trio.testing.MockClock) -> None:
    """While the ledger sits on a freeze and a settle, the registry goes on relaying, answering and cancelling; each
    waiting task is told its outcome, in order, once the ledger answers."""
    gate = [trio.Event()]
    gate[0].set()
    async with registry(max_inflight=1, ledger_open=gate) as h, trio.open_nursery() as nursery:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        pid = cmd.prompt_id
        await accepted(h, cmd)
        await h.event(ExecutionStart(pid))
        assert [m["type"] for m in await h.messages()] == ["queued", "started"]
        gate[0] = trio.Event()  # the ledger stops answering
        late: list[Any] = []

        async def submit_late() -> None:
            late.append(await ask(h.registry, lambda r: reg.Submit("bob", "c2", WORKFLOW, 1, r)))

        nursery.start_soon(submit_late)
        await h.event(ExecutionSuccess(pid))  # t1's settle waits for the ledger too
        await h.event(ExecutionStart("someone-elses-prompt"))
        view = await h.state(t1)  # answered although two ledger answers are outstanding
        assert view is not None and view["state"] == "succeeded"
        stats = await ask(h.registry, reg.GetStats)
        assert stats.by_state == {"queued": 0, "submitted": 0, "running": 0}  # bob's task exists once frozen
        assert await h.messages() == [] and late == []  # nobody is told before the ledger answers
        before = trio.current_time()
        await trio.sleep(30)
        gate[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == before + 30
        assert [m["type"] for m in await h.messages()] == ["completed", "queued"]
        assert len(late) == 1 and isinstance(late[0], reg.Accepted)
        assert h.resolves == [(t1, "settled")]


async def test_a_repeated_submit_while_the_first_is_being_frozen_is_the_same_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An edge that lost a submit's answer repeats it with the same request id; the registry no longer waits for
    the ledger in its loop, so the repeat can arrive before the first freeze is answered: it still gets that task."""
    gate = [trio.Event()]
    async with registry(ledger_open=gate) as h, trio.open_nursery() as nursery:
        answers: list[Any] = []

        async def submit() -> None:
            answers.append(await ask(h.registry, lambda r: reg.Submit("alice", "c1", WORKFLOW, 1, r, task_id="req-1")))

        nursery.start_soon(submit)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(submit)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == []
        gate[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert [type(a) for a in answers] == [reg.Accepted, reg.Accepted]
        assert {a.task_id for a in answers} == {"req-1"}
        assert list(h.store.tasks) == ["req-1"] and len(await dispatched(h)) == 1


async def test_images_and_results_are_served_while_the_loop_is_busy(autojump_clock: trio.testing.MockClock) -> None:
    """Store-only reads run beside the registry's loop: a slow save of one task's transition does not hold up an
    image request or a results page."""
    async with registry() as h:
        t1, t2 = await h.submit(), await h.submit()
        cmd, cmd2 = await dispatched(h)
        await accepted(h, cmd)
        await h.event(Executed(cmd.prompt_id, "9", {"images": IMAGES}))
        await h.event(ExecutionSuccess(cmd.prompt_id))
        assert [m["type"] for m in await h.messages()][-1] == "completed"
        h.store.writable = trio.Event()
        await h.event(ExecutionStart(cmd2.prompt_id))  # the loop waits on this event's save
        with trio.fail_after(1):  # answered at once (virtual time) although the loop is stuck
            where = await ask(h.registry, lambda r: reg.ImageLocation("alice", t1, 0, r))
            results, _ = await ask(h.registry, lambda r: reg.ListResults("alice", 10, None, r))
            assert await ask(h.registry, lambda r: reg.ImageLocation("bob", t1, 0, r)) is None  # owner only
        assert where is not None and where[0] == "http://c0" and where[1].filename == IMAGES[0]["filename"]
        assert [r["taskId"] for r in results] == [t1]
        assert h.store.tasks[t2].state == "queued"  # its save for "submitted" really is still waiting
        h.store.writable.set()
        assert (await h.state(t2) or {}).get("state") == "running"


# ---- the orders ComfyUI really produces -------------------------------------------------------------------------


async def test_events_before_the_submit_answer(autojump_clock: trio.testing.MockClock) -> None:
    """With an idle worker a fast prompt's whole stream can arrive before POST /prompt answers."""
    async with registry(max_inflight=1) as h:
        t1 = await h.submit()
        t2 = await h.submit()
        [cmd] = await dispatched(h)
        assert cmd.task_id == t1
        pid = cmd.prompt_id
        await h.event(ExecutionStart(pid))
        await h.event(Progress(pid, "3", 1, 2))
        await h.event(Executed(pid, "9", {"images": IMAGES}))
        await h.event(ExecutionSuccess(pid))
        await h.event(Executing(pid, None))
        await accepted(h, cmd)  # ... and only now the HTTP answer
        kinds = [m["type"] for m in await h.messages() if m.get("taskId") == t1]
        assert kinds == ["queued", "started", "progress", "imageResult", "completed"]
        assert h.resolves == [(t1, "settled")]
        [nxt] = await dispatched(h)  # the permit came back exactly once: the next task went out
        assert nxt.task_id == t2
        assert (await h.state(t1))["state"] == "succeeded"


async def test_a_failed_save_of_the_end_still_ends_the_task_and_frees_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store fails to record a task's success (a disk error): the registry's memory keeps what the store holds,
    so the task is failed (internal, its credits released) instead of being stuck "succeeded" in memory only, with
    its permit held and its credits frozen until a restart; the next user's task goes out."""
    async with registry(max_inflight=1) as h:
        t1 = await h.submit()
        t2 = await h.submit("bob")
        [cmd] = await dispatched(h)
        assert cmd.task_id == t1
        await accepted(h, cmd)
        h.store.refuse.add((t1, "succeeded"))
        await h.event(Executed(cmd.prompt_id, "9", {"images": IMAGES}))
        await h.event(ExecutionSuccess(cmd.prompt_id))
        ends = [m for m in await h.messages("completed", "execution_error") if m["taskId"] == t1]
        assert [(m["type"], m.get("reason")) for m in ends] == [("execution_error", "internal")]
        assert h.resolves == [(t1, "released")]
        assert h.store.tasks[t1].state == "failed" and (await h.state(t1))["state"] == "failed"
        [nxt] = await dispatched(h)  # the permit came back
        assert nxt.task_id == t2
        stats = await ask(h.registry, lambda r: reg.GetStats(r))
        assert sum(stats.by_state.values()) == 1  # bob's task only: none stuck in memory


async def test_a_chosen_task_id_of_another_users_task_is_never_shared_nor_overwritten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An edge chooses a submit's task id (its request id) so a repeat finds its task. If that id is another user's
    task, finished or still being frozen, the submit gets a task of its own: it is not told of the other user's
    task, and the other user's record is left as it was."""
    gate = [trio.Event()]
    async with registry(ledger_open=gate) as h:
        gate[0].set()
        t1 = await h.submit()  # alice's
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.event(ExecutionStart(cmd.prompt_id))
        await h.event(Executed(cmd.prompt_id, "9", {"images": IMAGES}))
        await h.event(ExecutionSuccess(cmd.prompt_id))
        await h.event(Executing(cmd.prompt_id, None))
        await trio.testing.wait_all_tasks_blocked()
        assert h.store.tasks[t1].state == "succeeded"
        bobs = await ask(h.registry, lambda r: reg.Submit("bob", "c9", WORKFLOW, 1, r, task_id=t1))
        assert isinstance(bobs, reg.Accepted) and bobs.task_id != t1
        assert (h.store.tasks[t1].user_id, h.store.tasks[t1].state) == ("alice", "succeeded")
        assert h.store.tasks[bobs.task_id].user_id == "bob"
        gate[0] = trio.Event()  # the ledger sits on the next freeze: alice's request "r-2" is being answered
        answers: list[Any] = []

        async def submit(user: str) -> None:
            answers.append(
                (user, await ask(h.registry, lambda r: reg.Submit(user, "c1", WORKFLOW, 1, r, task_id="r-2")))
            )

        async with trio.open_nursery() as n:
            n.start_soon(submit, "alice")
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(submit, "bob")
            await trio.testing.wait_all_tasks_blocked()
            gate[0].set()
        got = dict(answers)
        assert got["alice"].task_id == "r-2" and got["bob"].task_id != "r-2"
        assert h.store.tasks["r-2"].user_id == "alice"


async def test_a_batch_of_events_is_handled_in_order_and_a_fault_fails_only_its_task(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comfy actor reports the events of one socket read as one BackendEvents: each is handled as if it came
    alone, so a fault while handling one fails that event's task only and the rest of the batch still counts."""
    async with registry(max_inflight=2) as h:
        t1, t2 = await h.submit(), await h.submit()
        c1, c2 = await dispatched(h)
        await accepted(h, c1)
        await accepted(h, c2)
        original = reg._Registry.relay_progress

        async def relay_progress(self: Any, task: Any, *args: Any) -> None:
            if task.id == t1:
                raise KeyError("injected registry fault")
            await original(self, task, *args)

        monkeypatch.setattr(reg._Registry, "relay_progress", relay_progress)
        p1, p2 = c1.prompt_id, c2.prompt_id
        await h.report(
            BackendEvents(
                "b0",
                (ExecutionStart(p2), Progress(p1, "3", 1, 2), Progress(p2, "3", 1, 2), Progress(p2, "3", 2, 2)),
            )
        )
        progress = [(m["taskId"], m["value"]) for m in await h.messages("progress")]
        assert progress == [(t2, 1), (t2, 2)]
        assert (await h.state(t1))["state"] == "failed" and (await h.state(t2))["state"] == "running"
        assert h.resolves == [(t1, "released")]


async def test_success_after_a_gap_takes_outputs_from_history(autojump_clock: trio.testing.MockClock) -> None:
    """The socket dropped mid-run: the `executed` may be lost, so the outputs come from /history, which ComfyUI
    writes after the terminal event; the idle `executing` says it is there."""
    async with registry() as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        pid = cmd.prompt_id
        await accepted(h, cmd)
        await h.event(ExecutionStart(pid))
        await h.report(BackendLost("b0", "connection closed"), BackendUp("b0", 1))
        assert await h.commands_now() == [CheckPrompts((pid,))]
        await h.report(PromptLocated("b0", pid, "running"))
        await h.event(ExecutionSuccess(pid))
        assert await h.messages("completed") == []  # not yet: the images may be missing
        assert await h.commands_now() == []
        await h.event(Executing(pid, None))
        assert await h.commands_now() == [CheckPrompts((pid,))]
        await h.report(PromptLocated("b0", pid, "done", history(pid)))
        msgs = await h.messages("imageResult", "completed")
        assert [m["type"] for m in msgs] == ["imageResult", "completed"]
        assert msgs[-1]["urls"] == [f"http://gw/api/images/{t1}/0"]
        assert h.resolves == [(t1, "settled")]


async def test_terminal_event_before_history_entry_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    async with registry() as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        pid = cmd.prompt_id
        await accepted(h, cmd)
        await h.report(BackendLost("b0", "x"), BackendUp("b0", 1))
        await h.commands_now()
        await h.event(ExecutionSuccess(pid))
        start = trio.current_time()
        await h.report(PromptLocated("b0", pid, "running"))  # e.g. the reconnect's check, before the entry exists
        await trio.sleep(reg.HISTORY_RETRY_DELAY)
        assert await h.commands_now() == [CheckPrompts((pid,))]
        assert trio.current_time() - start == reg.HISTORY_RETRY_DELAY
        await h.report(PromptLocated("b0", pid, "done", history(pid)))
        assert [m["type"] for m in await h.messages("completed")] == ["completed"]
        assert h.resolves == [(t1, "settled")]


async def test_missed_terminal_event_applied_from_history_with_stripped_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry() as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.report(BackendLost("b0", "x"), BackendUp("b0", 0))
        assert await h.commands_now() == [CheckPrompts((cmd.prompt_id,))]
        entry = history(
            cmd.prompt_id, "execution_error", node_id="3", node_type="KSampler", exception_message="out of cheese\n"
        )
        await h.report(PromptLocated("b0", cmd.prompt_id, "done", entry))
        [err] = await h.messages("execution_error")
        assert err["error"] == "KSampler 3: out of cheese" and err["reason"] == "execution_error"
        assert err["refunded"] is True and h.resolves == [(t1, "released")]
        assert (await h.state(t1))["urls"] == [f"http://gw/api/images/{t1}/0"]


async def test_queue_remaining_below_ours_triggers_reconciliation(autojump_clock: trio.testing.MockClock) -> None:
    async with registry() as h:
        await h.submit()
        await h.submit()
        cmds = await dispatched(h)
        for cmd in cmds:
            await accepted(h, cmd)
        await h.event(Status(0))  # read right after the HTTP answers, it may predate them (the socket lags): ignored
        assert await h.commands_now() == []
        await h.event(ExecutionStart(cmds[0].prompt_id))  # statuses read after this one's events know of it
        await h.event(Status(1))  # agrees: nothing to do
        assert await h.commands_now() == []
        await h.event(Status(0))  # that one ended without a terminal event reaching us
        assert await h.commands_now() == [CheckPrompts(tuple(c.prompt_id for c in cmds))]
        await h.event(Status(0))  # again within CROSS_CHECK_INTERVAL: deferred, not repeated at once
        assert await h.commands_now() == []
        await trio.sleep(reg.CROSS_CHECK_INTERVAL)
        assert await h.commands_now() == [CheckPrompts(tuple(c.prompt_id for c in cmds))]
        await h.report(*(PromptLocated("b0", c.prompt_id, "missing") for c in cmds))
        assert [m["reason"] for m in await h.messages("execution_error")] == ["backend_lost", "backend_lost"]
        assert sorted(o for _, o in h.resolves) == ["released", "released"]


async def test_unseen_prompts_count_in_the_cross_check_once_settled(autojump_clock: trio.testing.MockClock) -> None:
    async with registry() as h:
        await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await trio.sleep(reg.CROSS_CHECK_SETTLE - 0.1)
        await h.event(Status(0))
        assert await h.commands_now() == []
        await trio.sleep(0.1)  # pending behind other clients' prompts, say, and then deleted by someone else
        await h.event(Status(0))
        assert await h.commands_now() == [CheckPrompts((cmd.prompt_id,))]


async def test_submit_that_timed_out_is_reconciled_never_resubmitted(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(max_inflight=1) as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        await h.report(PromptSubmitUnknown("b0", t1, cmd.prompt_id, "POST /prompt: no answer within 30s"))
        await trio.sleep(reg.RECHECK_DELAY)
        assert await h.commands_now() == [CheckPrompts((cmd.prompt_id,))]  # asked by the prompt_id we chose
        await h.report(PromptLocated("b0", cmd.prompt_id, "pending"))  # it did get there
        await h.event(ExecutionStart(cmd.prompt_id))
        await h.event(ExecutionSuccess(cmd.prompt_id))
        assert [m["type"] for m in await h.messages("completed")] == ["completed"]
        t2 = await h.submit()
        [cmd2] = await dispatched(h)
        await h.report(PromptSubmitUnknown("b0", t2, cmd2.prompt_id, "POST /prompt: ReadError"))
        await trio.sleep(reg.RECHECK_DELAY)
        assert await h.commands_now() == [CheckPrompts((cmd2.prompt_id,))]
        await h.report(PromptLocated("b0", cmd2.prompt_id, "missing"))  # it did not: lost, refunded, not retried
        [err] = await h.messages("execution_error")
        assert err["taskId"] == t2 and err["reason"] == "backend_lost"
        assert await h.commands_now() == [] and h.resolves == [(t1, "settled"), (t2, "released")]


# ---- cancel ------------------------------------------------------------------------------------------------------


async def test_cancel_in_every_state_refunds_once(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(max_inflight=2) as h:
        running, pending, queued = await h.submit(), await h.submit(), await h.submit()
        cmds = {c.task_id: c for c in await dispatched(h)}
        assert set(cmds) == {running, pending}
        for c in cmds.values():
            await accepted(h, c)
        await h.event(ExecutionStart(cmds[running].prompt_id))

        assert await ask(h.registry, lambda r: reg.Cancel("mallory", running, r)) == "not_found"
        assert await ask(h.registry, lambda r: reg.Cancel("alice", queued, r)) == "cancelled"
        assert await ask(h.registry, lambda r: reg.Cancel("alice", queued, r)) == "finished"
        assert await h.commands_now() == []  # a task still in our queue never reaches ComfyUI

        assert await ask(h.registry, lambda r: reg.Cancel("alice", pending, r)) == "cancelling"
        assert await h.commands_now() == [CancelPrompt(cmds[pending].prompt_id)]  # delete, then targeted interrupt
        await h.event(Status(1))  # ComfyUI deleted it: fewer than ours, so we ask where it went
        assert await h.commands_now() == [CheckPrompts((cmds[running].prompt_id, cmds[pending].prompt_id))]
        await h.report(
            PromptLocated("b0", cmds[running].prompt_id, "running"),
            PromptLocated("b0", cmds[pending].prompt_id, "missing"),
        )

        assert await ask(h.registry, lambda r: reg.Cancel("alice", running, r)) == "cancelling"
        assert await h.commands_now() == [CancelPrompt(cmds[running].prompt_id)]
        await h.event(ExecutionInterrupted(cmds[running].prompt_id, "3", "KSampler"))
        cancelled = await h.messages("cancelled")
        assert [(m["taskId"], m["refunded"]) for m in cancelled] == [(queued, True), (pending, True), (running, True)]
        assert sorted(h.resolves) == sorted([(queued, "released"), (pending, "released"), (running, "released")])
        assert await ask(h.registry, lambda r: reg.Cancel("alice", running, r)) == "finished"


async def test_cancel_repeats_the_interrupt_until_the_prompt_stops(autojump_clock: trio.testing.MockClock) -> None:
    async with registry() as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.event(ExecutionStart(cmd.prompt_id))
        await ask(h.registry, lambda r: reg.Cancel("alice", t1, r))
        assert await h.commands_now() == [CancelPrompt(cmd.prompt_id)]
        await trio.sleep(reg.CANCEL_CHECK_DELAY)
        assert await h.commands_now() == [CheckPrompts((cmd.prompt_id,))]
        await h.report(PromptLocated("b0", cmd.prompt_id, "running"))  # the interrupt landed between two prompts
        assert await h.commands_now() == [CancelPrompt(cmd.prompt_id)]
        await h.report(PromptLocated("b0", cmd.prompt_id, "done", history(cmd.prompt_id, "execution_interrupted")))
        assert [m["type"] for m in await h.messages("cancelled", "completed")] == ["cancelled"]
        assert h.resolves == [(t1, "released")]


# ---- deadlines ----------------------------------------------------------------------------------------------------


async def test_deadline_interrupts_then_fails_as_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(task_timeout=60.0) as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await trio.sleep(5)
        await h.event(ExecutionStart(cmd.prompt_id))  # the deadline counts from execution, not from queueing
        await trio.sleep(59.9)
        assert await h.commands_now() == []
        await trio.sleep(0.1)
        assert await h.commands_now() == [CancelPrompt(cmd.prompt_id)]  # delete + interrupt of that prompt only
        await h.event(ExecutionInterrupted(cmd.prompt_id, "3", "KSampler"))
        [err] = await h.messages("execution_error")
        assert err["reason"] == "timeout" and err["refunded"] is True
        assert h.resolves == [(t1, "released")]


async def test_deadline_gives_up_on_a_prompt_that_ignores_the_interrupt(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(task_timeout=60.0, max_inflight=1) as h:
        t1 = await h.submit()
        t2 = await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.event(ExecutionStart(cmd.prompt_id))
        await trio.sleep(60 + reg.TIMEOUT_GRACE)
        cmds = await h.commands_now()
        assert cmds[0] == CancelPrompt(cmd.prompt_id) and cmds[-2] == CancelPrompt(cmd.prompt_id)
        assert isinstance(cmds[-1], SubmitPrompt) and cmds[-1].task_id == t2  # its permit came back
        [err] = await h.messages("execution_error")
        assert err["taskId"] == t1 and err["reason"] == "timeout"
        assert h.resolves == [(t1, "released")]


# ---- lost backends ------------------------------------------------------------------------------------------------


async def test_backend_away_too_long_fails_in_flight_tasks_once(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(backend_lost_after=300.0, up=("b0", "b1")) as h:
        tasks = [await h.submit() for _ in range(4)]
        on = {"b0": await dispatched(h, "b0"), "b1": await dispatched(h, "b1")}
        assert len(on["b0"]) == 2 and len(on["b1"]) == 2  # spread over both
        for backend, cmds in on.items():
            for c in cmds:
                await accepted(h, c, backend)
        await trio.sleep(10)
        await h.report(BackendLost("b1", "connection closed"))
        late = await h.submit()
        assert await dispatched(h, "b1") == []
        await trio.sleep(299)
        assert await h.messages("execution_error") == []
        await trio.sleep(1)
        errs = await h.messages("execution_error")
        assert sorted(m["taskId"] for m in errs) == sorted(c.task_id for c in on["b1"])
        assert {m["reason"] for m in errs} == {"backend_lost"} and all(m["refunded"] for m in errs)
        assert sorted(h.resolves) == sorted((c.task_id, "released") for c in on["b1"])
        # it comes back: the prompts we gave up on are deleted/interrupted there, never run for nothing
        await h.report(BackendUp("b1", 2))
        cmds = await h.commands_now("b1")
        assert sorted(c.prompt_id for c in cmds if isinstance(c, CancelPrompt)) == sorted(c.prompt_id for c in on["b1"])
        assert [c.task_id for c in cmds if isinstance(c, SubmitPrompt)] == [late]
        assert len(tasks) == 4


async def test_backend_back_in_time_is_reconciled(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(backend_lost_after=300.0) as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.report(BackendLost("b0", "x"))
        await trio.sleep(200)
        await h.report(BackendUp("b0", 0))
        assert await h.commands_now() == [CheckPrompts((cmd.prompt_id,))]
        await h.report(PromptLocated("b0", cmd.prompt_id, "done", history(cmd.prompt_id)))
        [done] = await h.messages("completed")
        assert done["urls"] == [f"http://gw/api/images/{t1}/0"]
        await h.report(BackendLost("b0", "x"))
        await trio.sleep(1000)
        assert await h.messages("execution_error") == [] and h.resolves == [(t1, "settled")]


def record(task_id: str, state: str, backend: str | None, updated_at: float = 0.0) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        seq=int(task_id[1:]),
        user_id="alice",
        client_id="c1",
        prompt_id=f"p-{task_id}",
        state=state,
        size=1,
        cost=1,
        workflow=WORKFLOW,
        created_at=0.0,
        updated_at=updated_at,
        backend=backend,
    )


async def test_start_up_reconciles_and_fails_what_never_comes_back(autojump_clock: trio.testing.MockClock) -> None:
    tasks = [record("t1", "running", "b0"), record("t2", "submitted", "b1"), record("t3", "queued", None)]
    async with registry(tasks=tasks, backend_lost_after=120.0, up=("b0",)) as h:
        cmds = await h.commands_now("b0")
        assert CheckPrompts(("p-t1",)) in cmds  # b0 came up: where is the prompt we left there?
        assert CheckPrompts(("p-t3",)) in cmds  # and is the reloaded queued one perhaps inside it already?
        assert not [c for c in cmds if isinstance(c, SubmitPrompt)]  # not before b0 answered
        await h.report(PromptLocated("b0", "p-t3", "missing"))
        [sub] = [c for c in await h.commands_now("b0") if isinstance(c, SubmitPrompt)]  # t1 holds the other permit
        # b1 (down) could not say: t3 goes out under a new prompt_id, the old one is cancelled on b1's return
        assert sub.task_id == "t3" and sub.prompt_id != "p-t3" and h.store.tasks["t3"].prompt_id == sub.prompt_id
        await h.report(PromptLocated("b0", "p-t1", "running"))
        await trio.sleep(120)  # b1 never connects
        [err] = await h.messages("execution_error")
        assert err["taskId"] == "t2" and err["reason"] == "backend_lost" and h.resolves == [("t2", "released")]
        assert h.store.tasks["t1"].state == "running"


async def test_reloaded_queued_task_found_inside_comfyui_is_not_submitted_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # killed after ComfyUI accepted t1 but before "submitted" was stored: it must not run twice
    async with registry(tasks=[record("t1", "queued", None)]) as h:
        assert await h.commands_now() == [CheckPrompts(("p-t1",))]
        await h.report(PromptLocated("b0", "p-t1", "pending"))
        assert await h.commands_now() == []  # no SubmitPrompt
        assert h.store.tasks["t1"].state == "submitted" and h.store.tasks["t1"].backend == "b0"
        assert h.store.tasks["t1"].prompt_id == "p-t1"


async def test_reloaded_running_task_keeps_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    # updated 100 s "ago" (the wall clock here is trio's): 60 s of its 160 s deadline are left
    start = trio.current_time()
    tasks = [record("t1", "running", "b0", updated_at=start - 100)]
    async with registry(tasks=tasks, task_timeout=160.0) as h:
        assert await h.commands_now() == [CheckPrompts(("p-t1",))]
        await h.report(PromptLocated("b0", "p-t1", "running"))
        await trio.sleep(start + 59.9 - trio.current_time())
        assert await h.commands_now() == []
        await trio.sleep(0.1)
        assert await h.commands_now() == [CancelPrompt("p-t1")]


async def test_cancel_on_an_unreachable_backend_ends_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(backend_lost_after=30.0) as h:
        t1 = await h.submit()
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.report(BackendLost("b0", "x"))
        assert await ask(h.registry, lambda r: reg.Cancel("alice", t1, r)) == "cancelling"
        await trio.sleep(30)
        [msg] = await h.messages("cancelled", "execution_error")
        assert msg["type"] == "cancelled" and msg["refunded"] is True and h.resolves == [(t1, "released")]


# ---- the progress short cut is the general path ---------------------------------------------------------------------

_KINDS = ["start", "progress", "progress", "progress", "executed", "success", "interrupted", "idle", "status"]


def _event(kind: str, pid: str | None, n: int) -> Any:
    if kind == "start":
        return ExecutionStart(pid) if pid is not None else Status(n)
    if kind == "progress":
        return Progress(pid, str(n) if n % 2 else None, n, 3)
    if kind == "executed":
        return Executed(pid, "9", {"images": IMAGES}) if pid is not None else Status(n)
    if kind == "success":
        return ExecutionSuccess(pid) if pid is not None else Status(n)
    if kind == "interrupted":
        return ExecutionInterrupted(pid, "3", "KSampler") if pid is not None else Status(n)
    if kind == "idle":
        return Executing(pid, None)
    return Status(n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(
        st.tuples(st.sampled_from(_KINDS), st.sampled_from([0, 1, 2, None]), st.integers(0, 3)), max_size=14
    ),
    accept=st.sampled_from([(), (0,), (0, 1)]),
    batches=st.integers(1, 3),
)
def test_the_progress_short_cut_is_the_general_path(
    script: list[tuple[str, int | None, int]], accept: tuple[int, ...], batches: int
) -> None:
    """``on_event`` handles progress without the general match, and ``relay_progress`` skips ``mark_running`` for a
    running task: for any order of events (progress of unknown prompts, before the submit's answer, before
    ``execution_start``, after the end), what the users get, the tasks' states and the ledger's resolves are those of
    the general path (``on_event_general`` and the unconditional ``mark_running``)."""

    async def reference_relay(self: Any, task: Any, backend: str, value: int, mx: int, node: str | None) -> None:
        await self.mark_running(task, backend)
        await self.publish(task, ProgressMsg(task.id, task.rec.prompt_id, value, mx, node))

    def play(general: bool) -> Any:
        async def main() -> Any:
            with pytest.MonkeyPatch.context() as patch:
                if general:
                    patch.setattr(reg._Registry, "on_event", reg._Registry.on_event_general)
                    patch.setattr(reg._Registry, "relay_progress", reference_relay)
                async with registry(max_inflight=2) as h:
                    tasks = [await h.submit(), await h.submit()]
                    commands = await dispatched(h)
                    for i in accept:
                        await accepted(h, commands[i])
                    pids = [c.prompt_id for c in commands] + ["not-ours"]
                    names = {**{t: f"t{i}" for i, t in enumerate(tasks)}, **{p: f"p{i}" for i, p in enumerate(pids)}}
                    events = tuple(_event(kind, None if who is None else pids[who], n) for kind, who, n in script)
                    size = max(1, -(-len(events) // batches))
                    for start in range(0, len(events), size):
                        await h.report(BackendEvents("b0", events[start : start + size]))
                    states = [((await h.state(t)) or {}).get("state") for t in tasks]
                    later = [type(c).__name__ for c in await h.commands_now()]
                    seen = json.dumps([await h.messages(), states, h.resolves, later])
                    for real, name in names.items():  # the ids are random: compare them by their role
                        seen = seen.replace(real, name)
                    return seen

        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    assert play(general=False) == play(general=True)


# ---- what is counted: the per-user queued cap, the status broadcast, a user's list, a backend's prompts ------------


async def submit_as(h: Harness, user: str) -> reg.Accepted | reg.Refused:
    return await ask(h.registry, lambda r: reg.Submit(user, "c1", WORKFLOW, 1, r))


def status(queued: int, running: int, up: int = 1) -> dict[str, Any]:
    return {"type": "status", "queued": queued, "running": running, "backends": {"up": up, "total": 2}}


async def test_the_queued_cap_is_per_user_and_counts_only_what_waits(autojump_clock: trio.testing.MockClock) -> None:
    """A user at the cap of queued tasks is refused, another user is not; submits still being frozen count as
    queued, and a task that leaves the queue (accepted by ComfyUI, or cancelled) makes room for one more."""
    gate = [trio.Event()]
    gate[0].set()
    async with registry(max_inflight=1, max_queued_per_user=2, ledger_open=gate) as h, trio.open_nursery() as nursery:
        gate[0] = trio.Event()  # the ledger sits on alice's two freezes: they count already
        answers: list[Any] = []

        async def submit_alice() -> None:
            answers.append(await submit_as(h, "alice"))

        nursery.start_soon(submit_alice)
        nursery.start_soon(submit_alice)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == []
        refused = await submit_as(h, "alice")
        assert refused == reg.Refused("too_many_tasks", "2 tasks already queued (limit 2)")
        gate[0].set()
        await trio.testing.wait_all_tasks_blocked()
        a1, a2 = (a.task_id for a in answers if isinstance(a, reg.Accepted))
        assert await submit_as(h, "alice") == refused  # two queued now (the first is dispatched, not yet accepted)
        b1, b2 = await submit_as(h, "bob"), await submit_as(h, "bob")  # bob is not slowed by alice's cap
        assert isinstance(b1, reg.Accepted) and isinstance(b2, reg.Accepted)
        assert isinstance(await submit_as(h, "bob"), reg.Refused)
        [cmd] = await dispatched(h)
        assert cmd.task_id == a1
        await accepted(h, cmd)  # submitted: no longer queued
        a3 = await submit_as(h, "alice")
        assert isinstance(a3, reg.Accepted)
        assert await submit_as(h, "alice") == refused
        assert await ask(h.registry, lambda r: reg.Cancel("alice", a2, r)) == "cancelled"
        assert isinstance(await submit_as(h, "alice"), reg.Accepted)
        stats = await ask(h.registry, reg.GetStats)
        assert stats.by_state == {"queued": 4, "submitted": 1, "running": 0}  # alice 2, bob 2; alice's a1


async def test_the_status_broadcast_counts_every_users_tasks_once_per_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``status`` on /topic/messages: queued and running (submitted or running) over every user, sent when one of
    them changes and only then; GetStats has the same counts by state."""
    async with registry(max_inflight=1) as h:
        assert await h.statuses() == [status(0, 0)]  # b0 came up
        a1 = await h.submit("alice")
        b1 = await h.submit("bob")
        assert await h.statuses() == [status(1, 0), status(2, 0)]
        [cmd] = await dispatched(h)
        assert cmd.task_id == a1
        await accepted(h, cmd)
        await h.event(ExecutionStart(cmd.prompt_id))  # submitted -> running: the same numbers, nothing sent
        await h.event(Progress(cmd.prompt_id, "3", 1, 2))
        assert await h.statuses() == [status(1, 1)]
        assert (await ask(h.registry, reg.GetStats)).by_state == {"queued": 1, "submitted": 0, "running": 1}
        await h.event(ExecutionSuccess(cmd.prompt_id))
        [cmd] = await dispatched(h)
        assert cmd.task_id == b1
        await accepted(h, cmd)
        assert await h.statuses() == [status(1, 0), status(0, 1)]
        await h.report(BackendLost("b0", "connection closed"))
        assert await h.statuses() == [status(0, 1, up=0)]
        assert await ask(h.registry, lambda r: reg.Cancel("bob", b1, r)) == "cancelling"
        await h.report(BackendUp("b0", 0))
        await h.report(PromptLocated("b0", cmd.prompt_id, "missing"))
        assert await h.statuses() == [status(0, 1), status(0, 0)]
        assert (await ask(h.registry, reg.GetStats)).by_state == {"queued": 0, "submitted": 0, "running": 0}


async def test_a_users_list_holds_their_tasks_only_newest_first(autojump_clock: trio.testing.MockClock) -> None:
    async with registry(max_inflight=1) as h:
        mine = [await h.submit("alice") if i % 2 == 0 else await h.submit("bob") for i in range(6)]
        alice, bob = mine[0::2], mine[1::2]
        [cmd] = await dispatched(h)
        await accepted(h, cmd)
        await h.event(ExecutionSuccess(cmd.prompt_id))  # alice's first is finished: from the store
        await trio.testing.wait_all_tasks_blocked()

        async def listed(user: str, which: str, limit: int = 10, before: int | None = None) -> list[str]:
            views, _ = await ask(h.registry, lambda r: reg.ListTasks(user, which, limit, before, r))
            return [v["taskId"] for v in views]

        assert await listed("alice", "all") == alice[::-1]
        assert await listed("alice", "active") == alice[:0:-1]
        assert await listed("alice", "finished") == alice[:1]
        assert await listed("bob", "all") == bob[::-1]
        views, nxt = await ask(h.registry, lambda r: reg.ListTasks("bob", "active", 2, None, r))
        assert [v["taskId"] for v in views] == bob[:0:-1] and nxt is not None
        assert [v["position"] for v in views] == [4, 2]  # the fair queue: bob b1, alice a2, bob b2 ...
        assert await listed("bob", "active", before=nxt) == bob[:1]
        assert await listed("carol", "all") == []


async def test_a_reconcile_asks_for_a_backends_prompts_in_submit_order(autojump_clock: trio.testing.MockClock) -> None:
    """The tasks in flight on a backend are its own, in the order they were submitted, whatever order ComfyUI
    accepted them in."""
    async with registry(up=("b0", "b1")) as h:
        t1, t2, t3, t4 = [await h.submit(user) for user in ("alice", "bob", "bob", "alice")]
        on = {"b0": await dispatched(h, "b0"), "b1": await dispatched(h, "b1")}
        assert [c.task_id for c in on["b0"]] == [t1, t3] and [c.task_id for c in on["b1"]] == [t2, t4]
        for backend in ("b1", "b0"):
            for c in reversed(on[backend]):
                await accepted(h, c, backend)
        await trio.sleep(reg.CROSS_CHECK_SETTLE)
        await h.event(Status(0), "b0")
        assert await h.commands_now("b0") == [CheckPrompts(tuple(c.prompt_id for c in on["b0"]))]
        assert await h.commands_now("b1") == []
        await h.report(BackendLost("b1", "connection closed"))
        await trio.sleep(reg.RegistryConfig().backend_lost_after)
        errs = await h.messages("execution_error")
        assert [m["taskId"] for m in errs] == [t2, t4]
