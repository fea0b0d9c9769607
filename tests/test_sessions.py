"""Sessions alone, through their channels: seq numbering, fan-out, replay after a reconnect, resync, and the
outbox's coalescing / slow-consumer policy (MockClock: exact virtual seconds, no real waiting)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from actors import sessions as s
from actors._util import Forwarder, ask
from web._outbox import Outbox, SlowConsumer


async def start_hub(nursery: trio.Nursery, **kw: object) -> trio.MemorySendChannel[s.HubMsg]:
    tx, rx = trio.open_memory_channel[s.HubMsg](64)
    await nursery.start(lambda task_status: s.run(rx, task_status=task_status, **kw))
    return tx


def out(kind: str, task: str, seq: int, pad: int = 0) -> s.Outgoing:
    body = {"type": kind, "taskId": task, "value": seq, "pad": "x" * pad}
    key = (kind, task) if kind in s.DROPPABLE_TYPES else None
    return s.Outgoing("/user/topic/messages", seq, json.dumps(body).encode(), kind, key, trio.current_time())


def bodies(batch: list[s.Outgoing]) -> list[tuple[int, dict]]:
    return [(o.seq, json.loads(o.body)) for o in batch]


async def test_seq_fanout_and_isolation(nursery: trio.Nursery) -> None:
    hub = await start_hub(nursery)
    a1, a2, b = Outbox(), Outbox(), Outbox()
    await hub.send(s.Attach("alice", "c1", a1, None))
    await hub.send(s.Attach("alice", "c1", a2, None))  # a second tab of the same session
    await hub.send(s.Attach("bob", "c1", b, None))
    for i in range(3):
        await hub.send(s.Publish("alice", "c1", {"type": "queued", "taskId": f"t{i}"}))
    await trio.testing.wait_all_tasks_blocked()
    got1, got2 = bodies(await a1.get_batch()), bodies(await a2.get_batch())
    assert got1 == got2 == [(i + 1, {"type": "queued", "taskId": f"t{i}"}) for i in range(3)]
    assert len(b) == 0  # bob's session (same clientId) got nothing


async def test_replay_after_reconnect_and_resync(nursery: trio.Nursery) -> None:
    hub = await start_hub(nursery, replay_max=5)
    for i in range(8):  # published before anyone is connected: buffered by the session
        await hub.send(s.Publish("u", "c", {"type": "started", "taskId": f"t{i}"}))
    ob = Outbox()
    seq = await ask(hub, lambda r: s.Attach("u", "c", ob, 5, r))
    assert seq == 8
    assert [q for q, _ in bodies(await ob.get_batch())] == [6, 7, 8]  # exactly what came after 5
    gap = Outbox()
    await ask(hub, lambda r: s.Attach("u", "c", gap, 1, r))  # 2 and 3 fell out of the 5-message buffer
    got = bodies(await gap.get_batch())
    assert got[0] == (3, {"type": "resync"}) and [q for q, _ in got[1:]] == [4, 5, 6, 7, 8]
    ahead = Outbox()
    await ask(hub, lambda r: s.Attach("u", "c", ahead, 99, r))  # a client from before a gateway restart
    assert bodies(await ahead.get_batch())[0][1] == {"type": "resync"}


async def test_outbox_keeps_everything_in_order_while_under_budget(autojump_clock: trio.testing.MockClock) -> None:
    ob = Outbox(max_bytes=1 << 20)
    for i in range(1, 50):
        ob.put_nowait(out("progress", "t1", i))
    ob.put_nowait(out("imageResult", "t1", 50))
    assert [o.seq for o in await ob.get_batch()] == list(range(1, 51))  # no gap: nothing coalesced
    assert ob.dropped == ob.coalesced == 0


async def test_outbox_over_budget_coalesces_progress_and_never_drops_results(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ob = Outbox(max_bytes=400, max_delay=10)
    for i in range(1, 50):
        ob.put_nowait(out("progress", "t1", i))
    ob.put_nowait(out("imageResult", "t1", 50))
    batch = await ob.get_batch()
    seqs = [o.seq for o in batch]
    assert seqs == sorted(seqs) and seqs[-2:] == [49, 50]  # the latest progress survives, order is kept
    assert batch[-1].type == "imageResult" and ob.coalesced > 0
    dropped = ob.dropped
    ob.put_nowait(out("completed", "t1", 51, pad=300))
    ob.put_nowait(out("progress", "t2", 52, pad=200))  # over budget, nothing to coalesce with: dropped
    assert ob.dropped == dropped + 1 and ob.failed is None
    ob.put_nowait(out("completed", "t2", 53, pad=300))  # an undroppable one that does not fit: slow consumer
    assert ob.failed is not None
    with pytest.raises(SlowConsumer):
        await ob.get_batch()


async def test_outbox_overdue_after_max_delay(autojump_clock: trio.testing.MockClock) -> None:
    ob = Outbox(max_delay=10)
    ob.put_nowait(s.Outgoing("/user/topic/messages", 1, b"{}", "queued", None, 0.0))
    await trio.sleep(9.9)
    assert not ob.overdue()
    await trio.sleep(0.2)
    assert ob.overdue()


async def test_a_burst_reaches_the_writer_whole(nursery: trio.Nursery) -> None:
    """Coalescing engages: a producer that forwards without a checkpoint per message (as the registry does) gets a
    burst through the hub before the connection's writer runs, so the writer takes it in a few batches (each one
    WebSocket message), in order, not one message at a time."""
    hub = await start_hub(nursery)
    ob = Outbox()
    await ask(hub, lambda r: s.Attach("u", "c", ob, None, r))
    batches: list[list[int]] = []

    async def writer() -> None:
        while True:
            batches.append([o.seq for o in await ob.get_batch()])

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    to_hub = Forwarder(hub, every=64)
    for i in range(200):
        await to_hub.send(s.Publish("u", "c", {"type": "progress", "taskId": "t", "value": i}))
    await trio.testing.wait_all_tasks_blocked()
    assert [q for b in batches for q in b] == list(range(1, 201))  # every one, in order
    assert len(batches) <= 200 // 64 + 2, [len(b) for b in batches]
