"""Task transitions with their side effects: persist, tell the user, settle or release credits, free the permit.

Which transition may happen is the pure machine's word (``actors/task_machine.py``); this module does what one
implies. Ending a task asks the ledger to settle or release its hold without waiting: the terminal state is
persisted and the permit returned at once, and the user is told when the ledger's answer (refunded or not) comes
back as a message."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import trio

from .. import ledger as ledger_api
from .. import scheduler as sched
from ..comfy import CancelPrompt
from ..store import Account, ImageRef, LedgerError, TaskRecord
from ..task_machine import TERMINAL_STATES, Event, Reason, State, TimerKind, allowed, check_outcome
from ..wire import Cancelled, Completed, ExecutionErrorMsg, ImageResult, Preview, ProgressMsg, Started
from ._api import CANCEL_CHECK_DELAY, INTERNAL_ERROR, TIMEOUT_ERROR
from ._table import Task
from ._views import Views

__all__ = ["Transitions"]

log = logging.getLogger(__name__)


class Transitions(Views):
    async def mark_submitted(self, task: Task, backend: str) -> None:
        if task.rec.state == State.QUEUED:
            if backend not in self.up:  # accepted while the socket was down: its first events went nowhere
                task.gap = True
            task.submitted_at = trio.current_time()
            await self.save(task, state=State.SUBMITTED, backend=backend)
            if task.cancelling:
                await self.ask_backend_to_cancel(task)
            await self.broadcast_status()

    async def mark_running(self, task: Task, backend: str) -> None:
        await self.mark_submitted(task, backend)
        if task.rec.state == State.SUBMITTED and allowed(task.rec.state, Event.START):
            await self.save(task, state=State.RUNNING)
            self.after(self.cfg.task_timeout, TimerKind.TIMEOUT, task.id)
            await self.publish(task, Started(task.id, task.rec.prompt_id))
            await self.broadcast_status()

    async def relay_progress(self, task: Task, backend: str, value: int, mx: int, node: str | None) -> None:
        if task.rec.state != State.RUNNING:  # (for a running task mark_running changes nothing)
            await self.mark_running(task, backend)
        await self.publish(task, ProgressMsg(task.id, task.rec.prompt_id, value, mx, node))

    async def relay_preview(self, task: Task, mime: str, image: bytes) -> None:
        await self.publish(task, Preview(task.id, task.rec.prompt_id, mime, base64.b64encode(image).decode()))

    async def add_images(self, task: Task, images: list[Mapping[str, Any]], backend: str) -> None:
        known = {(i.filename, i.subfolder, i.type) for i in task.rec.images}
        new = []
        for img in images:
            if not isinstance(img, Mapping) or "filename" not in img:
                continue
            ref = ImageRef(backend, str(img["filename"]), str(img.get("subfolder", "")), str(img.get("type", "output")))
            if (ref.filename, ref.subfolder, ref.type) not in known:
                known.add((ref.filename, ref.subfolder, ref.type))
                new.append(ref)
        if not new:
            return
        first = len(task.rec.images)
        rec = await self.save(task, images=task.rec.images + tuple(new))
        urls = tuple(self.url(task.id, n) for n in range(first, len(rec.images)))
        await self.publish(task, ImageResult(task.id, rec.prompt_id, urls))

    async def finish(
        self, task: Task, state: State, reason: Reason | None, error: dict[str, Any] | None = None
    ) -> None:
        """The one way into a terminal state: persist, free the permit, settle or release, then tell the user."""
        if task.rec.state in TERMINAL_STATES:
            return  # ended already
        state = check_outcome(task.rec.state, state, reason)
        rec = await self.save(task, state=state, reason=reason, error=error)
        self.tasks.remove(task.id)
        self.by_prompt.pop(rec.prompt_id, None)
        await self.scheduler.send(sched.Release(task.id))
        outcome = "settled" if state == State.SUCCEEDED else "released"

        async def resolved(answer: Any) -> None:
            await self.resolved(task, rec, answer)

        await self.request(
            self.ledger,
            lambda r: ledger_api.Resolve(task.id, outcome, rec.cost, r),
            resolved,
            task_id=None,
            name="ledger",
        )
        await self.broadcast_status()

    async def resolved(self, task: Task, rec: TaskRecord, answer: Any) -> None:
        """The ledger's answer to a finished task's settle or release: tell the user (refunded or not)."""
        if isinstance(answer, ledger_api.LedgerFault):  # never charge what we cannot record
            log.error("registry: task %s: the ledger failed to resolve its hold: %s", task.id, answer)
            if rec.state == State.SUCCEEDED:
                rec = replace(
                    rec,
                    state=State.FAILED,
                    reason=Reason.INTERNAL,
                    error={"error": INTERNAL_ERROR},
                    updated_at=self.now(),
                )
                await self.store.save_task(rec)
                failed = rec

                async def released(again: Any) -> None:
                    if not isinstance(again, Account):  # the hold stays pending; the ledger's sweep releases it
                        log.error("registry: task %s: releasing its hold failed too: %s", task.id, again)
                    await self.tell_outcome(task, failed, isinstance(again, Account))

                await self.request(
                    self.ledger,
                    lambda r: ledger_api.Resolve(task.id, "released", rec.cost, r),
                    released,
                    task_id=None,
                    name="ledger",
                )
                return
            refunded = False
        elif isinstance(answer, LedgerError):  # e.g. the hold expired and was released already
            log.error("registry: task %s: ledger refused to resolve its hold: %s", task.id, answer)
            refunded = rec.state != State.SUCCEEDED
        elif isinstance(answer, Exception):
            raise answer  # the ledger is gone: contained (logged) by the loop
        else:
            refunded = rec.state != State.SUCCEEDED
        await self.tell_outcome(task, rec, refunded)

    async def tell_outcome(self, task: Task, rec: TaskRecord, refunded: bool) -> None:
        log.info("registry: task %s %s%s", task.id, rec.state, f" ({rec.reason})" if rec.reason else "")
        if rec.state == State.SUCCEEDED:
            await self.publish(task, Completed(task.id, rec.prompt_id, tuple(self.urls(rec))))
        elif rec.state == State.CANCELLED:
            await self.publish(task, Cancelled(task.id, refunded))
        else:
            error = rec.error or {}
            await self.publish(
                task,
                ExecutionErrorMsg(
                    task.id,
                    rec.prompt_id,
                    error.get("error", rec.reason or "failed"),
                    rec.reason or "failed",
                    refunded,
                    error.get("node_id"),
                    error.get("node_type"),
                ),
            )

    async def finish_gone(self, task: Task, detail: str) -> None:
        """The prompt is gone from ComfyUI, or its backend stayed unreachable too long: end the task by what we know."""
        if task.cancelling:
            await self.finish(task, State.CANCELLED, None)
        elif task.timed_out:
            await self.finish(task, State.FAILED, Reason.TIMEOUT, {"error": TIMEOUT_ERROR})
        elif task.awaiting_history:  # ComfyUI reported success; only outputs missed during the gap may be absent
            log.warning("registry: task %s succeeded but its history is gone: %s", task.id, detail)
            await self.finish(task, State.SUCCEEDED, None)
        else:
            await self.finish(task, State.FAILED, Reason.BACKEND_LOST, {"error": detail})

    async def interrupted(self, task: Task, node_id: str | None = None, node_type: str | None = None) -> None:
        if task.cancelling:
            await self.finish(task, State.CANCELLED, None)
        elif task.timed_out:
            await self.finish(task, State.FAILED, Reason.TIMEOUT, {"error": TIMEOUT_ERROR})
        else:
            await self.finish(
                task,
                State.FAILED,
                Reason.INTERRUPTED,
                {"error": "the prompt was interrupted on ComfyUI", "node_id": node_id, "node_type": node_type},
            )

    async def ask_backend_to_cancel(self, task: Task) -> None:
        backend = task.rec.backend
        if backend is not None and backend in self.comfy:
            await self.comfy[backend].send(CancelPrompt(task.rec.prompt_id))
            self.after(CANCEL_CHECK_DELAY, TimerKind.CHECK, task.id)
        else:  # dispatched but not yet accepted: retry once the backend is known
            self.after(CANCEL_CHECK_DELAY, TimerKind.CANCEL, task.id)
