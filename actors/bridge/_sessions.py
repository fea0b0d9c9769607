"""Session messages across processes: the core publishes into Redis, each process feeds its own hub from it.

``publish_to_redis`` takes what the core actors send to "the sessions" (``Publish``, ``Broadcast``) and, a batch
per script call, numbers each session's message (``<prefix>sseq:<user>:<client>``), appends it to the session's
capped stream (``<prefix>sess:<user>:<client>``, ``MAXLEN ~ replay_max``: the replay buffer every process shares)
and routes it to the processes where the session is attached: ``<prefix>at:<user>:<client>`` is the set of their
ids, and each process reads its own events stream ``<prefix>ev:<id>``. So a process reads (and parses) only the
messages of its own connections, and adding a process adds capacity. A message for all of a user's sessions goes
to each session in ``<prefix>sessions:<user>`` (sessions that ever connected or were published to). A broadcast
goes to every live process (``<prefix>evprocs``); the latest one is also kept (``<prefix>lastbroadcast``) for hubs
that start later.

``feed_hub`` sits in front of this process's sessions hub: it passes the web layer's messages on, and delivers its
events stream's messages with their seqs (the hub skips seqs it has). On ``Attach`` it first registers the session
in ``at:`` and then copies the session's stream into the hub: a message published before the registration is in
the copy, one published after it comes through the events stream too (the hub drops the second), so a client that
reconnects to any process resumes with its ``last-seq`` and misses nothing the stream still holds. A process's
events stream expires ``PROC_STREAM_TTL`` after its last refresh, and the script drops the ids of processes whose
stream is gone (a killed process costs nothing for long); a process that finds its own stream gone (it was stalled
that long, or Redis lost it) makes it again, registers every attached session again and copies their streams.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio
from coredis.exceptions import RedisError

from .._util import Forwarder
from ..sessions import HUB_BATCH, Attach, Broadcast, Detach, HubMsg, Publish, encode_body
from ..store import RedisStore, as_text
from ..wire import Resync
from ._stream import BATCH, RETRY_DELAY, read_after

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 10_000  # messages a process's events stream keeps (what a slow process may still catch up on)
SESSION_KEY_TTL = 24 * 3600  # seconds a session's stream and the user's session set outlive their last message
PUBLISH_LINGER = 0.001  # seconds the core's publisher waits to fill a batch (adds at most this to a message's latency)
BACKFILL_PATIENCE = 10.0  # seconds an attach waits for Redis to copy the session's stream (a restart is shorter)
PROC_STREAM_TTL = 60.0  # seconds a process's events stream outlives its last refresh (then nothing is routed to it)
REFRESH_EVERY = PROC_STREAM_TTL / 4  # how often a process refreshes its stream
REREGISTER_EVERY = SESSION_KEY_TTL / 4  # how often a process registers its attached sessions again (``at:`` TTL)
REGISTER_BATCH = 500  # sessions registered per script call
UNREGISTER_PATIENCE = 2.0  # seconds a detach waits for Redis to stop routing the session here

PUBLISH = r"""
local P = KEYS[1]
local rmax, emax, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function deliver(u, c, body)
  local ck = P .. 'sseq:' .. u .. ':' .. c
  local seq = redis.call('INCR', ck)
  redis.call('EXPIRE', ck, 7 * 86400)
  local sk = P .. 'sess:' .. u .. ':' .. c
  redis.call('XADD', sk, 'MAXLEN', '~', rmax, '*', 's', seq, 'b', body)
  redis.call('EXPIRE', sk, ttl)
  local ak = P .. 'at:' .. u .. ':' .. c  -- the processes where the session is attached
  for _, id in ipairs(redis.call('SMEMBERS', ak)) do
    local ek = P .. 'ev:' .. id
    if redis.call('EXISTS', ek) == 1 then
      redis.call('XADD', ek, 'MAXLEN', '~', emax, '*', 'u', u, 'c', c, 's', seq, 'b', body)
    else
      redis.call('SREM', ak, id)  -- that process is gone
    end
  end
end
for i = 4, #ARGV, 4 do
  local kind, u, c, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'b' then
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'evprocs')) do
      local ek = P .. 'ev:' .. id
      if redis.call('EXISTS', ek) == 1 then
        redis.call('XADD', ek, 'MAXLEN', '~', emax, '*', 'b', body)
      else
        redis.call('SREM', P .. 'evprocs', id)
      end
    end
    redis.call('SET', P .. 'lastbroadcast', body)  -- what a process that starts later shows new subscribers
  elseif c == '' then
    for _, cid in ipairs(redis.call('SMEMBERS', P .. 'sessions:' .. u)) do deliver(u, cid, body) end
  else
    redis.call('SADD', P .. 'sessions:' .. u, c)
    redis.call('EXPIRE', P .. 'sessions:' .. u, ttl)
    deliver(u, c, body)
  end
end
return 1
"""

# a process's own events stream: made (empty) or refreshed, and the process listed for broadcasts
OPEN_STREAM = r"""
local P, id, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local ek = P .. 'ev:' .. id
local made = 0
if redis.call('EXISTS', ek) == 0 then
  redis.call('XADD', ek, 'MAXLEN', '0', '*', 'x', '')
  made = 1
end
redis.call('PEXPIRE', ek, ttl)
redis.call('SADD', P .. 'evprocs', id)
return made
"""

# sessions attached here (pairs user, client): register them for routing; with the user's session set (so that
# messages for all of the user's sessions reach them)
REGISTER = r"""
local P, id, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local u, c = ARGV[i], ARGV[i + 1]
  redis.call('SADD', P .. 'at:' .. u .. ':' .. c, id)
  redis.call('EXPIRE', P .. 'at:' .. u .. ':' .. c, ttl)
  redis.call('SADD', P .. 'sessions:' .. u, c)
  redis.call('EXPIRE', P .. 'sessions:' .. u, ttl)
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Live:
    """A message read from this process's events stream (``user_id`` None: a broadcast)."""

    user_id: str | None
    client_id: str
    seq: int
    body: dict[str, Any]


# from the stream keeper to the hub loop (markers, compared by identity): register every attached session again;
# the same and copy their streams (this process's events stream was gone: what it missed is in the copies)
_REREGISTER = Live(None, "reregister", -1, {})
_REJOIN = Live(None, "rejoin", -1, {})


async def publish_to_redis(
    store: RedisStore,
    inbox: trio.MemoryReceiveChannel[Publish | Broadcast],
    *,
    replay_max: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    script = store.client.register_script(PUBLISH)
    task_status.started()
    with inbox:
        async for first in inbox:
            batch = [first]
            # a steady stream comes a message or two per wake-up: wait PUBLISH_LINGER for more, so that one script
            # call carries many (each call costs the core and Redis far more than a message in it)
            with trio.move_on_after(PUBLISH_LINGER):
                while len(batch) < BATCH:
                    try:
                        batch.append(inbox.receive_nowait())
                    except trio.WouldBlock:
                        try:
                            batch.append(await inbox.receive())
                        except trio.EndOfChannel:
                            break
                    except trio.EndOfChannel:
                        break
            args: list[Any] = [replay_max, EVENTS_MAXLEN, SESSION_KEY_TTL]
            for msg in batch:
                if isinstance(msg, Broadcast):
                    args += ["b", "", "", encode_body(msg.body)]
                else:
                    args += ["u", msg.user_id, msg.client_id or "", encode_body(msg.body)]
            while True:  # in order: nothing is published past a batch that did not go out
                try:
                    await script(keys=[store.prefix], args=args)
                    break
                except (RedisError, OSError) as exc:
                    log.warning("bridge: publishing %d message(s) failed, retrying: %s", len(batch), exc)
                    await trio.sleep(RETRY_DELAY)


async def feed_hub(
    store: RedisStore,
    front: trio.MemoryReceiveChannel[HubMsg | Live],
    live: trio.MemorySendChannel[HubMsg | Live],
    hub: trio.MemorySendChannel[HubMsg],
    *,
    proc_id: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Pass ``front`` (the web layer's hub inbox) to ``hub``, adding this process's events stream's messages (read
    into ``live``, a clone of front's send side, so one loop sees both in order). ``proc_id`` names the stream
    (default: a fresh id)."""
    client = store.client
    me = proc_id or uuid.uuid4().hex
    stream = f"{store.prefix}ev:{me}"
    open_stream = client.register_script(OPEN_STREAM)
    register = client.register_script(REGISTER)
    await open_stream(keys=[store.prefix], args=[me, int(PROC_STREAM_TTL * 1000)])

    async def read_events() -> None:
        last = "0-0"  # the stream is this process's own, made just now
        to_loop = Forwarder(live)  # a read's entries reach the loop whole (no checkpoint per entry)
        with live:
            while True:
                for entry in await read_after(store, stream, last):
                    last = as_text(entry.identifier)
                    f = entry.field_values
                    if "b" in f:
                        body = json.loads(f["b"])
                        await to_loop.send(Live(f.get("u"), f.get("c", ""), int(f.get("s", 0)), body))

    async def keep_stream(tell: trio.MemorySendChannel[HubMsg | Live]) -> None:
        """Refresh the stream's expiry; if it was gone, make it again and have the loop rejoin."""
        since = trio.current_time()
        with tell:
            while True:
                await trio.sleep(REFRESH_EVERY)
                try:
                    made: Any = await open_stream(keys=[store.prefix], args=[me, int(PROC_STREAM_TTL * 1000)])
                except (RedisError, OSError) as exc:
                    log.warning("bridge: cannot refresh this process's events stream: %s", exc)
                    continue
                if made:
                    log.warning("bridge: this process's events stream was gone: registering its sessions again")
                    await tell.send(_REJOIN)
                elif trio.current_time() - since >= REREGISTER_EVERY:
                    since = trio.current_time()
                    await tell.send(_REREGISTER)

    async def register_all(sessions: Iterable[tuple[str, str]]) -> None:
        args: list[Any] = [me, SESSION_KEY_TTL]
        for user_id, client_id in sessions:
            args += [user_id, client_id]
            if len(args) >= 2 + 2 * REGISTER_BATCH:
                await register(keys=[store.prefix], args=args)
                args = args[:2]
        if len(args) > 2:
            await register(keys=[store.prefix], args=args)

    attached: Counter[tuple[str, str]] = Counter()
    latest = await client.get(store.prefix + "lastbroadcast")
    if latest is not None:  # the current status, for this hub's first subscribers
        await hub.send(Broadcast(json.loads(latest)))
    again = live.clone()  # a rejoin the loop sends itself when Redis was away
    rejoin_due = False
    try:
        async with trio.open_nursery() as nursery:

            def rejoin_later() -> None:
                """Redis was away while registering: register and copy every attached session again, later."""
                nonlocal rejoin_due
                if not rejoin_due:
                    rejoin_due = True
                    nursery.start_soon(_send_later, again.clone(), _REJOIN)

            nursery.start_soon(keep_stream, live.clone())
            nursery.start_soon(read_events)
            task_status.started()
            to_hub = Forwarder(hub)  # live messages reach the hub as a burst, so its writers coalesce them
            take = _Drain(front)
            with front, hub, again:
                while (msg := await take()) is not None:
                    if msg is _REREGISTER or msg is _REJOIN:
                        if msg is _REJOIN:
                            rejoin_due = False
                        try:
                            await register_all(list(attached))
                        except (RedisError, OSError) as exc:
                            log.warning("bridge: cannot register this process's sessions: %s", exc)
                            rejoin_later()
                            continue
                        if msg is _REJOIN:
                            for user_id, client_id in list(attached):
                                if not await _backfill(store, hub, user_id, client_id, trio.lowlevel.checkpoint):
                                    rejoin_later()
                                    break
                        continue
                    match msg:
                        case Live(None, _, _, body):
                            await to_hub.send(Broadcast(body))
                        case Live(uid, cid, seq, body):
                            if uid is not None and (uid, cid) in attached:
                                await to_hub.send(Publish(uid, cid, body, seq))
                        case Attach(user_id, client_id):
                            attached[(user_id, client_id)] += 1

                            async def reg(u: str = user_id, c: str = client_id) -> None:
                                await register_all([(u, c)])

                            if not await _backfill(store, hub, user_id, client_id, reg):
                                rejoin_later()  # not registered: messages would not be routed here
                            await hub.send(msg)
                        case Detach(user_id, client_id):
                            attached[(user_id, client_id)] -= 1
                            if attached[(user_id, client_id)] <= 0:
                                del attached[(user_id, client_id)]
                                await _unregister(store, me, user_id, client_id)
                            await hub.send(msg)
                        case _:
                            await hub.send(msg)
            nursery.cancel_scope.cancel()
    finally:  # stop the routing to this process now rather than when its stream expires
        with trio.move_on_after(1, shield=True):
            try:
                await client.srem(store.prefix + "evprocs", [me])
                await client.delete([stream])
            except (RedisError, OSError) as exc:
                log.debug("bridge: %s", exc)


class _Drain:
    """The next message of ``channel`` (None once it is closed), taking what is already queued without a
    checkpoint (up to ``HUB_BATCH`` in a row): a checkpoint per message would let the hub, and then each writer,
    run once per message, and nothing would coalesce."""

    __slots__ = ("channel", "taken")

    def __init__(self, channel: trio.MemoryReceiveChannel[HubMsg | Live]) -> None:
        self.channel = channel
        self.taken = 0

    async def __call__(self) -> HubMsg | Live | None:
        try:
            if self.taken < HUB_BATCH:
                self.taken += 1
                return self.channel.receive_nowait()
        except trio.WouldBlock:
            pass
        except trio.EndOfChannel:
            return None
        self.taken = 0
        try:
            return await self.channel.receive()
        except trio.EndOfChannel:
            return None


async def _send_later(tx: trio.MemorySendChannel[HubMsg | Live], msg: Live) -> None:
    with tx:
        await trio.sleep(REFRESH_EVERY)
        await tx.send(msg)


async def _unregister(store: RedisStore, me: str, user_id: str, client_id: str) -> None:
    """Stop routing the session here (if Redis is away, its messages still come and the hub's loop drops them)."""
    with trio.move_on_after(UNREGISTER_PATIENCE):
        try:
            await store.client.srem(f"{store.prefix}at:{user_id}:{client_id}", [me])
        except (RedisError, OSError) as exc:
            log.debug("bridge: %s", exc)


async def resync_sessions(store: RedisStore, publish: trio.MemorySendChannel[Publish | Broadcast]) -> int:
    """After a core died mid-term: what it had not yet published is gone, and seqs numbered in Redis go on without
    a gap to show it. So every known session gets a ``resync`` (the client reloads its tasks and balance over
    HTTP, as after a restart on SQLite). Returns how many sessions were told."""
    told = 0
    head = f"{store.prefix}sessions:"
    async for key in store.client.scan_iter(match=head + "*"):
        for client_id in await store.client.smembers(key):
            await publish.send(Publish(key[len(head) :], client_id, Resync().to_wire()))
            told += 1
    return told


async def _backfill(
    store: RedisStore,
    hub: trio.MemorySendChannel[HubMsg],
    user_id: str,
    client_id: str,
    register: Callable[[], Awaitable[None]],
) -> bool:
    """Register the session here (``register()``), then copy its stream (its replay buffer) into the hub before
    the connection attaches: whatever is published after the registration also comes through the events stream.
    False if Redis did not answer within ``BACKFILL_PATIENCE``."""
    client = store.client
    entries = None
    with trio.move_on_after(BACKFILL_PATIENCE):
        while True:
            try:
                await register()
                entries = await client.xrange(f"{store.prefix}sess:{user_id}:{client_id}")
                break
            except (RedisError, OSError) as exc:  # Redis restarting: wait for it (the hub's traffic waits too)
                log.warning("bridge: no replay from Redis for %s/%s yet: %s", user_id, client_id, exc)
                await trio.sleep(RETRY_DELAY)
    if entries is None:  # still no Redis: the client gets what this hub has, or a resync; it stays connected
        return False
    for entry in entries:
        f = entry.field_values
        await hub.send(Publish(user_id, client_id, json.loads(f["b"]), int(f["s"])))
    return True
