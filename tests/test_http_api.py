"""The HTTP side of the contract: CORS (preflight before auth, headers on errors), the WebSocket Origin check,
/readyz, /metrics, admin credits, open auth mode, and result paging."""

from __future__ import annotations

from typing import Any

from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from conftest import GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI
from stomp_client import stomp_connect

APP = "http://app.example"


async def test_cors_preflight_needs_no_token_and_errors_carry_the_origin(sim: FakeComfyUI, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], web={"allowed_origins": (APP,)})
    r = await g.http.options(f"{g.url}/api/tasks", headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert 200 <= r.status_code < 300
    assert r.headers["access-control-allow-origin"] == APP
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed  # named explicitly: '*' does not cover Authorization
    r = await g.http.get(f"{g.url}/api/balance", headers={"Origin": APP})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP
    r = await g.http.get(f"{g.url}/api/balance", headers={"Origin": "http://evil.example", **g.auth("u")})
    assert "access-control-allow-origin" not in r.headers


async def test_websocket_origin_is_checked(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"allowed_origins": (APP,)})
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(g.ws_url, subprotocols=["v12.stomp"], extra_headers=[(b"Origin", b"http://evil.example")]):
            pass
    assert rejected.value.status_code == 403
    async with open_websocket_url(g.ws_url, subprotocols=["v12.stomp"], extra_headers=[(b"Origin", APP.encode())]) as ws:
        assert ws.subprotocol == "v12.stomp"
        await ws.aclose()


async def test_readyz_and_metrics(sim: FakeComfyUI, start_gateway: Any, tmp_path: Path) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    r = await g.http.get(f"{g.url}/readyz")
    assert r.status_code == 200 and r.json()["store"] == "up" and r.json()["backends"] == {"up": 1, "total": 1}
    health = (await g.http.get(f"{g.url}/healthz")).json()
    assert health["status"] == "ok" and health["role"] == "core"  # one process on SQLite is the core
    assert health["lease"]["holder"] == health["lease"]["self"] == r.json()["lease"]["holder"]
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        await g.submit("alice", workflow("txt2img"))
        await c.collect_until(lambda m: m.get("type") == "completed")
        text = (await g.http.get(f"{g.url}/metrics")).text
    for name in ("gateway_ws_connections 1.0", "gateway_sessions", 'gateway_backend_up{backend="b0"} 1.0',
                 "gateway_queue_depth", 'gateway_messages_sent_total{type="completed"} 1.0',
                 "gateway_relay_latency_seconds_bucket", 'gateway_tasks{state="running"}'):
        assert name in text, name

    # a gateway whose only ComfyUI is not there is alive but not ready, and says why
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    g2 = await start_gateway([dead], data=tmp_path / "other")
    r = await g2.http.get(f"{g2.url}/readyz")
    assert r.status_code == 503 and r.json()["backends"]["up"] == 0 and r.json()["store"] == "up"


async def test_admin_credits_and_balance_push(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], initial_credits=10)
    body = {"userId": "alice", "amount": 25}
    r = await g.http.post(f"{g.url}/api/admin/credits", json=body, headers=g.auth("alice"))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    admin = {"Authorization": f"Bearer {g.token('root', admin=True)}"}
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        await g.balance("alice")  # opens the account (10) so the session exists... and is not a change
        r = await g.http.post(f"{g.url}/api/admin/credits", json=body, headers=admin)
        assert r.status_code == 200 and r.json() == {"userId": "alice", "balance": 35, "frozen": 0, "available": 35}
        _, pushed = await c.next_message()
    assert pushed == {"type": "balance", "balance": 35, "frozen": 0, "available": 35}
    r = await g.http.post(f"{g.url}/api/admin/credits", json={"userId": "alice", "amount": "x"}, headers=admin)
    assert r.status_code == 400


async def test_open_auth_mode_trusts_the_client_id_and_says_so(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"auth": "open"})
    await wait_backends_up(g)
    r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "carol", "workflow": workflow("txt2img")})
    assert r.status_code == 202
    r = await g.http.get(f"{g.url}/api/balance", headers={"X-Client-Id": "carol"})
    assert r.json()["userId"] == "carol" and r.json()["frozen"] + r.json()["available"] == g.initial_credits
    assert "open" in (await g.http.get(f"{g.url}/readyz")).json()["warning"]


async def test_results_are_paged_newest_first(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        ids = [(await g.submit("alice", workflow("txt2img")))["taskId"] for _ in range(3)]
        done: set[str] = set()
        await c.collect_until(lambda m: m.get("type") == "completed" and not done.add(m["taskId"]) and len(done) == 3)
    r = await g.http.get(f"{g.url}/api/results", params={"limit": 2}, headers=g.auth("alice"))
    page1 = r.json()
    assert [t["taskId"] for t in page1["results"]] == ids[::-1][:2] and "next" in page1
    r = await g.http.get(f"{g.url}/api/results", params={"limit": 2, "before": page1["next"]}, headers=g.auth("alice"))
    page2 = r.json()
    assert [t["taskId"] for t in page2["results"]] == ids[:1] and "next" not in page2
    for t in page1["results"] + page2["results"]:
        assert t["state"] == "succeeded" and t["urls"]
        img = await g.http.get(t["urls"][0], headers=g.auth("alice"))
        assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    assert (await g.http.get(f"{g.url}/api/results", headers=g.auth("bob"))).json() == {"results": []}
