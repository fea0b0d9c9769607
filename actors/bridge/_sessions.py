"""Session messages across processes: the core publishes into Redis, every process feeds its own hub from it.

``publish_to_redis`` takes what the core actors send to "the sessions" (``Publish``, ``Broadcast``) and, a batch
per script call, numbers each session's message (``<prefix>sseq:<user>:<client>``), appends it to the session's
capped stream (``<prefix>sess:<user>:<client>``, ``MAXLEN ~ replay_max``: the replay buffer every process shares)
and to the events stream every process reads (``<prefix>events``). A message for all of a user's sessions goes
to each session in ``<prefix>sessions:<user>`` (sessions that ever connected or were published to).

``feed_hub`` sits in front of this process's sessions hub: it passes the web layer's messages on, and for each
session with a connection here it delivers the events stream's messages with their seqs (the hub skips seqs it
has). On ``Attach`` it first copies the session's stream into the hub, so a client that reconnects to any
process resumes with its ``last-seq`` and misses nothing the stream still holds. Broadcasts reach every hub;
the latest one is also kept (``<prefix>lastbroadcast``) for hubs that start later.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio
from coredis.exceptions import RedisError

from ..sessions import Attach, Broadcast, Detach, HubMsg, Publish, encode_body
from ..store import RedisStore, as_text
from ..wire import Resync
from ._stream import BATCH, RETRY_DELAY, read_after

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 10_000  # messages the events stream keeps (what a slow process may still catch up on)
SESSION_KEY_TTL = 24 * 3600  # seconds a session's stream and the user's session set outlive their last message
BACKFILL_PATIENCE = 10.0  # seconds an attach waits for Redis to copy the session's stream (a restart is shorter)

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
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', emax, '*', 'u', u, 'c', c, 's', seq, 'b', body)
end
for i = 4, #ARGV, 4 do
  local kind, u, c, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'b' then
    redis.call('XADD', P .. 'events', 'MAXLEN', '~', emax, '*', 'b', body)
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


@dataclass(frozen=True, slots=True)
class Live:
    """A message read from the events stream (``user_id`` None: a broadcast)."""

    user_id: str | None
    client_id: str
    seq: int
    body: dict[str, Any]


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
            while len(batch) < BATCH:
                try:
                    batch.append(inbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Pass ``front`` (the web layer's hub inbox) to ``hub``, adding the events stream's messages (read into
    ``live``, a clone of front's send side, so one loop sees both in order)."""
    client = store.client
    events = store.prefix + "events"
    newest = await client.xrevrange(events, "+", "-", count=1)
    start = as_text(newest[0].identifier) if newest else "0-0"

    async def read_events() -> None:
        last = start
        with live:
            while True:
                for entry in await read_after(store, events, last):
                    last = as_text(entry.identifier)
                    f = entry.field_values
                    body = json.loads(f["b"])
                    await live.send(Live(f.get("u"), f.get("c", ""), int(f.get("s", 0)), body))

    attached: Counter[tuple[str, str]] = Counter()
    latest = await client.get(store.prefix + "lastbroadcast")
    if latest is not None:  # the current status, for this hub's first subscribers
        await hub.send(Broadcast(json.loads(latest)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_events)
        task_status.started()
        with front, hub:
            async for msg in front:
                match msg:
                    case Live(None, _, _, body):
                        await hub.send(Broadcast(body))
                    case Live(user_id, client_id, seq, body):
                        if user_id is not None and (user_id, client_id) in attached:
                            await hub.send(Publish(user_id, client_id, body, seq))
                    case Attach(user_id, client_id):
                        attached[(user_id, client_id)] += 1
                        await _backfill(store, hub, user_id, client_id)
                        await hub.send(msg)
                    case Detach(user_id, client_id):
                        attached[(user_id, client_id)] -= 1
                        if attached[(user_id, client_id)] <= 0:
                            del attached[(user_id, client_id)]
                        await hub.send(msg)
                    case _:
                        await hub.send(msg)
        nursery.cancel_scope.cancel()


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


async def _backfill(store: RedisStore, hub: trio.MemorySendChannel[HubMsg], user_id: str, client_id: str) -> None:
    """Copy the session's stream (its replay buffer) into the hub before the connection attaches; register the
    session so that messages for all of the user's sessions reach it."""
    client = store.client
    entries = None
    with trio.move_on_after(BACKFILL_PATIENCE):
        while True:
            try:
                await client.sadd(f"{store.prefix}sessions:{user_id}", [client_id])
                await client.expire(f"{store.prefix}sessions:{user_id}", SESSION_KEY_TTL)
                entries = await client.xrange(f"{store.prefix}sess:{user_id}:{client_id}")
                break
            except (RedisError, OSError) as exc:  # Redis restarting: wait for it (the hub's traffic waits too)
                log.warning("bridge: no replay from Redis for %s/%s yet: %s", user_id, client_id, exc)
                await trio.sleep(RETRY_DELAY)
    if entries is None:  # still no Redis: the client gets what this hub has, or a resync; it stays connected
        return
    for entry in entries:
        f = entry.field_values
        await hub.send(Publish(user_id, client_id, json.loads(f["b"]), int(f["s"])))
