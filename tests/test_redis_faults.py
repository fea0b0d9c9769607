"""Redis going away under a running gateway: /readyz says so (503), submits are refused with 503, connected clients
stay connected, and when Redis is back the core takes the lease again, reloads and reconciles as a restart does:
nothing Redis acknowledged is lost. Also ``comfy-gateway status``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio
from _chaos_lib import make_workflow
from _redis_server import RedisServer
from conftest import GatewayUnderTest
from stomp_client import stomp_connect
from test_core_lease import wait_role

from actors.store import open_store


async def test_redis_killed_and_restarted_mid_task(sim: Any, start_gateway: Any, redis_server: RedisServer) -> None:
    redis_server.flush()
    g: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url(), lease_ttl=1)
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        sim.pause()
        first = await g.submit("alice", make_workflow())  # acknowledged (202): it must not be lost
        await c.collect_until(lambda m: m.get("type") == "queued")
        redis_server.stop(kill=True)  # SIGKILL: only what Redis had written (its AOF) survives
        try:
            r = await g.http.get(f"{g.url}/readyz")
            assert r.status_code == 503 and r.json()["store"].startswith("down"), r.text
            r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": make_workflow()},
                                  headers=g.auth("alice"))
            assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
            await wait_role(g.http, g.url, "edge", timeout=10)  # the core stepped down
            await c.send_frame("SUBSCRIBE", {"id": "s2", "destination": "/topic/messages", "receipt": "alive"})
            with trio.fail_after(5):  # the client is still connected and served
                while (await c.next_frame()).command != "RECEIPT":
                    pass
            sim.resume()  # the prompt finishes while nobody can record it
        finally:
            redis_server.start()
        await wait_role(g.http, g.url, "core", timeout=15)
        second = await g.submit("alice", make_workflow())
        done: set[str] = set()
        await c.collect_until(lambda m: m.get("type") == "completed" and not done.add(m["taskId"])
                              and {first["taskId"], second["taskId"]} <= done, timeout=30)
    assert (await g.http.get(f"{g.url}/readyz")).status_code == 200
    async with open_store(redis_server.url()) as store:
        assert await store.audit() == []
        states = {t.task_id: t.state for t in await store.all_tasks()}
        assert states == {first["taskId"]: "succeeded", second["taskId"]: "succeeded"}


async def test_status_lists_the_live_processes(sim: Any, start_gateway: Any, redis_server: RedisServer) -> None:
    redis_server.flush()
    core: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    edge: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    exe = str(Path(sys.executable).with_name("comfy-gateway"))
    with trio.fail_after(30):
        done = await trio.run_process([exe, "status", "--store", redis_server.url()], capture_stdout=True)
    out = done.stdout.decode()
    core_id = (await core.http.get(f"{core.url}/healthz")).json()["lease"]["self"]
    assert f"lease held by {core_id}" in out, out
    lines = out.splitlines()[1:]
    assert sorted((ln.split()[1], ln.split()[2]) for ln in lines) == sorted(
        [("core", core.url), ("edge", edge.url)]), out
