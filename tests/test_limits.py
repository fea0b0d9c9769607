"""Per-user limits (issue 10): sessions per user, replays per connection per minute, submits per user per second;
a user's ``balance`` fan-out costs O(live connections); one user's flood does not slow another user."""

from __future__ import annotations

import json
import time
from typing import Any

import trio
import trio.testing
from conftest import GatewayUnderTest, workflow
from stomp_client import stomp_connect
from test_e2e_skeleton import subscribed

from actors import sessions as s
from actors._util import ask
from web._outbox import Outbox


async def test_sessions_per_user_drop_the_least_recently_used_idle_one(nursery: trio.Nursery) -> None:
    hub, rx = trio.open_memory_channel[s.HubMsg](64)
    await nursery.start(lambda task_status: s.run(rx, max_sessions_per_user=3, task_status=task_status))
    for cid in ("a", "b", "c"):
        assert await ask(hub, lambda r, cid=cid: s.Connect("u", cid, r)) is True
    assert await ask(hub, lambda r: s.Connect("u", "d", r)) is False  # all three live: refused
    assert await ask(hub, lambda r: s.Connect("other", "d", r)) is True  # per user
    await hub.send(s.Disconnect("u", "b"))
    await hub.send(s.Disconnect("u", "a"))
    assert await ask(hub, lambda r: s.Connect("u", "d", r)) is True  # b is the least recently used idle one
    stats = await ask(hub, s.GetStats)
    assert stats.sessions == 4  # a, c, d of u; d of other
    assert await ask(hub, lambda r: s.Connect("u", "b", r)) is True  # b was dropped: a (idle) makes room
    assert await ask(hub, lambda r: s.Connect("u", "e", r)) is False


async def test_balance_goes_to_live_sessions_and_idle_ones_catch_up_on_attach(nursery: trio.Nursery) -> None:
    hub, rx = trio.open_memory_channel[s.HubMsg](64)
    await nursery.start(lambda task_status: s.run(rx, max_sessions_per_user=1000, task_status=task_status))
    live = Outbox()
    await ask(hub, lambda r: s.Attach("u", "live", live, None, r))
    for i in range(500):  # sessions made and left: each still exists, idle
        await hub.send(s.Publish("u", f"old{i}", {"type": "queued", "taskId": str(i)}))
    for n in range(3):
        await hub.send(s.Publish("u", None, {"type": "balance", "balance": n}))
    await ask(hub, s.GetStats)
    await trio.testing.wait_all_tasks_blocked()
    got = [json.loads(o.body) for o in await live.get_batch()]
    assert [m["balance"] for m in got if m["type"] == "balance"] == [0, 1, 2]
    late = Outbox()  # an idle session attaching later gets the latest balance, once, then what it missed
    seq = await ask(hub, lambda r: s.Attach("u", "old7", late, 0, r))
    got = [json.loads(o.body) for o in await late.get_batch()]
    assert got == [{"type": "queued", "taskId": "7"}, {"type": "balance", "balance": 2}] and seq == 2


async def test_connect_refused_when_every_session_is_live(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], max_sessions_per_user=2)
    token = g.token("erin")
    async with (
        stomp_connect(g.ws_url, token=token, client_id="t1"),
        stomp_connect(g.ws_url, token=token, client_id="t2"),
        stomp_connect(g.ws_url, token=token, client_id="t3", expect_connected=False) as c,
    ):
        frame = await c.next_frame()
        assert frame.command == "ERROR" and frame.headers["message"] == "too many sessions", frame
    async with stomp_connect(g.ws_url, token=token, client_id="t3"):  # both closed: t1 makes room
        pass


async def test_replay_storm_is_cut_with_too_many_replays(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], web={"max_replays_per_minute": 5})
    async with stomp_connect(g.ws_url, token=g.token("frank"), client_id="c1") as c:
        for i in range(5):
            await c.send_frame(
                "SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "last-seq": "0", "receipt": f"r{i}"}
            )
            assert (await c.next_frame()).command == "RECEIPT"
            await c.send_frame("UNSUBSCRIBE", {"id": "s"})
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "last-seq": "0"})
        frame = await c.next_frame()
        assert frame.command == "ERROR" and frame.headers["message"] == "too many replays", frame
    assert (await g.http.get(f"{g.url}/healthz")).status_code == 200


async def test_submits_per_second_are_limited_over_http_and_stomp(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], submit_rate=0.01, submit_burst=2, initial_credits=1000)
    body = {"clientId": "c1", "workflow": workflow("txt2img")}
    codes = [(await g.http.post(f"{g.url}/api/tasks", json=body, headers=g.auth("gina"))).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    r = await g.http.post(f"{g.url}/api/tasks", json=body, headers=g.auth("gina"))
    assert r.json()["error"] == "too_many_submits"
    async with stomp_connect(g.ws_url, token=g.token("gina"), client_id="c1") as c:
        await subscribed(c)
        await c.send_frame("SEND", {"destination": "/app/tasks"}, json.dumps(body))
        msgs = await c.collect_until(lambda m: m.get("type") == "rejected")
        assert msgs[-1][1]["error"] == "too_many_submits", msgs[-1]
        await c.leave()
    assert (await g.http.post(f"{g.url}/api/tasks", json=body, headers=g.auth("hank"))).status_code == 202


async def test_a_session_flood_does_not_slow_another_user(sim: Any, start_gateway: Any) -> None:
    """A smaller-scale CI version of the issue's 2,000 sessions + 50 submit/cancel cycles (full size: scripts/flood.py).
    The flooder's sessions stay bounded by the per-user limit and another user's `queued` arrives quickly."""
    g: GatewayUnderTest = await start_gateway(
        [sim.url],
        max_sessions_per_user=64,
        initial_credits=10_000,
        submit_burst=1000,
        submit_rate=1000,
        max_queued_per_user=1000,
    )
    token = g.token("mallory")
    for i in range(200):
        async with stomp_connect(g.ws_url, token=token, client_id=f"f{i}") as c:
            await c.subscribe()
            await c.leave()
    for _ in range(10):  # each balance change is fanned out; cancels refund
        task = await g.submit("mallory", workflow("txt2img"), client_id="f0")
        await g.http.delete(f"{g.url}/api/tasks/{task['taskId']}", headers=g.auth("mallory"))
    metrics = (await g.http.get(f"{g.url}/metrics")).text
    line = next(x for x in metrics.splitlines() if x.startswith("gateway_sessions"))
    assert float(line.split()[-1]) <= 64 + 2, line
    latencies = []
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="a") as c:
        await subscribed(c)
        for _ in range(5):
            t0 = time.monotonic()
            await g.submit("alice", workflow("txt2img"), client_id="a")
            await c.collect_until(lambda m: m.get("type") == "queued")
            latencies.append(time.monotonic() - t0)
        await c.leave()  # unread messages would leave trio-websocket's reader stuck at close (60 s)
    assert max(latencies) < 0.25, latencies


async def test_a_refused_subscribe_leaves_the_session_count_right(sim: Any, start_gateway: Any) -> None:
    """A SUBSCRIBE refused (bad last-seq) must not leave a Detach owed: the session's live count stays exact, so a
    later connection's balance messages still reach it live."""
    g: GatewayUnderTest = await start_gateway([sim.url])
    async with stomp_connect(g.ws_url, token=g.token("ivy"), client_id="c1") as bad:
        await bad.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "last-seq": "x"})
        assert (await bad.next_frame()).command == "ERROR"
    async with stomp_connect(g.ws_url, token=g.token("ivy"), client_id="c1") as c:
        await subscribed(c)
        admin = {"Authorization": f"Bearer {g.token('root', admin=True)}"}
        r = await g.http.post(f"{g.url}/api/admin/credits", json={"userId": "ivy", "amount": 5}, headers=admin)
        assert r.status_code == 200
        _, msg = await c.next_message()
        assert msg["type"] == "balance" and msg["balance"] == g.initial_credits + 5, msg
        await c.leave()
