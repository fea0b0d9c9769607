"""End to end over real sockets: the whole gateway on a free port against the ComfyUI simulator on a free port.

Covers the walking skeleton (issue 2): the task flow through every actor, the failure and validation paths,
a simulator killed and restarted mid-flight, the in-flight limit, and user isolation.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import GatewayUnderTest, both_stores, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI
from stomp_client import StompClient, stomp_connect

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TERMINAL = ("completed", "execution_error", "cancelled")


async def subscribed(c: StompClient, **extra: str) -> None:
    """SUBSCRIBE to the user's messages and wait for its RECEIPT, so nothing published after it is missed."""
    await c.send_frame("SUBSCRIBE", {"id": "sub-0", "destination": "/user/topic/messages", "receipt": "sub", **extra})
    frame = await c.next_frame()
    assert frame.command == "RECEIPT" and frame.headers["receipt-id"] == "sub", frame


def task_messages(msgs: list[tuple[dict[str, str], dict[str, Any]]], task_id: str) -> list[dict[str, Any]]:
    return [m for _, m in msgs if m.get("taskId") == task_id]


def collapse(types: list[str]) -> list[str]:
    out: list[str] = []
    for t in types:
        if not out or out[-1] != t:
            out.append(t)
    return out


async def start_sim(nursery: trio.Nursery, port: int = 0, **kw: Any) -> tuple[FakeComfyUI, trio.CancelScope]:
    """A simulator that the test can kill (cancel its scope) independently of the test's nursery."""
    sim = FakeComfyUI(**{"step_ms": 5, "seed": 1, **kw})
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await sim.serve(port=port, task_status=task_status)

    await nursery.start(run)
    return sim, scope


@both_stores
async def test_task_travels_end_to_end(sim: FakeComfyUI, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    await wait_backends_up(g)
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        assert c.connected is not None and c.connected.headers["version"] == "1.2"
        assert c.connected.headers["user-name"] == "alice"
        await subscribed(c)
        task = await g.submit("alice", workflow("txt2img"), "c1")
        assert task["state"] == "queued" and task["cost"] == g.price and task["position"] == 1
        msgs = await c.collect_until(lambda m: m.get("type") in TERMINAL)

    seqs = [int(h["seq"]) for h, _ in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must increase by 1"
    for h, _ in msgs:
        assert h["destination"] == "/user/topic/messages" and h["subscription"] == "sub-0"
        assert h["content-type"] == "application/json" and h["message-id"]
    mine = task_messages(msgs, task["taskId"])
    previews = [m for m in mine if m["type"] == "preview"]
    assert previews and all(m["mime"] in ("image/png", "image/jpeg") and m["data"] for m in previews)
    kinds = [m["type"] for m in mine if m["type"] != "preview"]
    assert collapse(kinds) == ["queued", "started", "progress", "imageResult", "completed"]
    progress = [(m["value"], m["max"]) for m in mine if m["type"] == "progress"]
    assert progress == [(i, 20) for i in range(1, 21)]  # the KSampler's 20 steps, in order
    completed = mine[-1]
    assert completed["urls"] and completed["prompt_id"]

    r = await g.http.get(completed["urls"][0], headers=g.auth("alice"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(PNG_SIGNATURE)
    assert (await g.http.get(completed["urls"][0], headers=g.auth("mallory"))).status_code == 404

    bal = await g.balance("alice")
    assert bal == {"userId": "alice", "balance": g.initial_credits - g.price, "frozen": 0,
                   "available": g.initial_credits - g.price}
    balances = [m for _, m in msgs if m.get("type") == "balance"]
    assert balances and balances[-1]["balance"] == g.initial_credits - g.price and balances[-1]["frozen"] == 0

    r = await g.http.get(f"{g.url}/api/tasks/{task['taskId']}", headers=g.auth("alice"))
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    # the same images; each read re-signs them, so the expiry (whole seconds) may have moved on
    assert [u.split("?")[0] for u in r.json()["urls"]] == [u.split("?")[0] for u in completed["urls"]]
    assert (await g.http.get(f"{g.url}/api/tasks/{task['taskId']}", headers=g.auth("bob"))).status_code == 404


async def run_to_terminal(g: GatewayUnderTest, user: str, wf: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with stomp_connect(g.ws_url, token=g.token(user), client_id="c1") as c:
        await subscribed(c)
        task = await g.submit(user, wf, "c1")
        msgs = await c.collect_until(lambda m: m.get("taskId") == task["taskId"] and m.get("type") in TERMINAL)
    return task, task_messages(msgs, task["taskId"])


@both_stores
async def test_execution_error_is_refunded(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    task, mine = await run_to_terminal(g, "alice", workflow("txt2img_sim_error"))
    err = mine[-1]
    assert err["type"] == "execution_error" and err["reason"] == "execution_error" and err["refunded"] is True
    wf = workflow("txt2img_sim_error")
    text = next(n["inputs"]["sim_error"] for n in wf.values() if "sim_error" in n.get("inputs", {}))
    assert text in err["error"]
    assert err["node_id"] and err["node_type"]
    assert await g.balance("alice") == {"userId": "alice", "balance": g.initial_credits, "frozen": 0,
                                         "available": g.initial_credits}


@both_stores
async def test_rejected_workflow_fails_as_validation(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    task, mine = await run_to_terminal(g, "alice", workflow("txt2img_unknown_node"))
    err = mine[-1]
    assert [m["type"] for m in mine] == ["queued", "execution_error"]
    assert err["reason"] == "validation" and err["refunded"] is True and err["error"]
    assert (await g.balance("alice"))["available"] == g.initial_credits
    r = await g.http.get(f"{g.url}/api/tasks/{task['taskId']}", headers=g.auth("alice"))
    assert r.json()["state"] == "failed" and r.json()["reason"] == "validation"


@both_stores
async def test_simulator_killed_and_restarted_mid_flight(nursery: trio.Nursery, start_gateway: Any) -> None:
    sim, scope = await start_sim(nursery, step_ms=50)
    port = sim.port
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        lost = await g.submit("alice", workflow("txt2img"), "c1")
        await c.collect_until(lambda m: m.get("type") == "progress")
        scope.cancel()  # ComfyUI dies mid-prompt ...
        sim2, _ = await start_sim(nursery, port=port)  # ... and comes back with an empty queue and history
        msgs = await c.collect_until(lambda m: m.get("taskId") == lost["taskId"] and m.get("type") in TERMINAL)
        end = msgs[-1][1]
        assert end["type"] == "execution_error" and end["reason"] == "backend_lost" and end["refunded"] is True
        # the comfy actor reconnected by itself: the next task succeeds on the restarted simulator
        nxt = await g.submit("alice", workflow("txt2img"), "c1")
        msgs = await c.collect_until(lambda m: m.get("taskId") == nxt["taskId"] and m.get("type") in TERMINAL)
        assert msgs[-1][1]["type"] == "completed"
    assert nxt and sim2.submitted and (await g.balance("alice"))["balance"] == g.initial_credits - g.price
    assert (await g.balance("alice"))["frozen"] == 0


@both_stores
async def test_max_inflight_bounds_prompts_inside_comfyui(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], max_inflight=2)
    await wait_backends_up(g)
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        ids = {(await g.submit("alice", workflow("txt2img"), "c1"))["taskId"] for _ in range(5)}
        done: set[str] = set()
        await c.collect_until(lambda m: m.get("type") == "completed" and not done.add(m["taskId"]) and done == ids,
                              timeout=60)
    assert done == ids
    assert sim.max_in_queue == 2  # the limit was reached, never exceeded
    assert len(sim.runs) == 5 and all(r.outcome == "success" for r in sim.runs)
    assert await g.balance("alice") == {"userId": "alice", "balance": g.initial_credits - 5 * g.price, "frozen": 0,
                                         "available": g.initial_credits - 5 * g.price}


@both_stores
async def test_a_user_never_receives_another_users_messages(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as alice, \
            stomp_connect(g.ws_url, token=g.token("bob"), client_id="c1") as bob:  # same clientId on purpose
        await subscribed(alice)
        await subscribed(bob)
        a = await g.submit("alice", workflow("txt2img"), "c1")
        await alice.collect_until(lambda m: m.get("type") == "completed")
        b = await g.submit("bob", workflow("txt2img"), "c1")
        bob_msgs = await bob.collect_until(lambda m: m.get("type") == "completed")
        # flush alice's stream: anything for her session published before this would arrive first
        await alice.send_frame("SEND", {"destination": "/app/cancel"}, '{"taskId": "no-such-task"}')
        alice_msgs = await alice.collect_until(lambda m: m.get("type") == "rejected")
    assert {m["taskId"] for _, m in bob_msgs if "taskId" in m} == {b["taskId"]}
    assert all(m.get("taskId") != b["taskId"] for _, m in alice_msgs)
    # bob's own freeze and settle, and not alice's two (the numbers would be the same, the count would not)
    assert [(m["balance"], m["frozen"]) for _, m in bob_msgs if m.get("type") == "balance"] == [
        (g.initial_credits, g.price), (g.initial_credits - g.price, 0)]
    assert a["taskId"] != b["taskId"]


@both_stores
async def test_http_errors_are_json(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], initial_credits=2, price=3)
    r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": workflow("txt2img")})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": workflow("txt2img")},
                          headers=g.auth("alice"))
    assert r.status_code == 402 and r.json()["error"] == "insufficient_credits"
    r = await g.http.post(f"{g.url}/api/tasks", content=b"{not json", headers=g.auth("alice"))
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": {"1": {"inputs": {}}}},
                          headers=g.auth("alice"))
    assert r.status_code == 400 and "class_type" in r.json()["detail"]
    r = await g.http.post(f"{g.url}/api/tasks", content=b"x" * (2 << 20), headers=g.auth("alice"))
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert await g.balance("alice") == {"userId": "alice", "balance": 2, "frozen": 0, "available": 2}


async def _read_line_with(stream: Any, needle: bytes, buf: bytearray) -> bytes:
    while True:
        for line in bytes(buf).split(b"\n"):
            if needle in line:
                return line
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"process ended before printing {needle!r}: {bytes(buf)!r}")
        buf += chunk


async def test_scripts_run_simulate_serves_the_flow(tmp_path: Path) -> None:
    """What a newcomer gets from `scripts/run --simulate`: the gateway CLI with the bundled simulator."""
    run = Path(__file__).resolve().parent.parent / "scripts" / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"PYTHONUNBUFFERED": "1"}
    proc = await trio.lowlevel.open_process(
        [str(run), "--simulate", "--bind", "127.0.0.1:0", "--data", str(tmp_path / "data"), "--sim-step-ms", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        buf = bytearray()
        with trio.fail_after(30):
            line = await _read_line_with(proc.stdout, b"comfy-gateway serving on ", buf)
        url = line.decode().rsplit(" ", 1)[1].strip()
        sim_line = await _read_line_with(proc.stdout, b"ComfyUI simulator on ", buf)
        sim_url = sim_line.decode().split("ComfyUI simulator on ", 1)[1].split()[0]
        assert "(its own process)" in sim_line.decode()  # so nothing the simulator does can stall the gateway
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{sim_url}/queue")).status_code == 200
            page = await http.get(f"{url}/")
            assert page.status_code == 200 and "<html" in page.text.lower()
            demo = (await http.get(f"{url}/api/demo-token")).json()
            headers = {"Authorization": f"Bearer {demo['token']}"}
            ws_url = url.replace("http://", "ws://") + "/ws"
            async with stomp_connect(ws_url, token=demo["token"], client_id=demo["clientId"]) as c:
                await subscribed(c)
                r = await http.post(f"{url}/api/tasks", headers=headers,
                                    json={"clientId": demo["clientId"], "workflow": workflow("txt2img")})
                assert r.status_code == 202, r.text
                msgs = await c.collect_until(lambda m: m.get("type") in TERMINAL, timeout=30)
                await c.leave()
            assert msgs[-1][1]["type"] == "completed"
            img = await http.get(msgs[-1][1]["urls"][0], headers=headers)
            assert img.content.startswith(PNG_SIGNATURE)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await proc.wait() == 0
            with pytest.raises(httpx.ConnectError):  # the simulator's process was stopped with the gateway
                await http.get(f"{sim_url}/queue")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
