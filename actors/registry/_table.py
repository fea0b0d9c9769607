"""The registry's live tasks, indexed so that no event's work grows with the number of live tasks.

DESIGN says no single user may slow the others, and the registry handles every user's events in one loop: what
it computes per event must cost O(1) or O(that user's tasks), never O(every live task). Per event it needs the
counts by state (the ``status`` broadcast after each state change, ``GetStats``), a user's queued count (the
per-user cap on submit), a user's live tasks (``ListTasks``), and the tasks in flight on a backend (every ComfyUI
``status`` frame is cross-checked against them). ``TaskTable`` keeps the live tasks by id with those indexes.

A task's record is read-only outside this module: ``TaskTable.set_record`` is the one way to replace it, and it
moves the task between the indexes in the same step, so they cannot drift from the records (a Hypothesis test in
``tests/test_task_table.py`` recounts them after any sequence of adds, changes and removals).
"""

from __future__ import annotations

from collections.abc import Iterator, ValuesView
from dataclasses import dataclass
from typing import Any

from ..store import TaskRecord
from ..task_machine import INFLIGHT_STATES
from ..wire import WireMessage

__all__ = ["Task", "TaskTable"]


@dataclass(slots=True)
class Task:
    """The registry's live view of one non-terminal task (it owns these; others get copies). ``rec`` is replaced
    only through ``TaskTable.set_record``."""

    _rec: TaskRecord
    cancelling: bool = False
    timed_out: bool = False
    gap: bool = False  # its backend's socket was down while it was in flight: live events may be missing
    seen: bool = False  # an event of its prompt arrived on the socket: later `status` frames know of it
    submitted_at: float = float("-inf")  # trio time it was marked submitted
    awaiting_history: bool = False  # success seen after a gap: its outputs are read from /history first
    # messages for its user held until its "queued" announcement went out (None: announced)
    held: list[WireMessage] | None = None

    @property
    def rec(self) -> TaskRecord:
        return self._rec

    @property
    def id(self) -> str:
        return self._rec.task_id


class TaskTable:
    """The live tasks by id (read like a dict), with counts by state and by (user, state), each user's tasks, and
    each backend's tasks in flight. Every index entry follows from the task's current record:

    - ``count(s) == #{t | t.rec.state == s}``, ``count(s, u) == #{t | t.rec.user_id == u and t.rec.state == s}``;
    - ``of_user(u)`` holds exactly the tasks with ``t.rec.user_id == u``, in the table's order;
    - ``inflight_on(b)`` holds exactly the tasks with ``t.rec.backend == b`` and an in-flight state, in the table's
      order (a task's place is when it was added);
    - no zero count and no empty user or backend entry is kept, so a table that emptied holds nothing.
    """

    __slots__ = ("_added", "_by_user", "_counts", "_inflight", "_order", "_tasks", "_user_counts")

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._order: dict[str, int] = {}  # task id -> when it was added (inflight_on keeps the table's order)
        self._added = 0
        self._counts: dict[str, int] = {}  # state -> live tasks in it (a StrEnum state is its string)
        self._user_counts: dict[tuple[str, str], int] = {}  # (user, state) -> that user's live tasks in it
        self._by_user: dict[str, dict[str, Task]] = {}  # user -> their live tasks by id
        self._inflight: dict[str, dict[str, Task]] = {}  # backend -> its tasks in INFLIGHT_STATES by id

    def __repr__(self) -> str:
        return f"<TaskTable {len(self._tasks)} tasks, {len(self._by_user)} users, by state {self._counts}>"

    # -- reading it like a dict

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def __getitem__(self, task_id: str) -> Task:
        return self._tasks[task_id]

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def values(self) -> ValuesView[Task]:
        return self._tasks.values()

    # -- the indexes

    def count(self, state: str, user_id: str | None = None) -> int:
        """Live tasks in ``state`` (of ``user_id`` only, if given). O(1)."""
        if user_id is None:
            return self._counts.get(state, 0)
        return self._user_counts.get((user_id, state), 0)

    def counts(self) -> dict[str, int]:
        """Live tasks by state, for the states that have any. O(number of states)."""
        return dict(self._counts)

    def of_user(self, user_id: str) -> list[Task]:
        """The user's live tasks, in the table's order. O(that user's tasks)."""
        mine = self._by_user.get(user_id)
        return list(mine.values()) if mine is not None else []

    def inflight_on(self, backend: str) -> list[Task]:
        """The tasks in flight (submitted or running) on ``backend``, in the table's order. O(k log k) for its k."""
        mine = self._inflight.get(backend)
        return sorted(mine.values(), key=lambda t: self._order[t.id]) if mine is not None else []

    # -- changing it: add, set_record and remove are the only writers of the tasks and of their records

    def add(self, task: Task) -> None:
        task_id = task.id
        if task_id in self._tasks:
            raise ValueError(f"task {task_id!r} is live already")
        self._tasks[task_id] = task
        self._order[task_id] = self._added
        self._added += 1
        self._by_user.setdefault(task.rec.user_id, {})[task_id] = task
        self._enter(task)

    def remove(self, task_id: str) -> Task | None:
        """Forget a live task (None if it is not live); it keeps its record for whoever still holds it."""
        task = self._tasks.pop(task_id, None)
        if task is not None:
            del self._order[task_id]
            _drop(self._by_user, task.rec.user_id, task_id)
            self._leave(task)
        return task

    def set_record(self, task: Task, rec: TaskRecord) -> None:
        """Replace the task's record (same task, same user), and move it between the indexes if it is live. A task
        that ended (removed) may still be given a record: it is no longer counted."""
        if rec.task_id != task.id or rec.user_id != task.rec.user_id:
            raise ValueError(
                f"task {task.id!r} of {task.rec.user_id!r} given the record of {rec.task_id!r} of {rec.user_id!r}"
            )
        if self._tasks.get(task.id) is not task:
            task._rec = rec
            return
        self._leave(task)
        task._rec = rec
        self._enter(task)

    def _enter(self, task: Task) -> None:
        """Count the task under its record's state, user and backend."""
        rec = task.rec
        _add(self._counts, rec.state, 1)
        _add(self._user_counts, (rec.user_id, rec.state), 1)
        if rec.backend is not None and rec.state in INFLIGHT_STATES:
            self._inflight.setdefault(rec.backend, {})[rec.task_id] = task

    def _leave(self, task: Task) -> None:
        """Undo ``_enter`` for the task's (unchanged) record."""
        rec = task.rec
        _add(self._counts, rec.state, -1)
        _add(self._user_counts, (rec.user_id, rec.state), -1)
        if rec.backend is not None and rec.state in INFLIGHT_STATES:
            _drop(self._inflight, rec.backend, rec.task_id)


def _add(counts: dict[Any, int], key: Any, n: int) -> None:
    left = counts.get(key, 0) + n
    assert left >= 0, f"count of {key!r} below zero"
    if left:
        counts[key] = left
    else:
        del counts[key]


def _drop(groups: dict[str, dict[str, Task]], group: str, task_id: str) -> None:
    members = groups[group]
    del members[task_id]
    if not members:
        del groups[group]
