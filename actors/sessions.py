"""Sessions: a hub plus one session actor per (user, clientId).

A session numbers every message it emits (``seq``, from 1), keeps the last ``replay_max`` of them (or
``replay_age`` seconds) for replay after a reconnect, and fans each one out to every live connection of that
session. A connection is represented here by its ``Outbox``: a bounded, coalescing queue that the session
fills without ever blocking and the connection's writer drains. When the outbox is over budget, progress and previews
are coalesced (the latest per task wins) or dropped and counted; every other message type is never dropped: a connection that cannot take one is marked "slow consumer" and closed by its writer, and the
client resumes from its last seq.

The hub never waits on a session for long (a session only ever does non-blocking puts), and sessions never
send to anyone, so the flow ledger/registry -> hub -> session -> outbox has no cycle.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from ._util import reply_once

log = logging.getLogger(__name__)

USER_DESTINATION = "/user/topic/messages"
BROADCAST_DESTINATION = "/topic/messages"

# message types a full outbox may coalesce or drop (latest per task wins); all others are never dropped
DROPPABLE_TYPES = frozenset({"progress", "preview", "status"})

DEFAULT_REPLAY_MAX = 300  # messages kept per session for replay
DEFAULT_REPLAY_AGE = 300.0  # seconds a message stays replayable
DEFAULT_IDLE_TTL = 300.0  # seconds a session without connections is kept (for replay after a reconnect)
DEFAULT_OUTBOX_BYTES = 1 << 20  # 1 MiB of queued frames per connection
DEFAULT_OUTBOX_DELAY = 10.0  # seconds the oldest queued frame may wait before the client is "slow"
SESSION_INBOX = 64


def encode_body(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message ready for a connection's writer. ``seq`` is the session's number (0 for broadcasts)."""

    destination: str
    seq: int
    body: bytes
    type: str
    coalesce_key: tuple[str, str] | None = None
    created: float = 0.0


class SlowConsumer(Exception):
    """The connection could not keep up: an undroppable message did not fit, or frames waited too long."""


class Outbox:
    """A connection's outbound queue: bounded in bytes, coalescing, never blocking the producer.

    Producers (its session, the hub) call ``put_nowait``; the connection's writer calls ``get_batch``.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_OUTBOX_BYTES, max_delay: float = DEFAULT_OUTBOX_DELAY) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, not {max_bytes!r}")
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self._items: deque[list[Outgoing | None]] = deque()  # one-element lists; None = coalesced away
        self._by_key: dict[tuple[str, str], list[Outgoing | None]] = {}
        self._bytes = 0
        self._since: float | None = None  # when the oldest waiting item was queued
        self._wake = trio.Event()
        self.failed: str | None = None
        self.delivered = 0
        self.dropped = 0
        self.coalesced = 0

    def __repr__(self) -> str:
        return f"<Outbox {len(self._items)} items, {self._bytes} bytes, dropped={self.dropped} failed={self.failed!r}>"

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put_nowait(self, out: Outgoing) -> None:
        """Queue ``out``. Only when the outbox is over budget are droppable messages coalesced (the older one of
        the same task and type leaves the queue, this one goes last, so seqs stay in order) or dropped."""
        if self.failed is not None:
            return
        size = len(out.body)
        if self._bytes + size > self.max_bytes:
            if out.type not in DROPPABLE_TYPES:
                self._evict_droppable(size)
                if self._bytes + size > self.max_bytes:
                    self.fail(f"slow consumer: more than {self.max_bytes} bytes waiting")
                    return
            slot = self._by_key.get(out.coalesce_key) if out.coalesce_key is not None else None
            if slot is not None and slot[0] is not None:
                self._bytes -= len(slot[0].body)
                slot[0] = None  # latest wins: the older one is skipped by get_batch
                self.coalesced += 1
            if self._bytes + size > self.max_bytes:
                self.dropped += 1
                return
        slot = [out]
        self._items.append(slot)
        if out.coalesce_key is not None:
            self._by_key[out.coalesce_key] = slot
        self._bytes += size
        if self._since is None:
            self._since = trio.current_time()
        self._wake.set()

    def _evict_droppable(self, size: int) -> None:
        """Make room for an undroppable message by dropping waiting progress/previews, oldest first."""
        for slot in self._items:
            if self._bytes + size <= self.max_bytes:
                return
            item = slot[0]
            if item is not None and item.type in DROPPABLE_TYPES:
                self._bytes -= len(item.body)
                slot[0] = None
                self.dropped += 1

    def fail(self, reason: str) -> None:
        """Give up on this connection (the writer raises SlowConsumer with ``reason``)."""
        if self.failed is None:
            self.failed = reason
            self._items.clear()
            self._by_key.clear()
            self._bytes = 0
        self._wake.set()

    def overdue(self) -> bool:
        """True when the oldest waiting frame has waited longer than ``max_delay``."""
        return self._since is not None and trio.current_time() - self._since > self.max_delay

    async def get_batch(self) -> list[Outgoing]:
        """Wait for at least one item and take every waiting item. Raises SlowConsumer once failed."""
        while not self._items and self.failed is None:
            await self._wake.wait()
            self._wake = trio.Event()
        if self.failed is not None:
            raise SlowConsumer(self.failed)
        batch = [slot[0] for slot in self._items if slot[0] is not None]
        self._items.clear()
        self._by_key.clear()
        self._bytes = 0
        self._since = None
        self.delivered += len(batch)
        return batch


# ---- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """A message for one session (``client_id``) or, with ``client_id=None``, every session of the user."""

    user_id: str
    client_id: str | None
    body: Mapping[str, Any]
    seq: int | None = None  # numbered already (Redis mode: by the store, for every process alike); else here


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A message for every connection subscribed to /topic/messages."""

    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Attach:
    """Start delivering a session's messages to ``outbox``: first the ones after ``last_seq`` (if given)."""

    user_id: str
    client_id: str
    outbox: Outbox
    last_seq: int | None
    reply: trio.MemorySendChannel[int] | None = None


@dataclass(frozen=True, slots=True)
class Detach:
    user_id: str
    client_id: str
    outbox: Outbox


@dataclass(frozen=True, slots=True)
class AttachBroadcast:
    outbox: Outbox


@dataclass(frozen=True, slots=True)
class DetachBroadcast:
    outbox: Outbox


@dataclass(frozen=True, slots=True)
class HubStats:
    sessions: int
    connections: int
    broadcast_subscribers: int


@dataclass(frozen=True, slots=True)
class GetStats:
    reply: trio.MemorySendChannel[HubStats]


HubMsg = Publish | Broadcast | Attach | Detach | AttachBroadcast | DetachBroadcast | GetStats


@dataclass(frozen=True, slots=True)
class _Deliver:
    body: Mapping[str, Any]
    seq: int | None = None


_SessionMsg = _Deliver | Attach | Detach


def _outgoing(destination: str, seq: int, body: Mapping[str, Any]) -> Outgoing:
    kind = str(body.get("type", ""))
    key = None
    if kind in DROPPABLE_TYPES:
        key = (kind, str(body.get("taskId", "")))
    return Outgoing(destination, seq, encode_body(body), kind, key, trio.current_time())


async def _run_session(
    name: str, inbox: trio.MemoryReceiveChannel[_SessionMsg], *, replay_max: int, replay_age: float, seq_base: int = 0
) -> None:
    """One session actor: owns its seq counter, its replay buffer and its set of outboxes.

    Its seqs start above ``seq_base``, which the gateway makes larger on every run ((boot - 1) x 10^9), so a
    ``last-seq`` remembered from an earlier run is always "older than the buffer" and gets a ``resync`` instead
    of silently skipping this run's first messages. ``last-seq: 0`` still means "everything buffered".
    """
    seq = seq_base
    replay: deque[Outgoing] = deque(maxlen=replay_max)
    outboxes: list[Outbox] = []
    with inbox:
        async for msg in inbox:
            match msg:
                case _Deliver(body, given):
                    if given is not None:  # numbered upstream: skip what this session has already
                        if given <= seq:
                            continue
                        seq = given - 1
                    seq += 1
                    out = _outgoing(USER_DESTINATION, seq, body)
                    replay.append(out)
                    for ob in outboxes:
                        ob.put_nowait(out)
                case Attach(outbox=outbox, last_seq=last_seq, reply=reply):
                    horizon = trio.current_time() - replay_age
                    while replay and replay[0].created < horizon:
                        replay.popleft()
                    if last_seq == 0:  # a client that has seen nothing yet
                        last_seq = seq_base
                    if last_seq is not None and last_seq != seq:
                        oldest = replay[0].seq if replay else seq + 1
                        if last_seq > seq or last_seq + 1 < oldest:
                            # the gap cannot be filled: tell the client to reload over HTTP first
                            log.info("session %s: resync (client at %d, have %d..%d)", name, last_seq, oldest, seq)
                            outbox.put_nowait(_outgoing(USER_DESTINATION, oldest - 1, {"type": "resync"}))
                            last_seq = oldest - 1
                        for out in replay:
                            if out.seq > last_seq:
                                outbox.put_nowait(out)
                    outboxes.append(outbox)
                    if reply is not None:
                        reply_once(reply, seq)
                case Detach(outbox=outbox):
                    if outbox in outboxes:
                        outboxes.remove(outbox)


@dataclass(slots=True)
class _SessionEntry:
    inbox: trio.MemorySendChannel[_SessionMsg]
    connections: int = 0
    idle_since: float = 0.0


async def run(
    inbox: trio.MemoryReceiveChannel[HubMsg],
    *,
    replay_max: int = DEFAULT_REPLAY_MAX,
    replay_age: float = DEFAULT_REPLAY_AGE,
    idle_ttl: float = DEFAULT_IDLE_TTL,
    seq_base: int = 0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The hub: routes messages to session actors (created on first use) and broadcasts to subscribers.
    ``seq_base``: where every session's seq starts (see ``_run_session``)."""
    sessions: dict[tuple[str, str], _SessionEntry] = {}
    by_user: dict[str, set[str]] = {}
    broadcast: list[Outbox] = []
    broadcast_seq = 0
    latest_status: Outgoing | None = None  # a new subscriber gets the current status at once

    def session(nursery: trio.Nursery, user_id: str, client_id: str) -> _SessionEntry:
        key = (user_id, client_id)
        entry = sessions.get(key)
        if entry is None:
            send, recv = trio.open_memory_channel[_SessionMsg](SESSION_INBOX)
            nursery.start_soon(
                partial(_run_session, f"{user_id}/{client_id}", recv, replay_max=replay_max, replay_age=replay_age,
                        seq_base=seq_base)
            )
            entry = sessions[key] = _SessionEntry(send, idle_since=trio.current_time())
            by_user.setdefault(user_id, set()).add(client_id)
        return entry

    def sweep() -> None:
        now = trio.current_time()
        for key, entry in list(sessions.items()):
            if entry.connections == 0 and now - entry.idle_since > idle_ttl:
                entry.inbox.close()  # the session actor ends when its inbox closes
                del sessions[key]
                by_user[key[0]].discard(key[1])
                if not by_user[key[0]]:
                    del by_user[key[0]]

    async with trio.open_nursery() as nursery:
        task_status.started()
        next_sweep = trio.current_time() + idle_ttl
        with inbox:
            while True:
                msg = None
                with trio.move_on_at(next_sweep):
                    try:
                        msg = await inbox.receive()
                    except trio.EndOfChannel:
                        break
                if msg is None:
                    sweep()
                    next_sweep = trio.current_time() + min(idle_ttl, 60.0)
                    continue
                match msg:
                    case Publish(user_id, None, body):
                        for cid in by_user.get(user_id, ()):
                            await sessions[(user_id, cid)].inbox.send(_Deliver(body))
                    case Publish(user_id, client_id, body, seq):
                        await session(nursery, user_id, client_id).inbox.send(_Deliver(body, seq))
                    case Broadcast(body):
                        broadcast_seq += 1
                        out = _outgoing(BROADCAST_DESTINATION, broadcast_seq, body)
                        if out.type == "status":
                            latest_status = out
                        for ob in broadcast:
                            ob.put_nowait(out)
                    case Attach(user_id, client_id):
                        entry = session(nursery, user_id, client_id)
                        entry.connections += 1
                        await entry.inbox.send(msg)
                    case Detach(user_id, client_id):
                        entry = sessions.get((user_id, client_id))
                        if entry is not None:
                            entry.connections -= 1
                            entry.idle_since = trio.current_time()
                            await entry.inbox.send(msg)
                    case AttachBroadcast(outbox):
                        broadcast.append(outbox)
                        if latest_status is not None:
                            outbox.put_nowait(latest_status)
                    case DetachBroadcast(outbox):
                        if outbox in broadcast:
                            broadcast.remove(outbox)
                    case GetStats(reply):
                        reply_once(
                            reply,
                            HubStats(len(sessions), sum(e.connections for e in sessions.values()), len(broadcast)),
                        )
        for entry in sessions.values():
            entry.inbox.close()
