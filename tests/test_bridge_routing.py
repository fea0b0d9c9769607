"""Session messages routed through Redis to the processes where the session is attached (``actors/bridge/_sessions``):
three "processes" (a sessions hub fed by ``feed_hub`` each, on one real Redis) and the core's ``publish_to_redis``.
A session attached on B gets its messages and the other processes' event streams never carry them; a client that
leaves B and resumes on C with its ``last-seq`` gets every message exactly once, in order; broadcasts reach every
process; a process whose events stream vanished (stalled past its expiry) registers again and misses nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from _redis_server import RedisServer

from actors import sessions
from actors._outgoing import Outgoing
from actors.bridge import _sessions as bridge_sessions
from actors.bridge import feed_hub, publish_to_redis
from actors.sessions import Attach, AttachBroadcast, Broadcast, Connect, Detach, Publish
from actors.store import RedisStore, open_store


@dataclass(eq=False)
class Sink:
    """A connection's outbox as the hub sees it: records what it gets; ``wait(n)`` until it has n messages."""

    got: list[Outgoing] = field(default_factory=list)
    _wake: trio.Event = field(default_factory=trio.Event)

    def put_nowait(self, out: Outgoing) -> None:
        self.got.append(out)
        self._wake.set()

    async def wait(self, n: int) -> None:
        with trio.fail_after(10):
            while len(self.got) < n:
                await self._wake.wait()
                self._wake = trio.Event()

    def seqs(self) -> list[int]:
        return [o.seq for o in self.got]

    def bodies(self) -> list[Any]:
        return [json.loads(o.body) for o in self.got]


class Process:
    """One gateway process's hub and its feed from Redis."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.front: trio.MemorySendChannel[Any]

    async def start(self, nursery: trio.Nursery, store: RedisStore) -> None:
        front_tx, front_rx = trio.open_memory_channel[Any](256)
        real_tx, real_rx = trio.open_memory_channel[Any](256)
        await nursery.start(partial(sessions.run, real_rx))
        await nursery.start(partial(feed_hub, store, front_rx, front_tx.clone(), real_tx, proc_id=self.name))
        self.front = front_tx

    async def attach(self, user: str, client: str, sink: Sink, last_seq: int | None) -> int:
        ok_tx, ok_rx = trio.open_memory_channel[bool](1)
        await self.front.send(Connect(user, client, ok_tx))
        assert await ok_rx.receive()
        seq_tx, seq_rx = trio.open_memory_channel[int](1)
        await self.front.send(Attach(user, client, sink, last_seq, seq_tx))
        return await seq_rx.receive()


@asynccontextmanager
async def cluster(redis_server: RedisServer, names: str) -> AsyncIterator[tuple[RedisStore, Any, list[Process]]]:
    redis_server.flush()
    async with open_store(redis_server.url()) as store, trio.open_nursery() as nursery:
        assert isinstance(store, RedisStore)
        pub_tx, pub_rx = trio.open_memory_channel[Publish | Broadcast](256)
        await nursery.start(partial(publish_to_redis, store, pub_rx, replay_max=300))
        procs = [Process(n) for n in names]
        for p in procs:
            await p.start(nursery, store)
        yield store, pub_tx, procs
        nursery.cancel_scope.cancel()


def msg(n: int) -> dict[str, Any]:
    return {"type": "progress", "taskId": "t1", "value": n}


async def test_messages_go_only_where_the_session_is_attached_and_resume_anywhere(redis_server: RedisServer) -> None:
    async with cluster(redis_server, "abc") as (store, pub, (a, b, c)):
        on_b = Sink()
        await b.attach("alice", "c1", on_b, None)
        for n in range(1, 6):
            await pub.send(Publish("alice", "c1", msg(n)))
        await on_b.wait(5)
        assert on_b.seqs() == [1, 2, 3, 4, 5] and [m["value"] for m in on_b.bodies()] == [1, 2, 3, 4, 5]
        # A and C read nothing of it: their events streams stay empty
        assert await store.client.xlen(f"{store.prefix}ev:a") == 0
        assert await store.client.xlen(f"{store.prefix}ev:c") == 0
        on_b_stream = await store.client.xlen(f"{store.prefix}ev:b")

        await b.front.send(Detach("alice", "c1", on_b))  # the client leaves B; messages go on meanwhile
        await b.front.send(sessions.Disconnect("alice", "c1"))
        for n in range(6, 9):
            await pub.send(Publish("alice", "c1", msg(n)))
        on_c = Sink()
        with trio.fail_after(10):  # the three are in the session's stream (what a resume copies)
            while await store.client.xlen(f"{store.prefix}sess:alice:c1") < 8:
                await trio.sleep(0.01)
        await c.attach("alice", "c1", on_c, 5)  # resumes on C after seq 5
        for n in range(9, 11):
            await pub.send(Publish("alice", "c1", msg(n)))
        await on_c.wait(5)
        assert on_c.seqs() == [6, 7, 8, 9, 10], on_c.seqs()  # exactly once, in order, across processes
        assert [m["value"] for m in on_c.bodies()] == [6, 7, 8, 9, 10]
        assert await store.client.xlen(f"{store.prefix}ev:b") == on_b_stream  # nothing routed to B after it left
        assert await store.client.xlen(f"{store.prefix}ev:a") == 0
        assert len(on_b.got) == 5

        subscribers = [Sink() for _ in (a, b, c)]
        for p, s in zip((a, b, c), subscribers, strict=True):
            await p.front.send(AttachBroadcast(s))
        await pub.send(Broadcast({"type": "status", "n": 1}))
        for s in subscribers:  # a broadcast reaches every process
            await s.wait(1)
            assert s.bodies()[-1] == {"type": "status", "n": 1}


async def test_a_process_whose_stream_vanished_registers_again_and_misses_nothing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_sessions, "REFRESH_EVERY", 0.05)
    async with cluster(redis_server, "ab") as (store, pub, (_a, b)):
        on_b = Sink()
        await b.attach("bob", "c1", on_b, None)
        await pub.send(Publish("bob", "c1", msg(1)))
        await on_b.wait(1)
        await store.client.delete([f"{store.prefix}ev:b"])  # as if B had been stalled past its stream's expiry
        for n in range(2, 4):  # the script finds B gone: these are only in the session's stream
            await pub.send(Publish("bob", "c1", msg(n)))
        await on_b.wait(3)  # B's keeper makes its stream again, registers bob/c1 and copies its stream
        await pub.send(Publish("bob", "c1", msg(4)))
        await on_b.wait(4)
        assert on_b.seqs() == [1, 2, 3, 4]
        assert [m["value"] for m in on_b.bodies()] == [1, 2, 3, 4]
        assert await store.client.xlen(f"{store.prefix}ev:a") == 0


async def test_a_session_attached_while_redis_is_away_is_routed_once_it_is_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_sessions, "BACKFILL_PATIENCE", 0.3)
    monkeypatch.setattr(bridge_sessions, "REFRESH_EVERY", 0.1)
    async with cluster(redis_server, "b") as (_store, pub, (b,)):
        redis_server.stop(kill=True)
        try:
            on_b = Sink()
            await b.attach("carol", "c1", on_b, None)  # cannot be registered: Redis is away
        finally:
            redis_server.start()
        for n in range(1, 4):
            await pub.send(Publish("carol", "c1", msg(n)))
        await on_b.wait(3)  # registered again once Redis answers; what came meanwhile is copied
        assert on_b.seqs() == [1, 2, 3]
        assert [m["value"] for m in on_b.bodies()] == [1, 2, 3]
