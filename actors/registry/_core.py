"""The registry's requests and reports: submit and cancel, ComfyUI's events, start-up, and crash isolation.

Crash isolation: an exception while the registry handles a message, an answer or a timer of one task fails that
task (``internal``, refunded, logged with the task id) and the actor goes on; a read-only request that fails gets an
error answer. A task that was in flight (dispatched, or inside ComfyUI) across ``quarantine_after`` consecutive
unclean restarts without being saved once (no progress) is quarantined at start-up: failed ``internal`` and
refunded, so it can never crash-loop the process.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import trio

from .. import ledger as ledger_api
from .. import scheduler as sched
from .._util import reply_once
from ..comfy import (
    BackendEvent,
    BackendLost,
    BackendUp,
    CancelPrompt,
    ComfyReport,
    Progress,
    PromptAccepted,
    PromptFailed,
    PromptLocated,
    PromptRejected,
    PromptSubmitUnknown,
)
from ..store import Account, InsufficientCredits, LedgerError, TaskRecord
from ..task_machine import ACTIVE_STATES, INFLIGHT_STATES, Reason, State, TimerKind
from ..wire import Queued
from ._api import (
    INTERNAL_ERROR,
    MAX_BUCKETS,
    RECHECK_DELAY,
    Accepted,
    Cancel,
    GetTask,
    ImageLocation,
    ListResults,
    ListTasks,
    Refused,
    RegistryStats,
    Submit,
)
from ._base import Answer
from ._events import Events
from ._table import Task

__all__ = ["Registry"]

log = logging.getLogger(__name__)

SUBMIT_FAILED = Refused("internal", "the gateway failed on this submit; nothing was charged")


class Registry(Events):
    # -- start-up

    async def load(self) -> None:
        """Reload every non-terminal task: queued ones back into the queue in order; the rest are reconciled
        against their backend once it is connected."""
        self.seq = await self.store.max_task_seq()
        for backend in self.comfy:  # not connected yet: each backend has backend_lost_after to come up
            self.backend_went_away(backend)
        quarantined = set()
        if self.cfg.unclean_start:
            quarantined = set(await self.store.count_crash(self.cfg.quarantine_after, self.cfg.boot - 1))
        for rec in await self.store.load_active_tasks():
            if rec.task_id in quarantined:
                log.error(
                    "registry: task %s was active across %d unclean restarts without progress: quarantined "
                    "(failed internal, refunded)",
                    rec.task_id,
                    self.cfg.quarantine_after,
                )
                task = Task(rec)
                self.tasks.add(task)
                self.by_prompt[rec.prompt_id] = rec.task_id
                await self.finish(
                    task,
                    State.FAILED,
                    Reason.INTERNAL,
                    {
                        "error": "the task was in flight across repeated gateway crashes and was quarantined; "
                        "credits returned"
                    },
                )
                continue
            task = Task(rec, gap=rec.state in INFLIGHT_STATES)  # nobody listened while we were down
            self.tasks.add(task)
            self.by_prompt[rec.prompt_id] = rec.task_id
            if rec.state == State.QUEUED:
                self.unverified[rec.prompt_id] = set()  # asked of every backend once it is up (verify_queued)
            elif rec.backend is not None and rec.backend in self.comfy:
                await self.scheduler.send(sched.Occupy(rec.task_id, rec.backend, rec.user_id))
            if rec.state == State.RUNNING:  # the deadline goes on from the last recorded change
                self.after(
                    max(0.0, self.cfg.task_timeout - (self.now() - rec.updated_at)), TimerKind.TIMEOUT, rec.task_id
                )
            log.info("registry: reloaded task %s (%s)", rec.task_id, rec.state)

    # -- requests

    def take_submit_token(self, user_id: str) -> bool:
        """The per-user token bucket: ``submit_burst`` at once, refilled at ``submit_rate`` per second."""
        now = trio.current_time()
        rate, burst = self.cfg.submit_rate, float(self.cfg.submit_burst)
        tokens, since = self.buckets.get(user_id, (burst, now))
        tokens = min(burst, tokens + (now - since) * rate)
        if tokens < 1.0:
            self.buckets[user_id] = (tokens, now)
            return False
        if user_id not in self.buckets and len(self.buckets) >= MAX_BUCKETS:  # forget users whose bucket is full
            self.buckets = {u: (t, at) for u, (t, at) in self.buckets.items() if t + (now - at) * rate < burst}
        self.buckets[user_id] = (tokens - 1.0, now)
        return True

    async def submit(self, msg: Submit) -> None:
        """Check the limits, then ask the ledger to freeze the cost; the task exists once the freeze is answered
        (``frozen``), and is announced once the scheduler has said where it queues (``enqueued``).
        A repeated request (an edge's ``task_id`` whose answer was lost) gets that task again, once."""
        chosen = msg.task_id
        if chosen is not None and chosen in self.answering:
            if self.answering[chosen][0].user_id == msg.user_id:  # its first attempt is still being answered
                self.answering[chosen].append(msg)
                return
            chosen = None  # another user's task id: never shared, never theirs to be told of
        if chosen is not None:
            rec = await self.record(chosen)
            if rec is not None and rec.user_id == msg.user_id:
                found = rec

                async def again(positions: dict[str, int | None]) -> None:
                    reply_once(msg.reply, Accepted(found.task_id, positions.get(found.task_id) or 0, found.cost))

                await self.with_positions([rec], again, msg.reply)
                return
            if rec is not None:
                chosen = None  # another user's task has that id: a new one (never overwrite theirs)
            elif await self.store.hold(chosen) is not None:
                chosen = None  # an earlier attempt froze and died before saving: its hold was released; start afresh
        if not self.take_submit_token(msg.user_id):
            reply_once(
                msg.reply,
                Refused(
                    "too_many_submits",
                    f"more than {self.cfg.submit_rate:g} submits per second (burst {self.cfg.submit_burst}); slow down",
                ),
            )
            return
        queued = self.freezing.get(msg.user_id, 0) + self.tasks.count(State.QUEUED, msg.user_id)
        if queued >= self.cfg.max_queued_per_user:
            reply_once(
                msg.reply,
                Refused("too_many_tasks", f"{queued} tasks already queued (limit {self.cfg.max_queued_per_user})"),
            )
            return
        task_id = chosen or uuid.uuid4().hex
        cost = msg.cost if msg.cost is not None else msg.size * self.cfg.price
        self.freezing[msg.user_id] = self.freezing.get(msg.user_id, 0) + 1
        self.answering[task_id] = [msg]

        async def frozen(answer: Any) -> None:
            self.unfreezing(msg.user_id)
            await self.frozen(msg, task_id, cost, answer)

        try:
            await self.request(
                self.ledger,
                lambda r: ledger_api.Freeze(msg.user_id, task_id, cost, r),
                frozen,
                task_id=task_id,
                name="ledger",
                on_error=lambda: self.answer(task_id, SUBMIT_FAILED),
            )
        except BaseException:
            self.unfreezing(msg.user_id)
            self.answering.pop(task_id, None)
            raise

    def unfreezing(self, user_id: str) -> None:
        left = self.freezing.pop(user_id, 1) - 1
        if left > 0:
            self.freezing[user_id] = left

    @staticmethod
    def submit_failed(msg: Submit) -> None:
        reply_once(msg.reply, SUBMIT_FAILED)

    def answer(self, task_id: str, result: Accepted | Refused) -> None:
        """Answer a submit, and every repeat of it that arrived meanwhile (an edge retrying a lost answer)."""
        for waiting in self.answering.pop(task_id, ()):
            reply_once(waiting.reply, result)

    async def frozen(self, msg: Submit, task_id: str, cost: int, answer: Any) -> None:
        if isinstance(answer, InsufficientCredits):
            self.answer(task_id, Refused("insufficient_credits", str(answer)))
            return
        if isinstance(answer, ledger_api.LedgerFault):  # nothing frozen: the ledger failed on this request
            self.answer(task_id, Refused("internal", str(answer)))
            return
        if isinstance(answer, LedgerError):  # pragma: no cover - a fresh task id cannot conflict
            self.answer(task_id, Refused("ledger_conflict", str(answer)))
            return
        if not isinstance(answer, Account):
            raise answer  # the ledger is gone: contained (nothing frozen that the ledger knows of)
        self.seq += 1
        now = self.now()
        rec = TaskRecord(
            task_id=task_id,
            seq=self.seq,
            user_id=msg.user_id,
            client_id=msg.client_id,
            prompt_id=str(uuid.uuid4()),
            state=State.QUEUED,
            size=msg.size,
            cost=cost,
            workflow=dict(msg.workflow),
            created_at=now,
            updated_at=now,
            template=msg.template,
            params=dict(msg.params) if msg.params is not None else None,
        )
        await self.store.save_task(rec)
        task = Task(rec, held=[])
        self.tasks.add(task)
        self.by_prompt[rec.prompt_id] = task_id
        job = sched.Job(task_id, rec.user_id, rec.prompt_id, rec.workflow)

        async def enqueued(position: Any) -> None:
            await self.enqueued(msg, task, position)

        await self.request(
            self.scheduler,
            lambda r: sched.Enqueue(job, r),
            enqueued,
            task_id=task_id,
            name="scheduler",
            on_error=lambda: self.answer(task_id, SUBMIT_FAILED),
        )
        await self.broadcast_status()

    async def enqueued(self, msg: Submit, task: Task, position: Any) -> None:
        if not isinstance(position, int):
            raise position  # the scheduler is gone: the task fails (internal, refunded)
        rec = task.rec
        log.info("registry: task %s of %s queued at %d (cost %d)", task.id, rec.user_id, position, rec.cost)
        held, task.held = task.held or [], None
        await self.publish(task, Queued(task.id, position, rec.cost, rec.template, rec.params))
        for later in held:  # what happened to it while the scheduler's answer was on its way
            await self.publish(task, later)
        self.answer(task.id, Accepted(task.id, position, rec.cost))

    async def cancel(self, msg: Cancel) -> None:
        task = self.tasks.get(msg.task_id)
        if task is None:
            rec = await self.store.get_task(msg.task_id)
            reply_once(msg.reply, "finished" if rec is not None and rec.user_id == msg.user_id else "not_found")
            return
        if task.rec.user_id != msg.user_id:
            reply_once(msg.reply, "not_found")
            return
        if task.rec.state == State.QUEUED:

            async def withdrawn(answer: Any) -> None:
                if answer is True and task.rec.state == State.QUEUED:
                    await self.finish(task, State.CANCELLED, None)
                    reply_once(msg.reply, "cancelled")
                elif task.rec.state in ACTIVE_STATES:
                    await self.cancel_dispatched(task)
                    reply_once(msg.reply, "cancelling")
                else:
                    reply_once(msg.reply, "finished")

            await self.request(
                self.scheduler,
                lambda r: sched.Withdraw(task.id, r),
                withdrawn,
                task_id=task.id,
                name="scheduler",
                on_error=msg.reply.close,
            )
            return
        await self.cancel_dispatched(task)
        reply_once(msg.reply, "cancelling")

    async def cancel_dispatched(self, task: Task) -> None:
        """Dispatched: remove it from ComfyUI's queue or interrupt it; the outcome arrives as an event."""
        task.cancelling = True
        await self.ask_backend_to_cancel(task)

    def stats(self) -> RegistryStats:
        counts: dict[str, int] = dict.fromkeys(ACTIVE_STATES, 0)
        counts.update(self.tasks.counts())
        return RegistryStats(counts, len(self.up), len(self.comfy))

    # -- ComfyUI's reports

    async def on_event(self, backend: str, event: Any) -> None:
        if type(event) is Progress:  # one per sampler step: what on_event_general does for it, without the rest
            if (task := self.task_for_prompt(event.prompt_id)) is not None:
                task.seen = True
                await self.relay_progress(task, backend, event.value, event.max, event.node)
            return
        await self.on_event_general(backend, event)

    async def on_report(self, msg: ComfyReport) -> None:
        match msg:
            case BackendEvent(backend, event):
                await self.on_event(backend, event)
            case PromptAccepted(backend, task_id):
                if (task := self.tasks.get(task_id)) is not None:
                    await self.mark_submitted(task, backend)
            case PromptRejected(backend, task_id, status=status, detail=detail):
                if (task := self.tasks.get(task_id)) is not None:
                    await self.save(task, backend=backend)
                    if task.cancelling:  # the user was told "cancelling": keep the promise
                        await self.finish(task, State.CANCELLED, None)
                    else:
                        await self.finish(task, State.FAILED, Reason.VALIDATION, {"error": detail, "status": status})
            case PromptFailed(backend, task_id, prompt_id, error):
                if (task := self.tasks.get(task_id)) is not None:
                    log.error(
                        "registry: task %s: submitting it to %s failed inside the gateway: %s", task_id, backend, error
                    )
                    await self.comfy[backend].send(CancelPrompt(prompt_id))  # in case it got there after all
                    await self.finish(task, State.FAILED, Reason.INTERNAL, {"error": INTERNAL_ERROR})
            case PromptSubmitUnknown(backend, task_id, prompt_id, error):
                if (task := self.tasks.get(task_id)) is not None:
                    log.warning("registry: submit of %s to %s unknown (%s): reconciling", task_id, backend, error)
                    await self.mark_submitted(task, backend)
                    self.after(RECHECK_DELAY, TimerKind.CHECK, task_id)
            case PromptLocated():
                await self.located(msg)
            case BackendUp():
                await self.backend_up(msg)
            case BackendLost():
                await self.backend_lost(msg)

    # -- crash isolation

    async def fail_internal(self, task_id: str, exc: BaseException) -> None:
        """Crash isolation: handling this task raised ``exc``. Fail it (``internal``, refunded); if even that fails,
        forget it here and leave its record to the next start-up (reloaded, then quarantined if it keeps crashing)."""
        log.error("registry: task %s failed internally: %r", task_id, exc, exc_info=exc)
        task = self.tasks.get(task_id)
        try:
            if task is not None:
                await self.finish(task, State.FAILED, Reason.INTERNAL, {"error": INTERNAL_ERROR})
            else:  # a Submit that froze credits but never stored its task: give them back (no hold: refused)
                await self.ledger.send(ledger_api.Resolve(task_id, "released"))
        except Exception as again:
            log.error("registry: task %s: failing it failed too (%r): dropped until the next start", task_id, again)
            if task is not None:
                self.tasks.remove(task_id)
                self.by_prompt.pop(task.rec.prompt_id, None)
                self.unverified.pop(task.rec.prompt_id, None)
                await self.scheduler.send(sched.Release(task_id))

    def task_of(self, msg: object) -> str | None:
        """The task a message (or timer key) is about, for crash isolation; None when it is about no one task."""
        if isinstance(msg, Answer):
            return msg.task_id
        if isinstance(msg, Cancel | PromptAccepted | PromptRejected | PromptSubmitUnknown | PromptFailed):
            return msg.task_id
        if isinstance(msg, PromptLocated):
            task = self.task_for_prompt(msg.prompt_id)
        elif isinstance(msg, BackendEvent):
            task = self.task_for_prompt(getattr(msg.event, "prompt_id", None))
        elif isinstance(msg, str):
            task = self.tasks.get(msg)
        else:
            return None
        return task.id if task is not None else None

    async def contain(self, msg: object, exc: Exception) -> None:
        """An exception while handling ``msg``: fail only the task it is about; answer a request with an error."""
        task_id = self.task_of(msg)
        if task_id is not None and not isinstance(msg, (GetTask, ListResults, ListTasks, ImageLocation)):
            await self.fail_internal(task_id, exc)
        else:
            log.error("registry: %s failed: %r", type(msg).__name__, exc, exc_info=exc)
        if isinstance(msg, Answer):
            if msg.on_error is not None:
                msg.on_error()
        elif isinstance(msg, Submit):
            self.submit_failed(msg)
        elif (reply := getattr(msg, "reply", None)) is not None:
            reply.close()  # the asker sees the registry's answer missing (ActorGone): a 503 for that request
