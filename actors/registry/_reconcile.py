"""Reconciliation: finding out from ComfyUI what happened to prompts while we were not listening.

CheckPrompts (/queue, then /history/{id}) runs after every (re)connect and start-up, when a cancelled or timed-out
prompt should have stopped, and when ComfyUI's ``status.queue_remaining`` is lower than the number of our prompts it
must hold. A task whose prompt was in flight while the socket was down (``gap``) takes its outputs from /history even
when its ``execution_success`` arrives live (its ``executed`` may have been missed); the history entry is written
after the terminal event, so it is read on the idle ``executing``. Queued tasks reloaded at start-up are asked of
every backend before they are dispatched (never submit one prompt twice). A backend unreachable for
``backend_lost_after`` seconds has its in-flight tasks failed (``backend_lost``, refunded); their prompts are
deleted/interrupted there if it ever returns.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import trio

from .. import scheduler as sched
from ..comfy import BackendLost, BackendUp, CancelPrompt, CheckPrompts, PromptLocated
from ..task_machine import Reason, State, TimerKind
from ._api import CROSS_CHECK_INTERVAL, CROSS_CHECK_SETTLE, HISTORY_RETRY_DELAY, MAX_ABANDONED, RECHECK_DELAY
from ._table import Task
from ._transitions import Transitions

__all__ = ["Reconcile"]

log = logging.getLogger(__name__)


class Reconcile(Transitions):
    def task_for_prompt(self, prompt_id: str | None) -> Task | None:
        if prompt_id is None:
            return None
        task_id = self.by_prompt.get(prompt_id)
        return self.tasks.get(task_id) if task_id is not None else None

    def abandon(self, task: Task) -> None:
        """Remember an unreachable backend's prompt we gave up on, to delete/interrupt it if the backend returns."""
        backend = task.rec.backend
        if backend is not None:
            ids = self.abandoned.setdefault(backend, set())
            if len(ids) < MAX_ABANDONED:
                ids.add(task.rec.prompt_id)

    def backend_went_away(self, backend: str) -> None:
        if backend not in self.lost_since:
            self.lost_since[backend] = trio.current_time()
            self.after(self.cfg.backend_lost_after, TimerKind.BACKEND_LOST, backend)
        for t in self.inflight_on(backend):
            t.gap = True

    def unreachable(self, backend: str) -> str:
        return f"ComfyUI backend {backend} unreachable for {self.cfg.backend_lost_after:g}s"

    def lost_too_long(self, backend: str | None) -> bool:
        since = self.lost_since.get(backend) if backend is not None else None
        return since is not None and trio.current_time() - since >= self.cfg.backend_lost_after

    async def check(self, backend: str, prompt_ids: tuple[str, ...]) -> None:
        self.last_cross_check[backend] = trio.current_time()
        await self.comfy[backend].send(CheckPrompts(prompt_ids))

    async def cross_check(self, backend: str, queue_remaining: int) -> None:
        """ComfyUI's queue_remaining counts every client's prompts, so fewer than ours in flight there means some of
        ours ended (or vanished) without us hearing of it: reconcile (soon, if one was just done)."""
        settled = trio.current_time() - CROSS_CHECK_SETTLE
        ours = sum(1 for t in self.inflight_on(backend) if t.seen or t.cancelling or t.submitted_at <= settled)
        if queue_remaining >= ours:
            return
        wait = self.last_cross_check.get(backend, float("-inf")) + CROSS_CHECK_INTERVAL - trio.current_time()
        if wait > 0:
            self.after(wait, TimerKind.RECONCILE, backend)
        else:
            log.info("registry: %s reports %d queued, we count %d of ours: reconciling", backend, queue_remaining, ours)
            await self.reconcile(backend)

    async def reconcile(self, backend: str) -> None:
        ids = tuple(t.rec.prompt_id for t in self.inflight_on(backend))
        if ids:
            log.info("registry: reconciling %d prompt(s) on %s", len(ids), backend)
            await self.check(backend, ids)

    async def apply_history(self, task: Task, backend: str, entry: Mapping[str, Any]) -> None:
        """A prompt finished while we were not listening: apply its outputs and terminal event from /history."""
        images: list[Mapping[str, Any]] = []
        for output in (entry.get("outputs") or {}).values():
            if isinstance(output, Mapping):
                images.extend(output.get("images") or ())
        await self.mark_submitted(task, backend)
        await self.add_images(task, images, backend)
        status = entry.get("status") or {}
        terminal = None
        for item in status.get("messages") or ():
            if (
                isinstance(item, (list, tuple))
                and len(item) == 2
                and item[0] in ("execution_success", "execution_error", "execution_interrupted")
            ):
                terminal = item
        success = status.get("status_str") == "success"
        kind, data = terminal if terminal else ("execution_success" if success else "execution_error", {})
        data = data if isinstance(data, Mapping) else {}
        if kind == "execution_success":
            await self.finish(task, State.SUCCEEDED, None)
        elif kind == "execution_interrupted":
            await self.interrupted(task, data.get("node_id"), data.get("node_type"))
        else:
            message = str(data.get("exception_message", "failed")).strip()  # ComfyUI ends it with "\n"
            await self.finish(
                task,
                State.FAILED,
                Reason.EXECUTION_ERROR,
                {
                    "error": f"{data.get('node_type') or 'node'} {data.get('node_id') or ''}: {message}".strip(),
                    "node_id": data.get("node_id"),
                    "node_type": data.get("node_type"),
                },
            )

    async def verify_queued(self, backend: str) -> None:
        """Ask ``backend`` about reloaded queued prompts it has not answered for yet (never submit one twice)."""
        ids = tuple(pid for pid, said_no in self.unverified.items() if backend not in said_no)
        if ids and backend in self.up:
            await self.check(backend, ids)

    async def verified(self, backend: str, prompt_id: str, where: str) -> bool:
        """Handle a CheckPrompts answer for a reloaded queued prompt. True when the usual handling should follow
        (the prompt is inside ``backend``: it now counts as submitted there and holds a permit)."""
        said_no = self.unverified.get(prompt_id)
        task = self.task_for_prompt(prompt_id)
        if said_no is None or task is None:
            self.unverified.pop(prompt_id, None)
            return task is not None
        if where in ("pending", "running", "done"):
            del self.unverified[prompt_id]
            log.info("registry: reloaded task %s was already inside %s", task.id, backend)
            await self.scheduler.send(sched.Occupy(task.id, backend, task.rec.user_id))
            return True
        if where == "unknown":
            self.after(RECHECK_DELAY, TimerKind.VERIFY, backend)
            return False
        said_no.add(backend)
        await self.release_verified()
        return False

    async def release_verified(self) -> None:
        """Dispatch (or end, if cancelled meanwhile) reloaded queued tasks that no backend has. When every backend
        that is up said "not here" but some are down, don't wait for them: dispatch under a new prompt_id, and
        have the old one deleted/interrupted on those backends when they return (never the same prompt twice)."""
        for prompt_id, said_no in list(self.unverified.items()):
            unanswered = set(self.comfy) - said_no
            if unanswered and (not self.up or unanswered & self.up):
                continue
            del self.unverified[prompt_id]
            task = self.task_for_prompt(prompt_id)
            if task is None:
                continue
            if task.cancelling:
                await self.finish(task, State.CANCELLED, None)
                continue
            if unanswered:
                for backend in unanswered:
                    self.abandoned.setdefault(backend, set()).add(prompt_id)
                self.by_prompt.pop(prompt_id, None)
                await self.save(task, prompt_id=str(uuid.uuid4()))
                self.by_prompt[task.rec.prompt_id] = task.id
                log.info(
                    "registry: reloaded task %s: %s not reachable, dispatching as prompt %s",
                    task.id,
                    sorted(unanswered),
                    task.rec.prompt_id,
                )
            rec = task.rec
            await self.scheduler.send(sched.Enqueue(sched.Job(rec.task_id, rec.user_id, rec.prompt_id, rec.workflow)))

    async def located(self, msg: PromptLocated) -> None:
        backend, prompt_id, where, history = msg.backend, msg.prompt_id, msg.where, msg.history
        if prompt_id in self.unverified and not await self.verified(backend, prompt_id, where):
            return
        task = self.task_for_prompt(prompt_id)
        if task is None:
            return
        if where == "done" and history is not None:
            await self.apply_history(task, backend, history)
        elif where == "missing":
            await self.finish_gone(task, f"ComfyUI backend {backend} lost the prompt (restarted?)")
        elif where in ("pending", "running"):
            if where == "running":
                await self.mark_running(task, backend)  # its execution_start may have been missed
            else:
                await self.mark_submitted(task, backend)
            if task.cancelling or task.timed_out:  # again: an interrupt that lands between prompts is lost
                await self.ask_backend_to_cancel(task)
            elif task.awaiting_history:  # terminal event seen, history entry not written yet
                self.after(HISTORY_RETRY_DELAY, TimerKind.CHECK, task.id)
        elif where == "unknown":
            self.after(RECHECK_DELAY, TimerKind.CHECK, task.id)

    async def backend_up(self, msg: BackendUp) -> None:
        backend = msg.backend
        self.up.add(backend)
        self.lost_since.pop(backend, None)
        await self.scheduler.send(sched.SetBackend(backend, True))
        for prompt_id in sorted(self.abandoned.pop(backend, ())):  # failed while away: must not run now
            await self.comfy[backend].send(CancelPrompt(prompt_id))
        await self.reconcile(backend)
        await self.verify_queued(backend)
        await self.broadcast_status()

    async def backend_lost(self, msg: BackendLost) -> None:
        backend = msg.backend
        self.up.discard(backend)
        self.backend_went_away(backend)
        await self.scheduler.send(sched.SetBackend(backend, False))
        await self.release_verified()
        log.warning("registry: backend %s lost: %s", backend, msg.reason)
        await self.broadcast_status()

    async def backend_lost_too_long(self, backend: str) -> None:
        """A ``backend_lost`` timer: its in-flight tasks are given up on (unless it came back meanwhile)."""
        since = self.lost_since.get(backend)
        if backend in self.up or since is None:
            return
        remaining = since + self.cfg.backend_lost_after - trio.current_time()
        if remaining > 1e-9:  # it came back and went away again meanwhile
            self.after(remaining, TimerKind.BACKEND_LOST, backend)
            return
        for said_no in self.unverified.values():  # unreachable too long: it no longer counts as a place to look
            said_no.add(backend)
        await self.release_verified()
        lost = self.inflight_on(backend)
        if lost:
            log.warning(
                "registry: %s unreachable for %.0fs: giving up on %d task(s)",
                backend,
                self.cfg.backend_lost_after,
                len(lost),
            )
        for task in lost:
            self.abandon(task)
            await self.finish_gone(task, self.unreachable(backend))
