"""Sessions: a hub plus one session actor per (user, clientId).

A session numbers every message it emits (``seq``, from 1), keeps the last ``replay_max`` of them (or
``replay_age`` seconds) for replay after a reconnect, and fans each one out to every live connection of that
session. A connection is represented here by its ``Outbox``: a bounded, coalescing queue that the session
fills without ever blocking and the connection's writer drains. When the outbox is over budget, progress and previews
are coalesced (the latest per task wins) or dropped and counted; every other message type is never dropped: a connection that cannot take one is marked "slow consumer" and closed by its writer, and the
client resumes from its last seq.

Per user, at most ``max_sessions_per_user`` sessions exist: a new one drops the least recently used session that
has no connection, and a ``Connect`` is refused when every one is connected. A message for all of a user's sessions
(``balance``) goes only to the sessions with a live connection, so its cost is O(live connections), not O(sessions
ever made); a session without one gets the user's latest such message when a connection next attaches to it.

The hub never waits on a session for long (a session only ever does non-blocking puts), and sessions never
send to anyone, so the flow ledger/registry -> hub -> session -> outbox has no cycle.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from ._outbox import DROPPABLE_TYPES, Outbox, Outgoing, SlowConsumer, encode_body
from ._util import reply_once
from .wire import Resync

log = logging.getLogger(__name__)

__all__ = [
    "BROADCAST_DESTINATION", "DEFAULT_MAX_SESSIONS_PER_USER", "DEFAULT_REPLAY_AGE", "DEFAULT_REPLAY_MAX",
    "DROPPABLE_TYPES", "USER_DESTINATION", "Attach", "AttachBroadcast", "Broadcast", "Connect", "Detach",
    "DetachBroadcast", "Disconnect", "GetStats", "HubMsg", "HubStats", "Outbox", "Outgoing", "Publish",
    "SlowConsumer", "encode_body", "run",
]

USER_DESTINATION = "/user/topic/messages"
BROADCAST_DESTINATION = "/topic/messages"

DEFAULT_REPLAY_MAX = 300  # messages kept per session for replay
DEFAULT_REPLAY_AGE = 300.0  # seconds a message stays replayable
DEFAULT_IDLE_TTL = 300.0  # seconds a session without connections is kept (for replay after a reconnect)
DEFAULT_MAX_SESSIONS_PER_USER = 64  # beyond it the least recently used session with no connection is dropped
SESSION_INBOX = 64


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


HubMsg = Publish | Broadcast | Attach | Detach | Connect | Disconnect | AttachBroadcast | DetachBroadcast | GetStats


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
                            outbox.put_nowait(_outgoing(USER_DESTINATION, oldest - 1, Resync().to_wire()))
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
    connections: int = 0  # attached outboxes
    connected: int = 0  # accepted Connects not yet Disconnected
    idle_since: float = 0.0
    user_version: int = 0  # the last user-wide message (Publish to client_id None) this session has

    @property
    def live(self) -> bool:
        return self.connections > 0 or self.connected > 0


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
    """The hub: routes messages to session actors (created on first use) and broadcasts to subscribers.
    ``seq_base``: where every session's seq starts (see ``_run_session``)."""
    sessions: dict[tuple[str, str], _SessionEntry] = {}
    by_user: dict[str, dict[str, None]] = {}  # user -> its clientIds, least recently used first
    live_by_user: dict[str, set[str]] = {}  # user -> clientIds of its sessions with a live connection
    user_latest: dict[str, tuple[int, Mapping[str, Any]]] = {}  # user -> (version, latest user-wide message)
    broadcast: list[Outbox] = []
    broadcast_seq = 0
    latest_status: Outgoing | None = None  # a new subscriber gets the current status at once

    def drop(key: tuple[str, str]) -> None:
        entry = sessions.pop(key)
        entry.inbox.close()  # the session actor ends when its inbox closes
        cids = by_user[key[0]]
        cids.pop(key[1], None)
        if not cids:
            del by_user[key[0]]
            user_latest.pop(key[0], None)

    def touch(user_id: str, client_id: str) -> None:
        cids = by_user[user_id]
        cids.pop(client_id, None)
        cids[client_id] = None  # most recently used last

    def set_live(user_id: str, client_id: str, entry: _SessionEntry) -> None:
        if entry.live:
            live_by_user.setdefault(user_id, set()).add(client_id)
        elif (live := live_by_user.get(user_id)) is not None:
            live.discard(client_id)
            if not live:
                del live_by_user[user_id]
            entry.idle_since = trio.current_time()

    def session(nursery: trio.Nursery, user_id: str, client_id: str, *, force: bool = True) -> _SessionEntry | None:
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
            send, recv = trio.open_memory_channel[_SessionMsg](SESSION_INBOX)
            nursery.start_soon(
                partial(_run_session, f"{user_id}/{client_id}", recv, replay_max=replay_max, replay_age=replay_age,
                        seq_base=seq_base)
            )
            version = user_latest[user_id][0] if user_id in user_latest else 0
            entry = sessions[key] = _SessionEntry(send, idle_since=trio.current_time(), user_version=version)
            by_user.setdefault(user_id, {})[client_id] = None
        else:
            touch(user_id, client_id)
        return entry

    async def catch_up(user_id: str, entry: _SessionEntry) -> None:
        """A session that missed user-wide messages while it had no connection gets the latest one now."""
        latest = user_latest.get(user_id)
        if latest is not None and entry.user_version < latest[0]:
            entry.user_version = latest[0]
            await entry.inbox.send(_Deliver(latest[1]))

    def sweep() -> None:
        now = trio.current_time()
        for key, entry in list(sessions.items()):
            if not entry.live and now - entry.idle_since > idle_ttl:
                drop(key)

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
                        if user_id in by_user:
                            version = user_latest[user_id][0] + 1 if user_id in user_latest else 1
                            user_latest[user_id] = (version, body)
                            for cid in live_by_user.get(user_id, ()):
                                entry = sessions[(user_id, cid)]
                                entry.user_version = version
                                await entry.inbox.send(_Deliver(body))
                    case Publish(user_id, client_id, body, seq):
                        entry = session(nursery, user_id, client_id)
                        assert entry is not None
                        await entry.inbox.send(_Deliver(body, seq))
                    case Broadcast(body):
                        broadcast_seq += 1
                        out = _outgoing(BROADCAST_DESTINATION, broadcast_seq, body)
                        if out.type == "status":
                            latest_status = out
                        for ob in broadcast:
                            ob.put_nowait(out)
                    case Connect(user_id, client_id, reply):
                        entry = session(nursery, user_id, client_id, force=False)
                        if entry is not None:
                            entry.connected += 1
                            set_live(user_id, client_id, entry)
                        reply_once(reply, entry is not None)
                    case Disconnect(user_id, client_id):
                        entry = sessions.get((user_id, client_id))
                        if entry is not None and entry.connected > 0:
                            entry.connected -= 1
                            set_live(user_id, client_id, entry)
                    case Attach(user_id, client_id):
                        entry = session(nursery, user_id, client_id)
                        assert entry is not None
                        await catch_up(user_id, entry)
                        entry.connections += 1
                        set_live(user_id, client_id, entry)
                        await entry.inbox.send(msg)
                    case Detach(user_id, client_id):
                        entry = sessions.get((user_id, client_id))
                        if entry is not None:
                            entry.connections = max(0, entry.connections - 1)  # never below: a defensive floor
                            set_live(user_id, client_id, entry)
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
