"""Read views: a task as the web layer shows it, the user's task lists and results, and where an image lives.

They read the registry's live tasks and the store (every transition is persisted before it is acted on), and ask
the scheduler for queue positions without waiting for it: the answer comes back as a message and completes the
view then (``RegistryBase.request``)."""

from __future__ import annotations

import datetime as dt
from functools import partial
from typing import Any

import trio

from .. import scheduler as sched
from .._util import reply_once
from ..store import Store, TaskRecord
from ..task_machine import ACTIVE_STATES, State
from ._api import GetTask, ImageLocation, ListResults, ListTasks, RegistryConfig, image_url
from ._base import RegistryBase

__all__ = ["StoreReads", "Views", "iso", "task_view"]


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_view(cfg: RegistryConfig, rec: TaskRecord, position: int | None = None) -> dict[str, Any]:
    """A task as the web layer shows it (GET /api/tasks/{id}, task lists, results)."""
    v: dict[str, Any] = {
        "taskId": rec.task_id,
        "state": rec.state,
        "cost": rec.cost,
        "size": rec.size,
        "prompt_id": rec.prompt_id,
        "urls": [image_url(cfg, rec.task_id, n) for n in range(len(rec.images))],
        "createdAt": iso(rec.created_at),
        "updatedAt": iso(rec.updated_at),
        "clientId": rec.client_id,
    }
    if rec.template is not None:
        v["template"] = rec.template
        v["params"] = rec.params
    if rec.reason:
        v["reason"] = rec.reason
    if rec.error:
        v["error"] = rec.error.get("error")
    if position is not None:
        v["position"] = position
    if rec.state in ACTIVE_STATES:  # where it waits: our queue, or inside ComfyUI
        v["where"] = "gateway" if rec.state == State.QUEUED else "comfyui"
    return v


class StoreReads:
    """The read views that need only the store: results and image locations. They run beside the registry's loop
    (``_actor.run``), so an image request or a results page never waits behind task events; every transition is
    persisted before it is told, so the store knows whatever a user was told."""

    def __init__(self, cfg: RegistryConfig, store: Store) -> None:
        self.cfg, self.store = cfg, store

    async def list_results(self, msg: ListResults) -> None:
        recs = await self.store.list_results(msg.user_id, msg.limit + 1, msg.before)
        nxt = recs[msg.limit - 1].seq if len(recs) > msg.limit else None
        reply_once(msg.reply, ([task_view(self.cfg, r) | {"seq": r.seq} for r in recs[: msg.limit]], nxt))

    async def image_location(self, msg: ImageLocation) -> None:
        rec = await self.store.get_task(msg.task_id)
        n = msg.n
        if rec is None or (msg.user_id is not None and rec.user_id != msg.user_id) or not 0 <= n < len(rec.images):
            reply_once(msg.reply, None)
            return
        img = rec.images[n]
        base = self.cfg.backend_urls.get(img.backend)
        reply_once(msg.reply, (base, img) if base else None)


class Views(RegistryBase):
    def view(self, rec: TaskRecord, position: int | None = None) -> dict[str, Any]:
        return task_view(self.cfg, rec, position)

    async def record(self, task_id: str) -> TaskRecord | None:
        task = self.tasks.get(task_id)
        return task.rec if task is not None else await self.store.get_task(task_id)

    async def with_positions(self, recs: list[TaskRecord], done: Any, reply: trio.MemorySendChannel[Any]) -> None:
        """Ask the scheduler for the positions of the queued ``recs`` (one request for all), then
        ``done(positions)``."""
        queued = tuple(r.task_id for r in recs if r.state == State.QUEUED)
        if not queued:
            await done({})
            return

        async def got(answer: Any) -> None:
            found = answer if isinstance(answer, dict) else {}
            await done({t: p if isinstance(p := found.get(t), int) else None for t in queued})

        await self.request(
            self.scheduler,
            partial(sched.GetPositions, queued),
            got,
            task_id=None,
            name="scheduler",
            on_error=reply.close,
        )

    async def get_task(self, msg: GetTask) -> None:
        rec = await self.record(msg.task_id)
        if rec is None or rec.user_id != msg.user_id:
            reply_once(msg.reply, None)
            return
        found = rec

        async def done(positions: dict[str, int | None]) -> None:
            reply_once(msg.reply, self.view(found, positions.get(found.task_id)))

        await self.with_positions([rec], done, msg.reply)

    async def list_tasks(self, msg: ListTasks) -> None:
        """Live tasks come from memory, finished ones from the store; merged newest first (by task seq)."""
        user_id, limit, before = msg.user_id, msg.limit, msg.before
        recs: list[TaskRecord] = []
        if msg.which in ("active", "all"):
            recs += [t.rec for t in self.tasks.of_user(user_id) if before is None or t.rec.seq < before]
        if msg.which in ("finished", "all"):
            recs += await self.store.list_results(user_id, limit + 1, before)
        unique = {r.task_id: r for r in reversed(recs)}  # a task just finishing may be in both: memory wins
        recs = sorted(unique.values(), key=lambda r: r.seq, reverse=True)
        page = recs[:limit]
        nxt = page[-1].seq if len(recs) > limit else None

        async def done(positions: dict[str, int | None]) -> None:
            reply_once(msg.reply, ([self.view(r, positions.get(r.task_id)) | {"seq": r.seq} for r in page], nxt))

        await self.with_positions(page, done, msg.reply)
