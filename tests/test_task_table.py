"""The registry's task table: whatever tasks were added, had their records replaced, or were removed, its counts
by state and by user, each user's tasks and each backend's tasks in flight are what a recount of the live tasks
gives, in the order the tasks were added; and a table that emptied holds nothing."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.registry._table import Task, TaskTable
from actors.store import TaskRecord
from actors.task_machine import INFLIGHT_STATES, State

USERS = ("ann", "bob", "cid")
BACKENDS = (None, "b0", "b1")
states = st.sampled_from(list(State))  # terminal ones too: a finishing task is saved before it is removed
backends = st.sampled_from(BACKENDS)


def record(task_id: str, user: str, state: str = State.QUEUED, backend: str | None = None) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        seq=int(task_id[1:]),
        user_id=user,
        client_id="c1",
        prompt_id=f"p-{task_id}",
        state=state,
        size=1,
        cost=1,
        workflow={},
        created_at=0.0,
        updated_at=0.0,
        backend=backend,
    )


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = TaskTable()
        self.live: dict[str, Task] = {}  # the model: live tasks in the order they were added
        self.ended: list[Task] = []
        self.ids = itertools.count()

    @rule(user=st.sampled_from(USERS), state=states, backend=backends)
    def add(self, user: str, state: str, backend: str | None) -> None:
        task = Task(record(f"t{next(self.ids)}", user, state, backend))
        self.table.add(task)
        self.live[task.id] = task

    @precondition(lambda self: self.live)
    @rule(data=st.data(), state=states, backend=backends)
    def change(self, data: st.DataObject, state: str, backend: str | None) -> None:
        task = data.draw(st.sampled_from(list(self.live.values())))
        self.table.set_record(task, replace(task.rec, state=state, backend=backend, updated_at=task.rec.updated_at + 1))
        assert task.rec.state == state and task.rec.backend == backend

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        task = self.live.pop(data.draw(st.sampled_from(list(self.live))))
        assert self.table.remove(task.id) is task
        assert task.id not in self.table and self.table.get(task.id) is None
        self.ended.append(task)

    @precondition(lambda self: self.ended)
    @rule(data=st.data(), state=states)
    def change_an_ended_task(self, data: st.DataObject, state: str) -> None:
        """A finished task is still told its outcome (its record replaced): the table does not count it again."""
        task = data.draw(st.sampled_from(self.ended))
        self.table.set_record(task, replace(task.rec, state=state, backend="b0"))
        assert task.rec.state == state and self.table.get(task.id) is not task

    @precondition(lambda self: any(t.id not in self.live for t in self.ended))
    @rule(data=st.data(), state=states)
    def add_again_under_an_ended_id(self, data: st.DataObject, state: str) -> None:
        """An id may come back as a new task once the old one is gone; the old object's records are not its."""
        old = data.draw(st.sampled_from([t for t in self.ended if t.id not in self.live]))
        task = Task(record(old.id, old.rec.user_id, state))
        self.table.add(task)
        self.live[task.id] = task

    @rule()
    def remove_an_unknown_task(self) -> None:
        assert self.table.remove("nobody") is None

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def refused(self, data: st.DataObject) -> None:
        """A second task under a live id, another task's record, or another user's: refused, nothing changes."""
        task = data.draw(st.sampled_from(list(self.live.values())))
        before = task.rec
        with pytest.raises(ValueError, match="live already"):
            self.table.add(Task(record(task.id, "ann")))
        with pytest.raises(ValueError, match="given the record"):
            self.table.set_record(task, replace(before, task_id="t999999"))
        other = next(u for u in USERS if u != before.user_id)
        with pytest.raises(ValueError, match="given the record"):
            self.table.set_record(task, replace(before, user_id=other))
        assert task.rec is before and self.table[task.id] is task

    @invariant()
    def indexes_are_a_recount(self) -> None:
        live = list(self.live.values())
        table = self.table
        assert list(table) == list(self.live) and list(table.values()) == live and len(table) == len(live)
        for state in State:
            assert table.count(state) == sum(1 for t in live if t.rec.state == state)
            for user in USERS:
                assert table.count(state, user) == sum(1 for t in live if (t.rec.user_id, t.rec.state) == (user, state))
        recount = {s: n for s in State if (n := sum(1 for t in live if t.rec.state == s))}
        assert table.counts() == recount
        for user in USERS:
            assert table.of_user(user) == [t for t in live if t.rec.user_id == user]
        for backend in BACKENDS[1:]:
            want = [t for t in live if t.rec.backend == backend and t.rec.state in INFLIGHT_STATES]
            assert table.inflight_on(backend) == want

    @invariant()
    def nothing_is_kept_for_what_is_gone(self) -> None:
        live = list(self.live.values())
        table = self.table
        assert set(table._by_user) == {t.rec.user_id for t in live}
        assert set(table._counts) == {t.rec.state for t in live}
        assert set(table._user_counts) == {(t.rec.user_id, t.rec.state) for t in live}
        assert set(table._inflight) == {t.rec.backend for t in live if t.rec.state in INFLIGHT_STATES and t.rec.backend}
        assert set(table._order) == set(self.live)


TestTaskTable = TableMachine.TestCase
