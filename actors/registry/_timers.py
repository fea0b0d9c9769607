"""What the registry does when one of its timers fires. Timers live in one heap keyed by (kind, task or backend)
(``RegistryBase.after``); the kinds are ``TimerKind``."""

from __future__ import annotations

import logging

from ..comfy import CancelPrompt
from ..task_machine import State, TimerKind
from ._api import RECHECK_DELAY, TIMEOUT_GRACE
from ._reconcile import Reconcile

__all__ = ["Timers"]

log = logging.getLogger(__name__)


class Timers(Reconcile):
    async def on_timer(self, kind: TimerKind, key: str) -> None:
        if kind.per_backend:  # the key is a backend name
            if kind == TimerKind.BACKEND_LOST:
                await self.backend_lost_too_long(key)
            elif kind == TimerKind.RECONCILE and key in self.up:
                await self.reconcile(key)
            elif kind == TimerKind.VERIFY:
                await self.verify_queued(key)
            return
        task = self.tasks.get(key)
        if task is None:
            return
        backend = task.rec.backend
        if kind == TimerKind.TIMEOUT and task.rec.state == State.RUNNING:
            log.warning("registry: task %s exceeded %ss: interrupting", key, self.cfg.task_timeout)
            task.timed_out = True
            await self.ask_backend_to_cancel(task)
            self.after(TIMEOUT_GRACE, TimerKind.TIMEOUT_GRACE, key)
        elif kind == TimerKind.TIMEOUT_GRACE:  # the interrupt was not obeyed (or not heard): give up on the prompt
            log.warning("registry: task %s ignored its interrupt for %ss: failing it", key, TIMEOUT_GRACE)
            if backend is not None and backend in self.comfy:
                await self.comfy[backend].send(CancelPrompt(task.rec.prompt_id))
            await self.finish_gone(task, "the prompt did not stop")
        elif kind == TimerKind.CANCEL:
            await self.ask_backend_to_cancel(task)
        elif kind == TimerKind.CHECK and backend is not None and backend in self.comfy:
            if backend in self.up:
                await self.check(backend, (task.rec.prompt_id,))
            elif self.lost_too_long(backend):
                self.abandon(task)
                await self.finish_gone(task, self.unreachable(backend))
            else:
                self.after(RECHECK_DELAY, TimerKind.CHECK, key)
