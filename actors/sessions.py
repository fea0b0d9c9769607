"""Sessions: a hub actor that owns one plain ``_Session`` object per (user, clientId).

A session numbers every message it emits (``seq``, from 1), keeps the last ``replay_max`` of them (or
``replay_age`` seconds) for replay after a reconnect, and fans each one out to every live connection of that
session. A connection is represented here by its ``Sink`` (``web._outbox.Outbox``): a bounded, coalescing queue
that the session fills without ever blocking and the connection's writer drains. When the outbox is over budget,
progress and previews are coalesced (the latest per task wins) or dropped and counted; every other message type is
never dropped: a connection that cannot take one is marked "slow consumer" and closed by its writer, and the
client resumes from its last seq.

Per user, at most ``max_sessions_per_user`` sessions exist: a new one drops the least recently used session that
has no connection, and a ``Connect`` is refused when every one is connected. A message for all of a user's sessions
(``balance``) goes only to the sessions with a live connection, so its cost is O(live connections), not O(sessions
ever made); a session without one gets the user's latest such message when a connection next attaches to it.

A message costs one hop: ledger/registry -> hub, then method calls (session -> outbox ``put_nowait``); the hub never
waits on anything downstream, so the flow has no cycle. Each message is encoded once, however many connections
get it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ._outgoing import DROPPABLE_TYPES, Outgoing, encode_body
from ._util import reply_once
from .wire import Resync

log = logging.getLogger(__name__)

__all__ = [
    "BROADCAST_DESTINATION",
    "DEFAULT_MAX_SESSIONS_PER_USER",
    "DEFAULT_REPLAY_AGE",
    "DEFAULT_REPLAY_MAX",
    "DROPPABLE_TYPES",
    "USER_DESTINATION",
    "Attach",
    "AttachBroadcast",
    "Broadcast",
    "Connect",
    "Detach",
    "DetachBroadcast",
    "Disconnect",
    "GetStats",
    "HubMsg",
    "HubStats",
    "Outgoing",
    "Publish",
    "Sink",
    "encode_body",
    "run",
]

USER_DESTINATION = "/user/topic/messages"
BROADCAST_DESTINATION = "/topic/messages"

DEFAULT_REPLAY_MAX = 300  # messages kept per session for replay
DEFAULT_REPLAY_AGE = 300.0  # seconds a message stays replayable
DEFAULT_IDLE_TTL = 300.0  # seconds a session without connections is kept (for replay after a reconnect)
DEFAULT_MAX_SESSIONS_PER_USER = 64  # beyond it the least recently used session with no connection is dropped
HUB_BATCH = 1024  # messages the hub handles in a row before it yields (see ``run``)


class Sink(Protocol):
    """Where a session's messages go: a connection's outbox (``web._outbox.Outbox``), filled without blocking."""

    def put_nowait(self, out: Outgoing, /) -> None: ...


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
    outbox: Sink
    last_seq: int | None
    reply: trio.MemorySendChannel[int] | None = None


@dataclass(frozen=True, slots=True)
class Connect:
    """A STOMP connection for (user, clientId) opens: make room for its session. Replies False when the user
    already has ``max_sessions_per_user`` sessions and every one is connected (the CONNECT is refused)."""

    user_id: str
    client_id: str
    reply: trio.MemorySendChannel[bool]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The connection that sent ``Connect`` (and was accepted) closed."""

    user_id: str
    client_id: str


@dataclass(frozen=True, slots=True)
class Detach:
    user_id: str
    client_id: str
    outbox: Sink


@dataclass(frozen=True, slots=True)
class AttachBroadcast:
    outbox: Sink


@dataclass(frozen=True, slots=True)
class DetachBroadcast:
    outbox: Sink


@dataclass(frozen=True, slots=True)
class HubStats:
    sessions: int
    connections: int
    broadcast_subscribers: int


@dataclass(frozen=True, slots=True)
class GetStats:
    reply: trio.MemorySendChannel[HubStats]


HubMsg = Publish | Broadcast | Attach | Detach | Connect | Disconnect | AttachBroadcast | DetachBroadcast | GetStats


def _outgoing(destination: str, seq: int, body: Mapping[str, Any]) -> Outgoing:
    return _encoded(destination, seq, encode_body(body), str(body.get("type", "")), str(body.get("taskId", "")))


def _encoded(destination: str, seq: int, data: bytes, kind: str, task_id: str) -> Outgoing:
    key = (kind, task_id) if kind in DROPPABLE_TYPES else None
    return Outgoing(destination, seq, data, kind, key, trio.current_time())


class _Session:
    """One (user, clientId): its seq counter, its replay buffer and its set of outboxes. A plain object owned by
    the hub (no task, no inbox): delivering to it is a method call.

    Its seqs start above ``seq_base``, which the gateway makes larger on every run ((boot - 1) x 10^9), so a
    ``last-seq`` remembered from an earlier run is always "older than the buffer" and gets a ``resync`` instead
    of silently skipping this run's first messages. ``last-seq: 0`` still means "everything buffered".
    Replay entries are ``Outgoing`` named tuples of atoms (the body already encoded): the GC stops tracking them.
    """

    __slots__ = (
        "connected",
        "connections",
        "idle_since",
        "name",
        "outboxes",
        "replay",
        "replay_age",
        "seq",
        "seq_base",
        "user_version",
    )

    def __init__(
        self, name: str, *, replay_max: int, replay_age: float, seq_base: int, now: float, user_version: int
    ) -> None:
        self.name = name
        self.seq = self.seq_base = seq_base
        self.replay: deque[Outgoing] = deque(maxlen=replay_max)
        self.replay_age = replay_age
        self.outboxes: list[Sink] = []
        self.connections = 0  # attached outboxes
        self.connected = 0  # accepted Connects not yet Disconnected
        self.idle_since = now
        self.user_version = user_version  # the last user-wide message (Publish to client_id None) this session has

    @property
    def live(self) -> bool:
        return self.connections > 0 or self.connected > 0

    def deliver(self, data: bytes, kind: str, task_id: str, given: int | None = None) -> None:
        """Number an encoded message (or take its ``given`` seq, numbered upstream: then skip what this session
        already has), keep it for replay and queue it on every attached outbox."""
        if given is not None:
            if given <= self.seq:
                return
            self.seq = given - 1
        self.seq += 1
        out = _encoded(USER_DESTINATION, self.seq, data, kind, task_id)
        self.replay.append(out)
        for ob in self.outboxes:
            ob.put_nowait(out)

    def attach(self, outbox: Sink, last_seq: int | None) -> int:
        """Queue what ``outbox`` missed after ``last_seq`` (or a ``resync``), then deliver to it; returns the seq."""
        replay, seq = self.replay, self.seq
        horizon = trio.current_time() - self.replay_age
        while replay and replay[0].created < horizon:
            replay.popleft()
        if last_seq == 0:  # a client that has seen nothing yet
            last_seq = self.seq_base
        if last_seq is not None and last_seq != seq:
            oldest = replay[0].seq if replay else seq + 1
            if last_seq > seq or last_seq + 1 < oldest:
                # the gap cannot be filled: tell the client to reload over HTTP first
                log.info("session %s: resync (client at %d, have %d..%d)", self.name, last_seq, oldest, seq)
                outbox.put_nowait(_outgoing(USER_DESTINATION, oldest - 1, Resync().to_wire()))
                last_seq = oldest - 1
            for out in replay:
                if out.seq > last_seq:
                    outbox.put_nowait(out)
        self.outboxes.append(outbox)
        return seq

    def detach(self, outbox: Sink) -> None:
        if outbox in self.outboxes:
            self.outboxes.remove(outbox)


async def run(
    inbox: trio.MemoryReceiveChannel[HubMsg],
    *,
    replay_max: int = DEFAULT_REPLAY_MAX,
    replay_age: float = DEFAULT_REPLAY_AGE,
    idle_ttl: float = DEFAULT_IDLE_TTL,
    seq_base: int = 0,
    max_sessions_per_user: int = DEFAULT_MAX_SESSIONS_PER_USER,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The hub: owns every session (created on first use) and broadcasts to subscribers.
    ``seq_base``: where every session's seq starts (see ``_Session``).

    It drains its inbox without a checkpoint per message (``receive_nowait``), yielding every ``HUB_BATCH``
    messages and whenever the inbox is empty: a burst reaches the outboxes before their writers run, so each
    writer sends it as one WebSocket message; when traffic is thin a message is handled as soon as it arrives."""
    sessions: dict[tuple[str, str], _Session] = {}
    by_user: dict[str, dict[str, None]] = {}  # user -> its clientIds, least recently used first
    live_by_user: dict[str, set[str]] = {}  # user -> clientIds of its sessions with a live connection
    user_latest: dict[str, tuple[int, Mapping[str, Any]]] = {}  # user -> (version, latest user-wide message)
    broadcast: list[Sink] = []
    broadcast_seq = 0
    latest_status: Outgoing | None = None  # a new subscriber gets the current status at once

    def drop(key: tuple[str, str]) -> None:
        del sessions[key]
        cids = by_user[key[0]]
        cids.pop(key[1], None)
        if not cids:
            del by_user[key[0]]
            user_latest.pop(key[0], None)

    def touch(user_id: str, client_id: str) -> None:
        cids = by_user[user_id]
        cids.pop(client_id, None)
        cids[client_id] = None  # most recently used last

    def set_live(user_id: str, client_id: str, entry: _Session) -> None:
        if entry.live:
            live_by_user.setdefault(user_id, set()).add(client_id)
        elif (live := live_by_user.get(user_id)) is not None:
            live.discard(client_id)
            if not live:
                del live_by_user[user_id]
            entry.idle_since = trio.current_time()

    def session(user_id: str, client_id: str, *, force: bool = True) -> _Session | None:
        """The session, created on first use. Over the per-user limit, the least recently used session with no
        live connection makes room; when all are live, None (or, with ``force``, the limit is passed: a task's
        own messages are never dropped, and live sessions are bounded by connections per user anyway)."""
        key = (user_id, client_id)
        entry = sessions.get(key)
        if entry is None:
            cids = by_user.get(user_id, {})
            if len(cids) >= max_sessions_per_user:
                victim = next((c for c in cids if not sessions[(user_id, c)].live), None)
                if victim is not None:
                    log.info("sessions: %s has %d sessions: dropping idle %s", user_id, len(cids), victim)
                    drop((user_id, victim))
                elif not force:
                    return None
            version = user_latest[user_id][0] if user_id in user_latest else 0
            entry = sessions[key] = _Session(
                f"{user_id}/{client_id}",
                replay_max=replay_max,
                replay_age=replay_age,
                seq_base=seq_base,
                now=trio.current_time(),
                user_version=version,
            )
            by_user.setdefault(user_id, {})[client_id] = None
        else:
            touch(user_id, client_id)
        return entry

    def catch_up(user_id: str, entry: _Session) -> None:
        """A session that missed user-wide messages while it had no connection gets the latest one now."""
        latest = user_latest.get(user_id)
        if latest is not None and entry.user_version < latest[0]:
            entry.user_version = latest[0]
            body = latest[1]
            entry.deliver(encode_body(body), str(body.get("type", "")), str(body.get("taskId", "")))

    def sweep() -> None:
        now = trio.current_time()
        for key, entry in list(sessions.items()):
            if not entry.live and now - entry.idle_since > idle_ttl:
                drop(key)

    def handle(msg: HubMsg) -> None:
        nonlocal broadcast_seq, latest_status
        entry: _Session | None
        match msg:
            case Publish(user_id, None, body):
                if user_id in by_user:
                    version = user_latest[user_id][0] + 1 if user_id in user_latest else 1
                    user_latest[user_id] = (version, body)
                    data = None  # encoded once for all of the user's live sessions
                    for cid in live_by_user.get(user_id, ()):
                        live = sessions[(user_id, cid)]
                        live.user_version = version
                        if data is None:
                            data = encode_body(body)
                        live.deliver(data, str(body.get("type", "")), str(body.get("taskId", "")))
            case Publish(user_id, str() as client_id, body, seq):
                entry = session(user_id, client_id)
                assert entry is not None
                entry.deliver(encode_body(body), str(body.get("type", "")), str(body.get("taskId", "")), seq)
            case Broadcast(body):
                broadcast_seq += 1
                out = _outgoing(BROADCAST_DESTINATION, broadcast_seq, body)  # encoded once for every subscriber
                if out.type == "status":
                    latest_status = out
                for ob in broadcast:
                    ob.put_nowait(out)
            case Connect(user_id, client_id, reply):
                entry = session(user_id, client_id, force=False)
                if entry is not None:
                    entry.connected += 1
                    set_live(user_id, client_id, entry)
                reply_once(reply, entry is not None)
            case Disconnect(user_id, client_id):
                entry = sessions.get((user_id, client_id))
                if entry is not None and entry.connected > 0:
                    entry.connected -= 1
                    set_live(user_id, client_id, entry)
            case Attach(user_id, client_id, outbox, last_seq, reply):
                entry = session(user_id, client_id)
                assert entry is not None
                catch_up(user_id, entry)
                entry.connections += 1
                set_live(user_id, client_id, entry)
                seq = entry.attach(outbox, last_seq)
                if reply is not None:
                    reply_once(reply, seq)
            case Detach(user_id, client_id, outbox):
                entry = sessions.get((user_id, client_id))
                if entry is not None:
                    entry.connections = max(0, entry.connections - 1)  # never below: a defensive floor
                    set_live(user_id, client_id, entry)
                    entry.detach(outbox)
            case AttachBroadcast(outbox):
                broadcast.append(outbox)
                if latest_status is not None:
                    outbox.put_nowait(latest_status)
            case DetachBroadcast(outbox):
                if outbox in broadcast:
                    broadcast.remove(outbox)
            case GetStats(reply):
                reply_once(
                    reply, HubStats(len(sessions), sum(e.connections for e in sessions.values()), len(broadcast))
                )

    task_status.started()
    next_sweep = trio.current_time() + idle_ttl
    with inbox:
        while True:
            try:
                for _ in range(HUB_BATCH):
                    handle(inbox.receive_nowait())
            except trio.WouldBlock:  # drained: sleep until the next message (or the sweep)
                with trio.move_on_at(next_sweep):
                    try:
                        handle(await inbox.receive())
                    except trio.EndOfChannel:
                        break
            except trio.EndOfChannel:
                break
            else:
                await trio.lowlevel.checkpoint()  # HUB_BATCH in a row: let the writers (and everyone) run
            if trio.current_time() >= next_sweep:
                sweep()
                next_sweep = trio.current_time() + min(idle_ttl, 60.0)
