"""The scheduler actor: a fair queue across users and one ``trio.CapacityLimiter`` per backend.

Waiting tasks sit in one deque per user; dispatch takes users round-robin, so one user's batch delays another
user's single task by at most one dispatch. Each backend has a limiter sized ``max_inflight`` (default 2: one
prompt running and one waiting inside ComfyUI, so the GPU never idles between prompts). A permit is taken
with ``acquire_on_behalf_of_nowait(task_id)`` when a task is dispatched and given back by ``Release`` on the
task's terminal event. Dispatch goes to the healthy backend with the most free permits, straight to its comfy
actor (whose command loop never blocks), so the scheduler never waits on the registry: no cycle.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ._util import reply_once
from .comfy import ComfyCommand, SubmitPrompt

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    task_id: str
    user_id: str
    prompt_id: str
    workflow: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Enqueue:
    """Queue a job; the reply (if any) is its 1-based position in dispatch order."""

    job: Job
    reply: trio.MemorySendChannel[int] | None = None


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Remove a waiting job (cancel). Replies True if it was still waiting, False if dispatched or unknown."""

    task_id: str
    reply: trio.MemorySendChannel[bool]


@dataclass(frozen=True, slots=True)
class Occupy:
    """A task already inside ComfyUI (found at start-up) holds a permit on ``backend`` until released."""

    task_id: str
    backend: str
    user_id: str = ""  # counts against this user's in-flight cap


@dataclass(frozen=True, slots=True)
class Release:
    """The task reached a terminal state: give back its permit (if it holds one)."""

    task_id: str


@dataclass(frozen=True, slots=True)
class SetBackend:
    name: str
    up: bool


@dataclass(frozen=True, slots=True)
class GetPositions:
    """The positions of several tasks at once (None for one that does not wait): one walk over the waiting users
    for all of them (a user's task list asks for up to all of its queued tasks)."""

    task_ids: tuple[str, ...]
    reply: trio.MemorySendChannel[dict[str, int | None]]


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    waiting: int
    inflight: Mapping[str, int]
    backends_up: tuple[str, ...]
    backends_total: int
    dispatched: int


@dataclass(frozen=True, slots=True)
class GetStats:
    reply: trio.MemorySendChannel[SchedulerStats]


SchedulerMsg = Enqueue | Withdraw | Occupy | Release | SetBackend | GetPositions | GetStats


class _FairQueue:
    """Per-user FIFO deques visited round-robin. Owned by the scheduler actor.

    Invariant: ``owner`` maps exactly the task ids of the jobs in the deques (a task waits at most once), so the
    number of waiting jobs is ``len(owner)``: O(1) for the dispatch loop, however many users wait."""

    def __init__(self) -> None:
        self.by_user: dict[str, deque[Job]] = {}
        self.turn: deque[str] = deque()  # users with waiting jobs, next to be served first
        self.owner: dict[str, str] = {}  # task id -> user, for every waiting job

    def __len__(self) -> int:
        return len(self.owner)

    def push(self, job: Job) -> None:
        if job.task_id in self.owner:  # a bug upstream: keep the first (one dispatch), do not crash the scheduler
            log.error("scheduler: task %s enqueued while it waits already: ignored", job.task_id)
            return
        q = self.by_user.get(job.user_id)
        if q is None:
            q = self.by_user[job.user_id] = deque()
            self.turn.append(job.user_id)
        q.append(job)
        self.owner[job.task_id] = job.user_id

    def remove(self, task_id: str) -> bool:
        user = self.owner.pop(task_id, None)
        if user is None:
            return False
        q = self.by_user[user]
        q.remove(next(job for job in q if job.task_id == task_id))
        if not q:
            self._drop_user(user)
        return True

    def pop_next(self, eligible: Any) -> Job | None:
        """The next job in round-robin order whose user passes ``eligible(user)``; that user goes last."""
        for _ in range(len(self.turn)):
            user = self.turn[0]
            if eligible(user):
                q = self.by_user[user]
                job = q.popleft()
                del self.owner[job.task_id]
                if q:
                    self.turn.rotate(-1)
                else:
                    self._drop_user(user)
                return job
            self.turn.rotate(-1)
        return None

    def position(self, task_id: str) -> int | None:
        """The 1-based place of ``task_id`` in ``order()`` (None if it does not wait), without building the order:
        before it come every user's jobs at a smaller depth in their queue, and at its own depth those of the users
        before its user in the turn (a user's first job: just the users before it)."""
        owner = self.owner.get(task_id)
        if owner is None:
            return None
        q = self.by_user[owner]
        # a user who had nothing waiting was just appended (a submit's answer): O(1) then, not a walk of the turn
        turn_index = len(self.turn) - 1 if self.turn[-1] == owner else self.turn.index(owner)
        depth = next(i for i, job in enumerate(q) if job.task_id == task_id)
        if depth == 0:
            return turn_index + 1
        lens = [len(self.by_user[u]) for u in self.turn]
        return sum(min(n, depth) for n in lens) + sum(1 for n in lens[:turn_index] if n > depth) + 1

    def positions(self, task_ids: Collection[str]) -> dict[str, int | None]:
        """``position`` of each of ``task_ids``, in O(users + asked x the longest queue) rather than O(users) each:
        how many users have queues of each length (for the jobs at smaller depths), and per user asked about, how
        many users before it in the turn have queues longer than each depth."""
        out: dict[str, int | None] = dict.fromkeys(task_ids)
        asked = [t for t in out if t in self.owner]
        if not asked:
            return out
        lens = [len(self.by_user[u]) for u in self.turn]
        longest = max(lens)
        users_with = [0] * (longest + 1)  # users_with[n]: users whose queue holds n jobs
        for n in lens:
            users_with[n] += 1
        index = {u: i for i, u in enumerate(self.turn)}
        before: dict[str, list[int]] = {}  # owner -> users_with, counted over the users before it in the turn
        for task_id in asked:
            owner = self.owner[task_id]
            depth = next(i for i, job in enumerate(self.by_user[owner]) if job.task_id == task_id)
            if owner not in before:
                counts = [0] * (longest + 1)
                for n in lens[: index[owner]]:
                    counts[n] += 1
                before[owner] = counts
            shallower = sum(k * min(n, depth) for n, k in enumerate(users_with))
            out[task_id] = shallower + sum(before[owner][depth + 1 :]) + 1
        return out

    def order(self) -> list[str]:
        """Task ids in the order they would be dispatched (ignoring per-user in-flight caps)."""
        queues = [list(self.by_user[u]) for u in self.turn]
        out: list[str] = []
        depth = 0
        while True:
            row = [q[depth].task_id for q in queues if depth < len(q)]
            if not row:
                return out
            out.extend(row)
            depth += 1

    def _drop_user(self, user: str) -> None:
        del self.by_user[user]
        self.turn.remove(user)


async def run(
    inbox: trio.MemoryReceiveChannel[SchedulerMsg],
    *,
    backends: Mapping[str, trio.MemorySendChannel[ComfyCommand]],
    max_inflight: int = 2,
    max_inflight_per_user: int = 0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``max_inflight_per_user`` = 0 means no per-user cap on prompts inside ComfyUI."""
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, not {max_inflight!r}")
    limiters = {name: trio.CapacityLimiter(max_inflight) for name in backends}
    up: set[str] = set()
    queue = _FairQueue()
    holder: dict[str, str] = {}  # task_id -> backend whose permit it holds
    user_of: dict[str, str] = {}  # task_id -> user, for tasks holding a permit
    inflight_by_user: dict[str, int] = {}
    dispatched = 0

    def eligible(user: str) -> bool:
        return max_inflight_per_user <= 0 or inflight_by_user.get(user, 0) < max_inflight_per_user

    def best_backend() -> str | None:
        best: str | None = None
        free: float = 0
        for name in backends:  # ties go to the first configured backend
            if name in up and limiters[name].available_tokens > free:
                best, free = name, limiters[name].available_tokens
        return best

    def take(task_id: str, user_id: str, backend: str) -> None:
        limiters[backend].acquire_on_behalf_of_nowait(task_id)
        holder[task_id] = backend
        user_of[task_id] = user_id
        inflight_by_user[user_id] = inflight_by_user.get(user_id, 0) + 1

    async def dispatch() -> None:
        nonlocal dispatched
        while len(queue):
            backend = best_backend()
            if backend is None:
                return
            job = queue.pop_next(eligible)
            if job is None:
                return
            take(job.task_id, job.user_id, backend)
            dispatched += 1
            log.debug("scheduler: %s -> %s (%d free)", job.task_id, backend, limiters[backend].available_tokens)
            await backends[backend].send(SubmitPrompt(job.task_id, job.prompt_id, job.workflow))

    task_status.started()
    with inbox:
        async for msg in inbox:
            match msg:
                case Enqueue(job, reply):
                    queue.push(job)
                    if reply is not None:
                        position = queue.position(job.task_id)
                        assert position is not None  # it was just pushed
                        reply_once(reply, position)
                case Withdraw(task_id, reply):
                    reply_once(reply, queue.remove(task_id))
                case Occupy(task_id, backend, user_id):
                    if backend in limiters and task_id not in holder:
                        try:
                            take(task_id, user_id, backend)
                        except trio.WouldBlock:
                            log.warning("scheduler: %s on %s found with no free permit", task_id, backend)
                case Release(task_id):
                    released = holder.pop(task_id, None)
                    if released is not None:
                        limiters[released].release_on_behalf_of(task_id)
                        user = user_of.pop(task_id)
                        inflight_by_user[user] -= 1
                        if not inflight_by_user[user]:
                            del inflight_by_user[user]
                    else:
                        queue.remove(task_id)  # ended while waiting (e.g. expired): forget it
                case SetBackend(name, is_up):
                    if name in backends:
                        (up.add if is_up else up.discard)(name)
                case GetPositions(task_ids, reply):
                    reply_once(reply, queue.positions(task_ids))
                case GetStats(reply):
                    reply_once(
                        reply,
                        SchedulerStats(
                            waiting=len(queue),
                            inflight={n: int(lim.borrowed_tokens) for n, lim in limiters.items()},
                            backends_up=tuple(n for n in backends if n in up),
                            backends_total=len(backends),
                            dispatched=dispatched,
                        ),
                    )
            await dispatch()
