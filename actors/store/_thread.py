"""``StoreThread``: the one thread that runs a SQLite store's blocking calls, with group commit.

``trio.to_thread.run_sync`` behind a ``CapacityLimiter(1)`` costs ~80 µs of CPU per call on a busy core (a thread
from the cache per call, the limiter, a wake-up of trio per call); this thread stays up and runs what callers queue,
in the order queued. Every call that is waiting when the thread wakes runs in that turn, each its own call (for the
store: its own transaction, so a failing one fails only its caller), and the turn's answers reach trio with one
wake-up. Each caller still waits for its own call's end (its commit), so durability is what each call makes it.

Cancellation is what ``to_thread.run_sync`` gives: a caller cancelled while its call has not started yet takes it
back (it never runs) and sees ``Cancelled``; once started, the call runs to its end and the caller gets its answer
(the cancellation takes effect at its next checkpoint). A call is never run twice and never lost.

The thread ends after ``idle_timeout`` seconds without work (a later call starts a new one) or at ``close()``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import outcome
import trio

__all__ = ["StoreThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_PENDING: Final = 0
_STARTED: Final = 1
_CANCELLED: Final = 2
_STOP: Final = object()  # close(): the thread ends once the calls queued before it have run


@dataclass(slots=True, eq=False)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    task: trio.lowlevel.Task
    token: trio.lowlevel.TrioToken
    state: int = _PENDING
    result: outcome.Outcome[Any] | None = None


class StoreThread:
    def __init__(self, name: str, *, idle_timeout: float = 10.0) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()  # guards each call's state and whether a thread is up
        self._queue: queue.SimpleQueue[_Call | object] | None = None  # the running thread's queue (None: no thread)
        self.turns = 0  # the thread's turns (wake-ups with work), and the calls they ran: for tests and stats
        self.calls = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the thread after every call queued before it; its result, or its exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._work, args=(self._queue,), name=self.name, daemon=True).start()
            self._queue.put(call)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if call.state == _PENDING:
                    call.state = _CANCELLED  # the thread will skip it
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED  # it runs (or ran): its answer is on its way

        return cast(T, await trio.lowlevel.wait_task_rescheduled(abort))

    def close(self) -> None:
        """End the thread once what is queued has run; call it when no call is outstanding (a later ``run`` starts a
        new thread, which must not overlap the old one's work)."""
        with self._lock:
            if self._queue is not None:
                self._queue.put(_STOP)
                self._queue = None

    # -- the thread

    def _work(self, q: queue.SimpleQueue[_Call | object]) -> None:
        while True:
            try:
                first = q.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if q.empty():  # nothing came meanwhile: end (run() starts a new thread when needed)
                        if self._queue is q:
                            self._queue = None
                        return
                continue
            batch = [first]
            while True:  # everything queued now runs in this turn
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            done: list[_Call] = []
            stop = False
            for item in batch:
                if item is _STOP:
                    stop = True
                    continue
                call = cast(_Call, item)
                with self._lock:
                    if call.state == _CANCELLED:
                        continue
                    call.state = _STARTED
                call.result = outcome.capture(call.fn, *call.args)
                done.append(call)
            if done:
                self.turns += 1
                self.calls += len(done)
                self._deliver(done)
            if stop:
                return

    @staticmethod
    def _deliver(done: list[_Call]) -> None:
        """Wake each caller with its answer: one wake-up of trio per run (normally one in all)."""
        by_token: dict[trio.lowlevel.TrioToken, list[_Call]] = {}
        for call in done:
            by_token.setdefault(call.token, []).append(call)
        for token, calls in by_token.items():
            try:
                token.run_sync_soon(_reschedule, calls)
            except trio.RunFinishedError:  # nobody is left to answer
                log.warning("store thread: %d answer(s) after their trio run ended, dropped", len(calls))


def _reschedule(calls: list[_Call]) -> None:
    for call in calls:
        assert call.result is not None
        trio.lowlevel.reschedule(call.task, call.result)
