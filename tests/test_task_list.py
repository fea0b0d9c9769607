"""One vocabulary over HTTP: ``GET /api/tasks`` lists a user's tasks for every tab and device (states named as
in the messages table), ``POST /api/tasks`` needs a clientId, unknown routes and methods answer JSON, and
``serve --help`` shows real defaults."""

from __future__ import annotations

from typing import Any

import trio
from conftest import GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI

from web.cli import build_parser

STATES = {"queued", "submitted", "running", "succeeded", "failed", "cancelled"}


async def tasks(g: GatewayUnderTest, user: str, **params: Any) -> dict[str, Any]:
    r = await g.http.get(f"{g.url}/api/tasks", params=params, headers=g.auth(user))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_every_tab_sees_the_same_tasks_newest_first(nursery: trio.Nursery, start_gateway: Any) -> None:
    sim = FakeComfyUI(step_ms=200, seed=1)  # 20 steps: the first task runs for seconds
    await nursery.start(sim.serve)
    g = await start_gateway([sim.url], max_inflight=1)
    await wait_backends_up(g)
    # two tabs (two clientIds) of alice, and bob
    ids = [(await g.submit("alice", workflow("txt2img"), client_id=c))["taskId"] for c in ("tab-1", "tab-2", "tab-1")]
    await g.submit("bob", workflow("txt2img"), client_id="b")
    with trio.fail_after(10):
        while (await tasks(g, "alice", state="active"))["tasks"][-1]["state"] == "queued":
            await trio.sleep(0.02)  # until the first one is inside ComfyUI
    active = (await tasks(g, "alice", state="active"))["tasks"]
    assert [t["taskId"] for t in active] == ids[::-1]  # newest first, both tabs' tasks, none of bob's
    assert {t["clientId"] for t in active} == {"tab-1", "tab-2"}
    first, *waiting = active[::-1]
    assert first["state"] in ("submitted", "running") and first["where"] == "comfyui" and "position" not in first
    assert [(t["state"], t["where"]) for t in waiting] == [("queued", "gateway")] * 2
    positions = [t["position"] for t in waiting]  # places in the one fair line (bob's task is in it too)
    assert positions[0] == 1 and positions == sorted(set(positions))  # distinct, the older one first
    for t in active:
        assert set(t) >= {"taskId", "state", "cost", "urls", "createdAt", "updatedAt", "clientId", "prompt_id"}
    assert (await tasks(g, "alice", state="finished"))["tasks"] == []

    r = await g.http.delete(f"{g.url}/api/tasks/{ids[2]}", headers=g.auth("alice"))
    assert r.json()["state"] == "cancelled"
    every = (await tasks(g, "alice"))["tasks"]  # default state=all
    assert (every[0]["taskId"], every[0]["state"]) == (ids[2], "cancelled")
    assert all(t["state"] in STATES for t in every)
    assert "where" not in every[0]
    assert [t["taskId"] for t in (await tasks(g, "alice", state="finished"))["tasks"]] == [ids[2]]

    # pages: limit + before=next walk the same list
    page1 = await tasks(g, "alice", limit=2)
    page2 = await tasks(g, "alice", limit=2, before=page1["next"])
    assert [t["taskId"] for t in page1["tasks"] + page2["tasks"]] == ids[::-1] and "next" not in page2
    r = await g.http.get(f"{g.url}/api/tasks", params={"state": "done"}, headers=g.auth("alice"))
    assert r.status_code == 400 and r.json()["error"] == "bad_request"


async def test_submit_without_client_id_is_refused(start_gateway: Any) -> None:
    g = await start_gateway(["http://127.0.0.1:9"])
    r = await g.http.post(f"{g.url}/api/tasks", json={"workflow": workflow("txt2img")}, headers=g.auth("alice"))
    assert r.status_code == 400 and r.json()["error"] == "bad_request" and "clientId" in r.json()["detail"]
    assert (await g.balance("alice"))["frozen"] == 0  # nothing was queued


async def test_unknown_routes_and_methods_answer_json(start_gateway: Any) -> None:
    g = await start_gateway(["http://127.0.0.1:9"])
    for method, path, status in (
        ("GET", "/nope", 404),
        ("GET", "/api/nope", 404),
        ("GET", "/static/nope.js", 404),
        ("PUT", "/api/tasks", 405),
        ("DELETE", "/api/balance", 405),
        ("POST", "/healthz", 405),
    ):
        r = await g.http.request(method, f"{g.url}{path}", headers=g.auth("alice"))
        assert r.status_code == status, (method, path, r.text)
        assert r.headers["content-type"] == "application/json", (method, path)
        assert set(r.json()) == {"error", "detail"}, (method, path)


def test_serve_help_shows_real_defaults(capsys: Any) -> None:
    try:
        build_parser().parse_args(["serve", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "default: None" not in text
    assert "default: http://127.0.0.1:8188" in text
