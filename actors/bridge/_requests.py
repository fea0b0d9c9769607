"""Requests from edges to the core over Redis, and their answers back.

An edge's web layer sends to the same front inboxes as on the core (``Handles.registry``, ``Handles.ledger``);
on an edge ``ask_core`` takes each message off that inbox, appends it to the request stream ``<prefix>req``
(``rid``, the asking ``edge``, a ``deadline``, the request as JSON) and keeps its reply channel; a reader on the
edge's own answer stream ``<prefix>rep:<edge>`` hands each answer to the channel waiting for it.

On the core, ``serve_edges`` reads the request stream through the consumer group ``core``: it asks its own actors,
appends the answer to the asking edge's stream, and only then acknowledges the entry. A core that dies between
reading and acknowledging leaves the entry pending; the next core reads its pending entries first. A submit is
idempotent across that: its task id is the request id, and the registry answers a repeated one with the task
it already has; so is an admin grant: its grant id is the request id, and the store applies an id once. A
cancel is idempotent by nature, and the other requests only read. A request past its deadline is acknowledged unanswered (its asker gave up: a task must not be
created after the client was told 503).

An edge that takes the lease becomes the core that applies its own waiting requests, so their askers must not be
told 503 when the edge term ends: a ``Handover`` keeps them (and how far the edge read its answer stream) for the
process's next term. The core term first delivers the answers already in that stream (the old core's last ones),
then answers each of its own former requests directly as it applies it; one it drops past its deadline is told at
once (``ActorGone``). Without a handover (the process stops), waiting askers are told at once, as before.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import trio
from coredis.exceptions import RedisError, StreamDuplicateConsumerGroupError
from coredis.tokens import PureToken

from .._util import ActorGone, ask
from ..store import RedisStore, as_text
from ._stream import read_after
from ._wire import WireError, decode_answer, decode_request, encode_answer, encode_request

log = logging.getLogger(__name__)

GROUP = "core"
CONSUMER = "core"  # one consumer name for every core: a new core inherits its predecessor's pending entries
REQUEST_DEADLINE = 5.0  # seconds a request may wait for a core (the web layer waits ASK_TIMEOUT = 10 s)
ANSWER_TIMEOUT = 8.0  # seconds the core waits for its own actor
ANSWERS_MAXLEN = 1000  # answers kept per edge stream
BATCH = 64  # requests read at once
BLOCK_MS = 1000
PENDING_MAX_AGE = 60.0  # seconds an edge remembers a reply channel whose answer never came


class Handover:
    """An edge's waiting askers and how far it read its answer stream, kept across the process's terms (module
    docstring). One term at a time uses it: the edge term's ``ask_core``, then the core term's ``serve_edges``."""

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.last = "0-0"  # the edge's answer stream is new (its id is per process): nothing to skip
        self.waiting: dict[str, tuple[float, trio.MemorySendChannel[Any]]] = {}  # rid -> (trio time, reply)

    def answer(self, rid: str, value: Any) -> bool:
        """Hand ``value`` to the asker of ``rid``, if it still waits here (True)."""
        pending = self.waiting.pop(rid, None)
        if pending is None:
            return False
        with pending[1] as reply:
            try:
                reply.send_nowait(value)
            except (trio.BrokenResourceError, trio.WouldBlock):
                pass  # the asker gave up
        return True

    def drop(self, rid: str) -> None:
        """The asker of ``rid`` hears ActorGone (a 503) now: nobody will answer it."""
        pending = self.waiting.pop(rid, None)
        if pending is not None:
            pending[1].close()

    def expire(self) -> None:
        now = trio.current_time()
        for rid, (since, _) in list(self.waiting.items()):
            if now - since > PENDING_MAX_AGE:
                self.drop(rid)

    def deliver(self, entries: Any) -> None:
        """Answers read from the edge's answer stream, in order."""
        for entry in entries:
            self.last = as_text(entry.identifier)
            f = entry.field_values
            if f["rid"] not in self.waiting:
                continue
            try:
                value = decode_answer(f["body"])
            except WireError as exc:
                log.error("bridge: %s", exc)
                self.drop(f["rid"])
                continue
            self.answer(f["rid"], value)

    def close(self) -> None:
        for rid in list(self.waiting):
            self.drop(rid)


async def ask_core(
    store: RedisStore,
    edge_id: str,
    fronts: Mapping[str, trio.MemoryReceiveChannel[Any]],
    *,
    handover: Handover | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The edge's side: forward each front inbox's requests (``{"registry": rx, "ledger": rx}``) to the core. With
    a ``handover``, the askers still waiting when this ends are left in it for the process's next term."""
    client = store.client
    answers = store.prefix + "rep:" + edge_id
    state = handover if handover is not None else Handover(edge_id)
    waiting = state.waiting

    async def read_answers() -> None:
        while True:
            entries = await read_after(store, answers, state.last)
            state.expire()
            state.deliver(entries)

    async def forward(target: str, front: trio.MemoryReceiveChannel[Any]) -> None:
        with front:
            async for msg in front:
                try:
                    body = encode_request(target, msg)
                except WireError as exc:  # not something an edge may ask: its asker sees ActorGone (503)
                    log.warning("bridge: %s", exc)
                    msg.reply.close()
                    continue
                rid = uuid.uuid4().hex
                waiting[rid] = (trio.current_time(), msg.reply)
                try:
                    await client.xadd(
                        store.prefix + "req",
                        {"rid": rid, "edge": edge_id, "body": body, "deadline": repr(wall_clock() + REQUEST_DEADLINE)},
                    )
                except (RedisError, OSError) as exc:  # Redis is away: the asker gets ActorGone (503) now
                    log.warning("bridge: cannot hand a request to the core: %s", exc)
                    waiting.pop(rid)[1].close()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_answers)
            for target, front in fronts.items():
                nursery.start_soon(forward, target, front)
            task_status.started()
    finally:  # without a next term to answer them, whoever still waits gets ActorGone now, not a timeout
        if handover is None:
            state.close()


async def serve_edges(
    store: RedisStore,
    targets: Mapping[str, trio.MemorySendChannel[Any]],
    *,
    handover: Handover | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The core's side: answer the edges' requests with this term's actors (``{"registry": tx, "ledger": tx}``).
    With a ``handover`` (this process was an edge), its own former requests are answered to their askers here."""
    client = store.client
    key = store.prefix + "req"
    try:
        await client.xgroup_create(key, GROUP, "0", mkstream=True)
    except StreamDuplicateConsumerGroupError:
        pass  # an earlier core made it
    mine = handover if handover is not None and handover.waiting else None
    if mine is not None:  # what the old core answered before this edge term read it
        got = await client.xread({store.prefix + "rep:" + mine.edge_id: mine.last}, count=ANSWERS_MAXLEN)
        mine.deliver((got or {}).get(store.prefix + "rep:" + mine.edge_id, ()))
    task_status.started()

    def own(f: Any) -> Handover | None:
        """The handover when the request is this process's own, asked while it was an edge, and still awaited."""
        return mine if mine is not None and f["edge"] == mine.edge_id and f["rid"] in mine.waiting else None

    async def handle(entry: Any) -> None:
        f = entry.field_values
        try:
            if wall_clock() <= float(f["deadline"]):
                target, cls, fields = decode_request(f["body"])
                if cls.__name__ == "Submit":
                    fields["task_id"] = f["rid"]  # a repeated submit (core died before the ack) finds its task
                elif cls.__name__ == "Grant":
                    fields["grant_id"] = f["rid"]  # a repeated grant is not applied twice
                with trio.fail_after(ANSWER_TIMEOUT):
                    value = await ask(targets[target], lambda r: cls(**fields, reply=r), name=target)
                if (asker := own(f)) is not None:
                    asker.answer(f["rid"], value)
                else:
                    await _answer(client, store.prefix + "rep:" + f["edge"], f["rid"], value)
            else:
                log.warning("bridge: request %s from %s expired before a core read it", f["rid"], f["edge"])
                if (asker := own(f)) is not None:
                    asker.drop(f["rid"])
        except WireError as exc:
            log.error("bridge: %s", exc)
            if (asker := own(f)) is not None:
                asker.drop(f["rid"])
        except (ActorGone, trio.TooSlowError) as exc:  # this term is ending: the next core answers it
            log.warning("bridge: request %s left for the next core: %r", f.get("rid"), exc)
            return
        await client.xack(key, GROUP, [entry.identifier])

    # first what a previous core read but never acknowledged (each once), then new requests
    start = "0"
    while True:
        got = await client.xreadgroup(GROUP, CONSUMER, {key: start}, count=BATCH)
        entries = (got or {}).get(key, ())
        if not entries:
            break
        for entry in entries:
            await handle(entry)
        start = as_text(entries[-1].identifier)
    async with trio.open_nursery() as nursery:
        slots = trio.Semaphore(BATCH)  # requests answered at once
        while True:
            got = await client.xreadgroup(GROUP, CONSUMER, {key: ">"}, count=BATCH, block=BLOCK_MS)
            for entry in (got or {}).get(key, ()):
                await slots.acquire()
                nursery.start_soon(_then_release, slots, handle, entry)
            if mine is not None:
                mine.expire()


async def _answer(client: Any, stream: str, rid: str, value: Any) -> None:
    await client.xadd(
        stream,
        {"rid": rid, "body": encode_answer(value)},
        trim_strategy=PureToken.MAXLEN,
        threshold=ANSWERS_MAXLEN,
        trim_operator=PureToken.APPROXIMATELY,
    )
    await client.expire(stream, 3600)


async def _then_release(slots: trio.Semaphore, fn: Callable[[Any], Any], arg: Any) -> None:
    try:
        await fn(arg)
    finally:
        slots.release()
