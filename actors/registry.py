"""The registry actor: every task's state machine, the prompt_id -> task map, and what users are told.

    queued --dispatch--> submitted --execution_start--> running --success--> succeeded
       |                     |                             |--error/interrupt/lost/timeout--> failed(reason)
       '--cancel--> cancelled '--cancel (delete+interrupt)--'--> cancelled

``failed`` carries a reason: ``validation``, ``execution_error``, ``interrupted``, ``backend_lost``, ``timeout``,
``internal``. Crash isolation: an exception while the registry handles a message or timer of one task fails that task
(``internal``, refunded, logged with the task id) and the actor goes on; a read-only request that fails gets an error
answer. A task that was in flight (dispatched, or inside ComfyUI) across ``quarantine_after`` consecutive unclean restarts
without being saved once (no progress) is quarantined at start-up: failed ``internal`` and refunded, so it can never crash-loop the process.
The gateway chooses each task's prompt_id itself and persists it with the task before anything is sent to
ComfyUI, so events that arrive before the POST /prompt answer, and a submit whose answer was lost, can be
matched (reconciled) by prompt_id. Every transition is persisted before it is acted on. On a terminal state
the registry settles or releases the task's credit hold (asking the ledger, a leaf actor, so the answer is
known before the user is told), returns the scheduler permit, and publishes the message to the task's session.

Reconciliation (CheckPrompts: /queue, then /history/{id}) runs after every (re)connect and start-up, when a
cancelled or timed-out prompt should have stopped, and when ComfyUI's ``status.queue_remaining`` is lower than the
number of our prompts it must hold. A task whose prompt was in flight while the socket was down (``gap``) takes
its outputs from /history even when its ``execution_success`` arrives live (its ``executed`` may have been
missed); the history entry is written after the terminal event, so it is read on the idle ``executing``. A backend
unreachable for ``backend_lost_after`` seconds has its in-flight tasks failed (``backend_lost``, refunded); their
prompts are deleted/interrupted there if it ever returns. Timers live in one heap keyed by (kind, task or backend).

Who talks to whom (blocking sends only go "down" this list, so there is no cycle that can deadlock):
web -> registry -> ledger, scheduler, comfy command loops, sessions hub; comfy report tasks -> registry.
"""

from __future__ import annotations

import base64
import datetime as dt
import heapq
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from . import ledger as ledger_api
from . import scheduler as sched
from ._util import Forwarder, ask, reply_once
from .comfy import (
    BackendEvent,
    BackendLost,
    BackendUp,
    CancelPrompt,
    CheckPrompts,
    ComfyCommand,
    ComfyReport,
    Executed,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    Executing,
    ExecutionSuccess,
    PreviewImage,
    Progress,
    PromptAccepted,
    PromptFailed,
    PromptLocated,
    PromptRejected,
    PromptSubmitUnknown,
    Status,
)
from .image_urls import ImageUrls
from .sessions import Broadcast, Publish
from .store import ImageRef, InsufficientCredits, LedgerError, SqliteStore, TaskRecord, TERMINAL_STATES

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "submitted", "running")
INFLIGHT_STATES = ("submitted", "running")  # inside ComfyUI (as far as we know), holding a scheduler permit
CANCEL_CHECK_DELAY = 2.0  # seconds after a cancel before asking ComfyUI where the prompt went
RECHECK_DELAY = 5.0  # seconds between reconciliation retries while a prompt's fate is unknown
HISTORY_RETRY_DELAY = 0.5  # seconds: ComfyUI writes the history entry just after the terminal event
TIMEOUT_GRACE = 60.0  # seconds a timed-out prompt has to obey the interrupt before it is given up on
CROSS_CHECK_INTERVAL = 1.0  # seconds: at most one queue_remaining-triggered reconciliation per backend this often
# seconds after its submit was accepted before a prompt not yet seen on the socket counts in that cross-check: our
# socket's events lag behind HTTP answers, so a `status` read just after the answer may predate the prompt
CROSS_CHECK_SETTLE = 2.0
MAX_ABANDONED = 1000  # prompt ids per backend to delete/interrupt when it returns (bounded memory)
DRAIN_BATCH = 64  # reports taken from the inbox in a row (receive_nowait) before the registry yields
TIMEOUT_ERROR = "the task exceeded its time limit and was interrupted"
INTERNAL_ERROR = "the gateway failed while handling this task (internal error); credits returned"
MAX_BUCKETS = 10_000  # per-user submit buckets kept before full ones are forgotten


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    price: int = 1  # credits per unit of ``size``
    max_queued_per_user: int = 32
    task_timeout: float = 30 * 60.0  # seconds a task may run inside ComfyUI before it is interrupted
    backend_lost_after: float = 5 * 60.0  # seconds a backend may stay unreachable before its tasks are backend_lost
    public_url: str = ""  # prefix of image URLs, e.g. "http://127.0.0.1:8080"
    backend_urls: Mapping[str, str] = field(default_factory=dict)
    submit_rate: float = 5.0  # submits per user per second (token bucket) ...
    submit_burst: int = 20  # ... with this many at once; beyond: 429 too_many_submits
    quarantine_after: int = 2  # unclean restarts a task may stay active across without progress
    unclean_start: bool = False  # the previous run on this store did not stop cleanly (set by run_gateway)
    boot: int = 1  # this run's boot number on the store (the crashed run, if unclean, is boot - 1)
    image_urls: ImageUrls | None = None  # signs image URLs (re-signed each time a view is made)


# ---- requests from the web layer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    task_id: str
    position: int
    cost: int


@dataclass(frozen=True, slots=True)
class Refused:
    status: int  # HTTP status the web layer answers with
    error: str  # machine-readable code
    detail: str


@dataclass(frozen=True, slots=True)
class Submit:
    user_id: str
    client_id: str
    workflow: Mapping[str, Any]
    size: int
    reply: trio.MemorySendChannel[Accepted | Refused]


@dataclass(frozen=True, slots=True)
class GetTask:
    user_id: str
    task_id: str
    reply: trio.MemorySendChannel[dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class Cancel:
    """Owner-only cancel. Replies 'cancelled', 'cancelling', 'not_found' or 'finished'."""

    user_id: str
    task_id: str
    reply: trio.MemorySendChannel[str]


@dataclass(frozen=True, slots=True)
class ListResults:
    user_id: str
    limit: int
    before: int | None
    reply: trio.MemorySendChannel[tuple[list[dict[str, Any]], int | None]]


@dataclass(frozen=True, slots=True)
class ListTasks:
    """The user's tasks, newest first: ``which`` is "active" (queued, submitted, running), "finished" or "all"."""

    user_id: str
    which: str
    limit: int
    before: int | None
    reply: trio.MemorySendChannel[tuple[list[dict[str, Any]], int | None]]


@dataclass(frozen=True, slots=True)
class ImageLocation:
    """Where image ``n`` of the user's task lives: (backend base URL, ImageRef), or None. ``user_id`` None: any
    owner (the request carried a signed URL, which is the gateway's own word that it may see this image)."""

    user_id: str | None
    task_id: str
    n: int
    reply: trio.MemorySendChannel[tuple[str, ImageRef] | None]


@dataclass(frozen=True, slots=True)
class RegistryStats:
    by_state: Mapping[str, int]
    backends_up: int
    backends_total: int


@dataclass(frozen=True, slots=True)
class GetStats:
    reply: trio.MemorySendChannel[RegistryStats]


RegistryMsg = Submit | GetTask | Cancel | ListResults | ListTasks | ImageLocation | GetStats | ComfyReport


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Task:
    """The registry's live view of one non-terminal task (it owns these; others get copies)."""

    rec: TaskRecord
    cancelling: bool = False
    timed_out: bool = False
    gap: bool = False  # its backend's socket was down while it was in flight: live events may be missing
    seen: bool = False  # an event of its prompt arrived on the socket: later `status` frames know of it
    submitted_at: float = float("-inf")  # trio time it was marked submitted
    awaiting_history: bool = False  # success seen after a gap: its outputs are read from /history first

    @property
    def id(self) -> str:
        return self.rec.task_id


class _Registry:
    def __init__(
        self,
        cfg: RegistryConfig,
        *,
        store: SqliteStore,
        ledger: trio.MemorySendChannel[ledger_api.LedgerMsg],
        scheduler: trio.MemorySendChannel[sched.SchedulerMsg],
        comfy: Mapping[str, trio.MemorySendChannel[ComfyCommand]],
        sessions: trio.MemorySendChannel[Publish | Broadcast],
        wall_clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.ledger = ledger
        self.scheduler = scheduler
        self.comfy = comfy
        self.sessions = sessions
        self.to_hub = Forwarder(sessions)  # progress bursts reach the hub (and the writers) whole
        self.now = wall_clock
        self.tasks: dict[str, _Task] = {}
        self.by_prompt: dict[str, str] = {}
        self.up: set[str] = set()
        self.lost_since: dict[str, float] = {}  # backend -> trio time it was last seen going away (absent: up)
        self.abandoned: dict[str, set[str]] = {}  # backend -> prompt_ids given up on; deleted/interrupted on return
        # queued tasks reloaded at start-up: a crash between dispatch and the store's "submitted" may have left
        # them inside a ComfyUI already. prompt_id -> backends that said "not here"; dispatched once all did.
        self.unverified: dict[str, set[str]] = {}
        self.last_cross_check: dict[str, float] = {}  # backend -> trio time of the last status-triggered check
        self.seq = 0
        self.timers: list[tuple[float, int, str, str]] = []  # (trio time, tiebreak, kind, task_id or backend)
        self.timer_due: dict[tuple[str, str], float] = {}  # (kind, key) -> the one live due time
        self._timer_ids = 0
        self.last_status: tuple[int, int, int, int] | None = None
        self.buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, trio time) for the submit rate
        self.submitting: str | None = None  # the task id a Submit being handled has created (crash isolation)

    # -- helpers

    def url(self, task_id: str, n: int) -> str:
        if self.cfg.image_urls is not None:
            return self.cfg.image_urls.url(task_id, n)
        return f"{self.cfg.public_url}/api/images/{task_id}/{n}"

    def urls(self, rec: TaskRecord) -> list[str]:
        return [self.url(rec.task_id, n) for n in range(len(rec.images))]

    def view(self, rec: TaskRecord, position: int | None = None) -> dict[str, Any]:
        v: dict[str, Any] = {
            "taskId": rec.task_id,
            "state": rec.state,
            "cost": rec.cost,
            "size": rec.size,
            "prompt_id": rec.prompt_id,
            "urls": self.urls(rec),
            "createdAt": _iso(rec.created_at),
            "updatedAt": _iso(rec.updated_at),
            "clientId": rec.client_id,
        }
        if rec.reason:
            v["reason"] = rec.reason
        if rec.error:
            v["error"] = rec.error.get("error")
        if position is not None:
            v["position"] = position
        if rec.state in ACTIVE_STATES:  # where it waits: our queue, or inside ComfyUI
            v["where"] = "gateway" if rec.state == "queued" else "comfyui"
        return v

    def after(self, delay: float, kind: str, key: str) -> None:
        """Run ``on_timer(kind, key)`` in ``delay`` seconds. One live timer per (kind, key): an earlier one wins."""
        due = trio.current_time() + delay
        if self.timer_due.get((kind, key), float("inf")) <= due:
            return
        self.timer_due[(kind, key)] = due
        self._timer_ids += 1
        heapq.heappush(self.timers, (due, self._timer_ids, kind, key))

    def pop_timer(self) -> tuple[str, str] | None:
        """The next due timer's (kind, key), or None if that heap entry was superseded by an earlier one."""
        due, _, kind, key = heapq.heappop(self.timers)
        if self.timer_due.get((kind, key)) != due:
            return None
        del self.timer_due[(kind, key)]
        return kind, key

    async def publish(self, rec: TaskRecord, body: dict[str, Any]) -> None:
        await self.to_hub.send(Publish(rec.user_id, rec.client_id, body))

    async def save(self, task: _Task, **changes: Any) -> TaskRecord:
        task.rec = replace(task.rec, updated_at=self.now(), **changes)
        await self.store.save_task(task.rec)
        return task.rec

    async def broadcast_status(self) -> None:
        counts = {s: 0 for s in ACTIVE_STATES}
        for t in self.tasks.values():
            counts[t.rec.state] += 1
        status = (counts["queued"], counts["submitted"] + counts["running"], len(self.up), len(self.comfy))
        if status != self.last_status:
            self.last_status = status
            await self.sessions.send(
                Broadcast({"type": "status", "queued": status[0], "running": status[1],
                           "backends": {"up": status[2], "total": status[3]}})
            )

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
                log.error("registry: task %s was active across %d unclean restarts without progress: quarantined "
                          "(failed internal, refunded)", rec.task_id, self.cfg.quarantine_after)
                task = self.tasks[rec.task_id] = _Task(rec)
                self.by_prompt[rec.prompt_id] = rec.task_id
                await self.finish(task, "failed", "internal", {"error": "the task was in flight across repeated "
                                                               "gateway crashes and was quarantined; credits returned"})
                continue
            task = _Task(rec, gap=rec.state in INFLIGHT_STATES)  # nobody listened while we were down
            self.tasks[rec.task_id] = task
            self.by_prompt[rec.prompt_id] = rec.task_id
            if rec.state == "queued":
                self.unverified[rec.prompt_id] = set()  # asked of every backend once it is up (verify_queued)
            elif rec.backend in self.comfy:
                await self.scheduler.send(sched.Occupy(rec.task_id, rec.backend, rec.user_id))
            if rec.state == "running":  # the deadline goes on from the last recorded change
                self.after(max(0.0, self.cfg.task_timeout - (self.now() - rec.updated_at)), "timeout", rec.task_id)
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

    async def submit(self, msg: Submit) -> Accepted | Refused:
        if not self.take_submit_token(msg.user_id):
            return Refused(429, "too_many_submits", f"more than {self.cfg.submit_rate:g} submits per second "
                                                    f"(burst {self.cfg.submit_burst}); slow down")
        queued = sum(1 for t in self.tasks.values() if t.rec.user_id == msg.user_id and t.rec.state == "queued")
        if queued >= self.cfg.max_queued_per_user:
            return Refused(429, "too_many_tasks", f"{queued} tasks already queued (limit {self.cfg.max_queued_per_user})")
        self.seq += 1
        task_id = self.submitting = uuid.uuid4().hex
        cost = msg.size * self.cfg.price
        try:
            await ledger_api.freeze(self.ledger, msg.user_id, task_id, cost)
        except InsufficientCredits as exc:
            return Refused(402, "insufficient_credits", str(exc))
        except ledger_api.LedgerFault as exc:  # nothing frozen: the ledger failed on this request
            return Refused(500, "internal", str(exc))
        except LedgerError as exc:  # pragma: no cover - a fresh task id cannot conflict
            return Refused(409, "ledger_conflict", str(exc))
        now = self.now()
        rec = TaskRecord(
            task_id=task_id, seq=self.seq, user_id=msg.user_id, client_id=msg.client_id,
            prompt_id=str(uuid.uuid4()), state="queued", size=msg.size, cost=cost,
            workflow=dict(msg.workflow), created_at=now, updated_at=now,
        )
        await self.store.save_task(rec)
        task = self.tasks[task_id] = _Task(rec)
        self.by_prompt[rec.prompt_id] = task_id
        job = sched.Job(task_id, rec.user_id, rec.prompt_id, rec.workflow)
        position = await ask(self.scheduler, lambda r: sched.Enqueue(job, r), name="scheduler")
        log.info("registry: task %s of %s queued at %d (cost %d)", task_id, msg.user_id, position, cost)
        await self.publish(task.rec, {"type": "queued", "taskId": task_id, "position": position, "cost": cost})
        await self.broadcast_status()
        return Accepted(task_id, position, cost)

    async def get_task(self, user_id: str, task_id: str) -> dict[str, Any] | None:
        task = self.tasks.get(task_id)
        rec = task.rec if task is not None else await self.store.get_task(task_id)
        if rec is None or rec.user_id != user_id:
            return None
        position = None
        if rec.state == "queued":
            position = await ask(self.scheduler, lambda r: sched.GetPosition(task_id, r), name="scheduler")
        return self.view(rec, position)

    async def cancel(self, user_id: str, task_id: str) -> str:
        task = self.tasks.get(task_id)
        if task is None:
            rec = await self.store.get_task(task_id)
            return "finished" if rec is not None and rec.user_id == user_id else "not_found"
        if task.rec.user_id != user_id:
            return "not_found"
        if task.rec.state == "queued":
            withdrawn = await ask(self.scheduler, lambda r: sched.Withdraw(task_id, r), name="scheduler")
            if withdrawn:
                await self.finish(task, "cancelled", None)
                return "cancelled"
        # dispatched: remove it from ComfyUI's queue or interrupt it; the outcome arrives as an event
        task.cancelling = True
        await self.ask_backend_to_cancel(task)
        return "cancelling"

    async def ask_backend_to_cancel(self, task: _Task) -> None:
        if task.rec.backend in self.comfy:
            await self.comfy[task.rec.backend].send(CancelPrompt(task.rec.prompt_id))
            self.after(CANCEL_CHECK_DELAY, "check", task.id)
        else:  # dispatched but not yet accepted: retry once the backend is known
            self.after(CANCEL_CHECK_DELAY, "cancel", task.id)

    async def list_results(self, user_id: str, limit: int, before: int | None) -> tuple[list[dict[str, Any]], int | None]:
        recs = await self.store.list_results(user_id, limit + 1, before)
        nxt = recs[limit - 1].seq if len(recs) > limit else None
        return [self.view(r) | {"seq": r.seq} for r in recs[:limit]], nxt

    async def list_tasks(self, user_id: str, which: str, limit: int,
                         before: int | None) -> tuple[list[dict[str, Any]], int | None]:
        """Live tasks come from memory, finished ones from the store; merged newest first (by task seq)."""
        recs: list[TaskRecord] = []
        if which in ("active", "all"):
            recs += [t.rec for t in self.tasks.values()
                     if t.rec.user_id == user_id and (before is None or t.rec.seq < before)]
        if which in ("finished", "all"):
            recs += await self.store.list_results(user_id, limit + 1, before)
        unique = {r.task_id: r for r in reversed(recs)}  # a task just finishing may be in both: memory wins
        recs = sorted(unique.values(), key=lambda r: r.seq, reverse=True)
        page = recs[:limit]
        views = []
        for rec in page:
            position = None
            if rec.state == "queued":
                position = await ask(self.scheduler, lambda r, t=rec.task_id: sched.GetPosition(t, r), name="scheduler")
            views.append(self.view(rec, position) | {"seq": rec.seq})
        return views, (page[-1].seq if len(recs) > limit else None)

    async def image_location(self, user_id: str | None, task_id: str, n: int) -> tuple[str, ImageRef] | None:
        task = self.tasks.get(task_id)
        rec = task.rec if task is not None else await self.store.get_task(task_id)
        if rec is None or (user_id is not None and rec.user_id != user_id) or not 0 <= n < len(rec.images):
            return None
        img = rec.images[n]
        base = self.cfg.backend_urls.get(img.backend)
        return (base, img) if base else None

    def stats(self) -> RegistryStats:
        counts: dict[str, int] = {s: 0 for s in ACTIVE_STATES}
        for t in self.tasks.values():
            counts[t.rec.state] = counts.get(t.rec.state, 0) + 1
        return RegistryStats(counts, len(self.up), len(self.comfy))

    # -- transitions

    def task_for_prompt(self, prompt_id: str | None) -> _Task | None:
        if prompt_id is None:
            return None
        task_id = self.by_prompt.get(prompt_id)
        return self.tasks.get(task_id) if task_id is not None else None

    async def mark_submitted(self, task: _Task, backend: str) -> None:
        if task.rec.state == "queued":
            if backend not in self.up:  # accepted while the socket was down: its first events went nowhere
                task.gap = True
            task.submitted_at = trio.current_time()
            await self.save(task, state="submitted", backend=backend)
            if task.cancelling:
                await self.ask_backend_to_cancel(task)
            await self.broadcast_status()

    async def mark_running(self, task: _Task, backend: str) -> None:
        await self.mark_submitted(task, backend)
        if task.rec.state == "submitted":
            await self.save(task, state="running")
            self.after(self.cfg.task_timeout, "timeout", task.id)
            await self.publish(task.rec, {"type": "started", "taskId": task.id, "prompt_id": task.rec.prompt_id})
            await self.broadcast_status()

    async def add_images(self, task: _Task, images: list[Mapping[str, Any]], backend: str) -> None:
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
        urls = [self.url(task.id, n) for n in range(first, len(rec.images))]
        await self.publish(rec, {"type": "imageResult", "taskId": task.id, "prompt_id": rec.prompt_id, "urls": urls})

    async def finish(self, task: _Task, state: str, reason: str | None, error: dict[str, Any] | None = None) -> None:
        """The one way into a terminal state: persist, settle or release, free the permit, tell the user."""
        if task.rec.state in TERMINAL_STATES:
            return
        rec = await self.save(task, state=state, reason=reason, error=error)
        del self.tasks[task.id]
        self.by_prompt.pop(rec.prompt_id, None)
        refunded = False
        try:
            if state == "succeeded":
                await ledger_api.settle(self.ledger, task.id, rec.cost)
            else:
                await ledger_api.release(self.ledger, task.id, rec.cost)
                refunded = True
        except ledger_api.LedgerFault as exc:  # the ledger failed on this hold: never charge what we cannot record
            log.error("registry: task %s: the ledger failed to resolve its hold: %s", task.id, exc)
            if state == "succeeded":
                state, reason, error = "failed", "internal", {"error": INTERNAL_ERROR}
                rec = replace(rec, state=state, reason=reason, error=error, updated_at=self.now())
                await self.store.save_task(rec)
                try:
                    await ledger_api.release(self.ledger, task.id, rec.cost)
                    refunded = True
                except LedgerError as again:  # the hold stays pending; the ledger's sweep releases it later
                    log.error("registry: task %s: releasing its hold failed too: %s", task.id, again)
        except LedgerError as exc:  # e.g. the hold expired and was released already
            log.error("registry: task %s: ledger refused to resolve its hold: %s", task.id, exc)
            refunded = state != "succeeded"
        await self.scheduler.send(sched.Release(task.id))
        log.info("registry: task %s %s%s", task.id, state, f" ({reason})" if reason else "")
        if state == "succeeded":
            body = {"type": "completed", "taskId": task.id, "prompt_id": rec.prompt_id, "urls": self.urls(rec)}
        elif state == "cancelled":
            body = {"type": "cancelled", "taskId": task.id, "refunded": refunded}
        else:
            body = {"type": "execution_error", "taskId": task.id, "prompt_id": rec.prompt_id,
                    "error": (error or {}).get("error", reason or "failed"), "reason": reason, "refunded": refunded}
            for key in ("node_id", "node_type"):
                if (error or {}).get(key) is not None:
                    body[key] = error[key]  # type: ignore[index]
        await self.publish(rec, body)
        await self.broadcast_status()

    async def finish_gone(self, task: _Task, detail: str) -> None:
        """The prompt is gone from ComfyUI, or its backend stayed unreachable too long: end the task by what we know."""
        if task.cancelling:
            await self.finish(task, "cancelled", None)
        elif task.timed_out:
            await self.finish(task, "failed", "timeout", {"error": TIMEOUT_ERROR})
        elif task.awaiting_history:  # ComfyUI reported success; only outputs missed during the gap may be absent
            log.warning("registry: task %s succeeded but its history is gone: %s", task.id, detail)
            await self.finish(task, "succeeded", None)
        else:
            await self.finish(task, "failed", "backend_lost", {"error": detail})

    async def fail_internal(self, task_id: str, exc: BaseException) -> None:
        """Crash isolation: handling this task raised ``exc``. Fail it (``internal``, refunded); if even that fails,
        forget it here and leave its record to the next start-up (reloaded, then quarantined if it keeps crashing)."""
        log.error("registry: task %s failed internally: %r", task_id, exc, exc_info=exc)
        task = self.tasks.get(task_id)
        try:
            if task is not None:
                await self.finish(task, "failed", "internal", {"error": INTERNAL_ERROR})
            else:  # a Submit that froze credits but never stored its task: give them back
                await ledger_api.release(self.ledger, task_id)
        except LedgerError:
            pass  # no hold (the freeze failed) or already resolved
        except Exception as again:
            log.error("registry: task %s: failing it failed too (%r): dropped until the next start", task_id, again)
            if task is not None:
                self.tasks.pop(task_id, None)
                self.by_prompt.pop(task.rec.prompt_id, None)
                self.unverified.pop(task.rec.prompt_id, None)
                await self.scheduler.send(sched.Release(task_id))

    def task_of(self, msg: object) -> str | None:
        """The task a message (or timer key) is about, for crash isolation; None when it is about no one task."""
        if isinstance(msg, Submit):
            return self.submitting
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
        self.submitting = None
        if task_id is not None and not isinstance(msg, (GetTask, ListResults, ImageLocation)):
            await self.fail_internal(task_id, exc)
        else:
            log.error("registry: %s failed: %r", type(msg).__name__, exc, exc_info=exc)
        reply = getattr(msg, "reply", None)
        if isinstance(msg, Submit):
            reply_once(msg.reply, Refused(500, "internal", "the gateway failed on this submit; nothing was charged"))
        elif reply is not None:
            reply.close()  # the asker sees the registry's answer missing (ActorGone): a 503 for that request

    def abandon(self, task: _Task) -> None:
        """Remember an unreachable backend's prompt we gave up on, to delete/interrupt it if the backend returns."""
        backend = task.rec.backend
        if backend is not None:
            ids = self.abandoned.setdefault(backend, set())
            if len(ids) < MAX_ABANDONED:
                ids.add(task.rec.prompt_id)

    def backend_went_away(self, backend: str) -> None:
        if backend not in self.lost_since:
            self.lost_since[backend] = trio.current_time()
            self.after(self.cfg.backend_lost_after, "backend_lost", backend)
        for t in self.tasks.values():
            if t.rec.backend == backend and t.rec.state in INFLIGHT_STATES:
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
        ours = sum(1 for t in self.tasks.values() if t.rec.backend == backend and t.rec.state in INFLIGHT_STATES
                   and (t.seen or t.cancelling or t.submitted_at <= settled))
        if queue_remaining >= ours:
            return
        wait = self.last_cross_check.get(backend, float("-inf")) + CROSS_CHECK_INTERVAL - trio.current_time()
        if wait > 0:
            self.after(wait, "reconcile", backend)
        else:
            log.info("registry: %s reports %d queued, we count %d of ours: reconciling", backend, queue_remaining, ours)
            await self.reconcile(backend)

    async def interrupted(self, task: _Task, node_id: str | None = None, node_type: str | None = None) -> None:
        if task.cancelling:
            await self.finish(task, "cancelled", None)
        elif task.timed_out:
            await self.finish(task, "failed", "timeout", {"error": TIMEOUT_ERROR})
        else:
            await self.finish(task, "failed", "interrupted",
                              {"error": "the prompt was interrupted on ComfyUI", "node_id": node_id, "node_type": node_type})

    async def on_event(self, backend: str, event: Any) -> None:
        if (seen := self.task_for_prompt(getattr(event, "prompt_id", None))) is not None:
            seen.seen = True
        match event:
            case ExecutionStart(prompt_id=pid):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.mark_running(task, backend)
            case Progress(prompt_id=pid, node=node, value=value, max=mx):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.mark_running(task, backend)
                    await self.publish(task.rec, {"type": "progress", "taskId": task.id, "prompt_id": pid,
                                                  "value": value, "max": mx, "node": node})
            case PreviewImage(prompt_id=pid, mime=mime, image=image):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.publish(task.rec, {"type": "preview", "taskId": task.id, "prompt_id": pid,
                                                  "mime": mime, "data": base64.b64encode(image).decode()})
            case Executed(prompt_id=pid, output=output):
                if (task := self.task_for_prompt(pid)) is not None and output:
                    await self.mark_running(task, backend)
                    await self.add_images(task, list(output.get("images") or ()), backend)
            case ExecutionSuccess(prompt_id=pid):
                if (task := self.task_for_prompt(pid)) is not None:
                    if task.gap:  # an `executed` may have been missed: read the outputs from /history first
                        task.awaiting_history = True
                        self.after(RECHECK_DELAY, "check", task.id)  # if the idle `executing` is missed too
                    else:
                        await self.finish(task, "succeeded", None)
            case Executing(prompt_id=pid, node=None):  # the prompt is done and its history entry written
                if (task := self.task_for_prompt(pid)) is not None and task.awaiting_history:
                    await self.check(backend, (task.rec.prompt_id,))
            case Status(queue_remaining=remaining):
                await self.cross_check(backend, remaining)
            case ExecutionError(prompt_id=pid, blocked=False) as err:
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.finish(task, "failed", "execution_error", {
                        "error": f"{err.node_type or 'node'} {err.node_id or ''}: {err.exception_message}".strip(),
                        "node_id": err.node_id, "node_type": err.node_type, "exception_type": err.exception_type,
                    })
            case ExecutionInterrupted(prompt_id=pid, node_id=node_id, node_type=node_type):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.interrupted(task, node_id, node_type)
            case _:
                pass  # status, executing, cached, progress_state: nothing a user needs from the registry

    async def apply_history(self, task: _Task, backend: str, entry: Mapping[str, Any]) -> None:
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
            if isinstance(item, (list, tuple)) and len(item) == 2 and item[0] in (
                "execution_success", "execution_error", "execution_interrupted"
            ):
                terminal = item
        kind, data = terminal if terminal else ("execution_success" if status.get("status_str") == "success" else "execution_error", {})
        data = data if isinstance(data, Mapping) else {}
        if kind == "execution_success":
            await self.finish(task, "succeeded", None)
        elif kind == "execution_interrupted":
            await self.interrupted(task, data.get("node_id"), data.get("node_type"))
        else:
            message = str(data.get("exception_message", "failed")).strip()  # ComfyUI ends it with "\n"
            await self.finish(task, "failed", "execution_error", {
                "error": f"{data.get('node_type') or 'node'} {data.get('node_id') or ''}: {message}".strip(),
                "node_id": data.get("node_id"), "node_type": data.get("node_type"),
            })

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
            self.after(RECHECK_DELAY, "verify", backend)
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
                await self.finish(task, "cancelled", None)
                continue
            if unanswered:
                for backend in unanswered:
                    self.abandoned.setdefault(backend, set()).add(prompt_id)
                self.by_prompt.pop(prompt_id, None)
                await self.save(task, prompt_id=str(uuid.uuid4()))
                self.by_prompt[task.rec.prompt_id] = task.id
                log.info("registry: reloaded task %s: %s not reachable, dispatching as prompt %s", task.id,
                         sorted(unanswered), task.rec.prompt_id)
            rec = task.rec
            await self.scheduler.send(sched.Enqueue(sched.Job(rec.task_id, rec.user_id, rec.prompt_id, rec.workflow)))

    async def reconcile(self, backend: str) -> None:
        ids = tuple(t.rec.prompt_id for t in self.tasks.values()
                    if t.rec.backend == backend and t.rec.state in ("submitted", "running"))
        if ids:
            log.info("registry: reconciling %d prompt(s) on %s", len(ids), backend)
            await self.check(backend, ids)

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
                        await self.finish(task, "cancelled", None)
                    else:
                        await self.finish(task, "failed", "validation", {"error": detail, "status": status})
            case PromptFailed(backend, task_id, prompt_id, error):
                if (task := self.tasks.get(task_id)) is not None:
                    log.error("registry: task %s: submitting it to %s failed inside the gateway: %s", task_id, backend,
                              error)
                    await self.comfy[backend].send(CancelPrompt(prompt_id))  # in case it got there after all
                    await self.finish(task, "failed", "internal", {"error": INTERNAL_ERROR})
            case PromptSubmitUnknown(backend, task_id, prompt_id, error):
                if (task := self.tasks.get(task_id)) is not None:
                    log.warning("registry: submit of %s to %s unknown (%s): reconciling", task_id, backend, error)
                    await self.mark_submitted(task, backend)
                    self.after(RECHECK_DELAY, "check", task_id)
            case PromptLocated(backend, prompt_id, where, history):
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
                        self.after(HISTORY_RETRY_DELAY, "check", task.id)
                elif where == "unknown":
                    self.after(RECHECK_DELAY, "check", task.id)
            case BackendUp(backend):
                self.up.add(backend)
                self.lost_since.pop(backend, None)
                await self.scheduler.send(sched.SetBackend(backend, True))
                for prompt_id in sorted(self.abandoned.pop(backend, ())):  # failed while away: must not run now
                    await self.comfy[backend].send(CancelPrompt(prompt_id))
                await self.reconcile(backend)
                await self.verify_queued(backend)
                await self.broadcast_status()
            case BackendLost(backend, reason):
                self.up.discard(backend)
                self.backend_went_away(backend)
                await self.scheduler.send(sched.SetBackend(backend, False))
                await self.release_verified()
                log.warning("registry: backend %s lost: %s", backend, reason)
                await self.broadcast_status()

    async def on_backend_timer(self, kind: str, backend: str) -> None:
        if backend in self.up:
            if kind == "reconcile":
                await self.reconcile(backend)
            return
        since = self.lost_since.get(backend)
        if kind != "backend_lost" or since is None:
            return
        remaining = since + self.cfg.backend_lost_after - trio.current_time()
        if remaining > 1e-9:  # it came back and went away again meanwhile
            self.after(remaining, "backend_lost", backend)
            return
        for said_no in self.unverified.values():  # unreachable too long: it no longer counts as a place to look
            said_no.add(backend)
        await self.release_verified()
        lost = [t for t in self.tasks.values() if t.rec.backend == backend and t.rec.state in INFLIGHT_STATES]
        if lost:
            log.warning("registry: %s unreachable for %.0fs: giving up on %d task(s)", backend,
                        self.cfg.backend_lost_after, len(lost))
        for task in lost:
            self.abandon(task)
            await self.finish_gone(task, self.unreachable(backend))

    async def on_timer(self, kind: str, task_id: str) -> None:
        if kind in ("backend_lost", "reconcile"):
            await self.on_backend_timer(kind, task_id)
            return
        if kind == "verify":
            await self.verify_queued(task_id)  # the key is a backend name here
            return
        task = self.tasks.get(task_id)
        if task is None:
            return
        backend = task.rec.backend
        if kind == "timeout" and task.rec.state == "running":
            log.warning("registry: task %s exceeded %ss: interrupting", task_id, self.cfg.task_timeout)
            task.timed_out = True
            await self.ask_backend_to_cancel(task)
            self.after(TIMEOUT_GRACE, "timeout_grace", task_id)
        elif kind == "timeout_grace":  # the interrupt was not obeyed (or not heard): give up on the prompt
            log.warning("registry: task %s ignored its interrupt for %ss: failing it", task_id, TIMEOUT_GRACE)
            if backend in self.comfy:
                await self.comfy[backend].send(CancelPrompt(task.rec.prompt_id))
            await self.finish_gone(task, "the prompt did not stop")
        elif kind == "cancel":
            await self.ask_backend_to_cancel(task)
        elif kind == "check" and backend in self.comfy:
            if backend in self.up:
                await self.check(backend, (task.rec.prompt_id,))
            elif self.lost_too_long(backend):
                self.abandon(task)
                await self.finish_gone(task, self.unreachable(backend))
            else:
                self.after(RECHECK_DELAY, "check", task_id)


async def run(
    inbox: trio.MemoryReceiveChannel[RegistryMsg],
    cfg: RegistryConfig,
    *,
    store: SqliteStore,
    ledger: trio.MemorySendChannel[ledger_api.LedgerMsg],
    scheduler: trio.MemorySendChannel[sched.SchedulerMsg],
    comfy: Mapping[str, trio.MemorySendChannel[ComfyCommand]],
    sessions: trio.MemorySendChannel[Publish | Broadcast],
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    reg = _Registry(cfg, store=store, ledger=ledger, scheduler=scheduler, comfy=comfy, sessions=sessions,
                    wall_clock=wall_clock)
    await reg.load()
    task_status.started()
    in_a_row = 0  # messages taken without a checkpoint (receive_nowait while the inbox has some)
    with inbox:
        while True:
            deadline = reg.timers[0][0] if reg.timers else float("inf")
            msg = None
            if in_a_row < DRAIN_BATCH and deadline > trio.current_time():
                try:
                    msg = inbox.receive_nowait()
                    in_a_row += 1
                except trio.WouldBlock:
                    pass
                except trio.EndOfChannel:
                    return
            if msg is None:
                in_a_row = 0
                with trio.move_on_at(deadline):
                    try:
                        msg = await inbox.receive()
                    except trio.EndOfChannel:
                        return
            if msg is None:
                timer = reg.pop_timer()
                if timer is not None:
                    try:
                        await reg.on_timer(*timer)
                    except Exception as exc:  # crash isolation: fail only the task the timer is about
                        await reg.contain(timer[1], exc)
                continue
            try:
                await handle(reg, msg)
            except Exception as exc:  # crash isolation (trio.Cancelled is a BaseException and passes)
                await reg.contain(msg, exc)


async def handle(reg: _Registry, msg: RegistryMsg) -> None:
    match msg:
        case Submit():
            reply_once(msg.reply, await reg.submit(msg))
            reg.submitting = None
        case GetTask(user_id, task_id, reply):
            reply_once(reply, await reg.get_task(user_id, task_id))
        case Cancel(user_id, task_id, reply):
            reply_once(reply, await reg.cancel(user_id, task_id))
        case ListResults(user_id, limit, before, reply):
            reply_once(reply, await reg.list_results(user_id, limit, before))
        case ListTasks(user_id, which, limit, before, reply):
            reply_once(reply, await reg.list_tasks(user_id, which, limit, before))
        case ImageLocation(user_id, task_id, n, reply):
            reply_once(reply, await reg.image_location(user_id, task_id, n))
        case GetStats(reply):
            reply_once(reply, reg.stats())
        case _:
            await reg.on_report(msg)
