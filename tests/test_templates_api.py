"""Workflow templates through the whole gateway (real sockets, the ComfyUI simulator): GET /api/templates, template
tasks over HTTP and STOMP priced by their rule and frozen exactly so, refusals that freeze nothing, the raw-workflow
policy and node allow-list, reload by the admin endpoint and by SIGHUP, and every bundled template on the simulator."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import TEST_SECRET, GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI
from stomp_client import StompClient, stomp_connect
from test_e2e_skeleton import _read_line_with

from actors.registry import Refused
from actors.templates import BUNDLED_DIR, load_directory
from web._templates import TemplateLibrary, parse_allowed_nodes, prepare_task
from web.config import WebConfig
from web.errors import http_status

TERMINAL = ("completed", "execution_error", "cancelled")
ROOT = Path(__file__).resolve().parent.parent


async def subscribed(c: StompClient) -> None:
    await c.send_frame("SUBSCRIBE", {"id": "sub-0", "destination": "/user/topic/messages", "receipt": "sub"})
    frame = await c.next_frame()
    assert frame.command == "RECEIPT", frame


def journal(g: GatewayUnderTest, tmp_path: Path, task_id: str) -> list[tuple[str, int]]:
    """(kind, amount) of the ledger journal's entries for one task, read from the store file."""
    with sqlite3.connect(tmp_path / "data" / "gateway.db") as db:
        return db.execute("SELECT kind, amount FROM journal WHERE task_id = ? ORDER BY id", (task_id,)).fetchall()


def freezes(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "data" / "gateway.db") as db:
        return db.execute("SELECT COUNT(*) FROM journal WHERE kind = 'freeze'").fetchone()[0]


async def post_task(g: GatewayUnderTest, user: str, body: dict[str, Any], **token: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {g.token(user, **token)}"}
    return await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", **body}, headers=headers)


async def test_a_template_task_is_priced_by_its_rule_runs_and_carries_its_parameters(
    sim: FakeComfyUI, start_gateway: Any, tmp_path: Path
) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    await wait_backends_up(g)
    listed = (await g.http.get(f"{g.url}/api/templates", headers=g.auth("alice"))).json()
    assert listed["rawWorkflows"] is True
    txt2img = next(t for t in listed["templates"] if t["name"] == "txt2img")
    assert txt2img["cost"] == "batch_size * ceil(steps / 20)"
    assert list(txt2img["params"])[:3] == ["prompt", "negative", "seed"]
    assert txt2img["params"]["seed"]["required"] is False and txt2img["params"]["prompt"]["required"] is True
    assert txt2img["params"]["steps"] | {} == txt2img["params"]["steps"] and "bind" not in json.dumps(listed)
    assert (await g.http.get(f"{g.url}/api/templates")).status_code == 401

    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        # over HTTP: 2 images × ceil(30 / 20) steps-units = 4 credits, seed drawn
        params = {"prompt": "a lighthouse", "steps": 30, "batch_size": 2, "width": 256, "height": 256}
        r = await post_task(g, "alice", {"template": "txt2img", "params": params})
        assert r.status_code == 202 and r.json()["cost"] == 4, r.text
        http_id = r.json()["taskId"]
        msgs = await c.collect_until(lambda m: m.get("type") in TERMINAL and m["taskId"] == http_id)
        queued = next(m for _, m in msgs if m["type"] == "queued")
        assert queued["template"] == "txt2img" and queued["cost"] == 4
        drawn = queued["params"]["seed"]
        assert isinstance(drawn, int) and 0 <= drawn < 2**53
        assert queued["params"] == {
            "prompt": "a lighthouse",
            "negative": "blurry, low quality",
            "seed": drawn,
            "steps": 30,
            "cfg": 7.5,
            "sampler": "euler",
            "width": 256,
            "height": 256,
            "batch_size": 2,
        }
        assert msgs[-1][1]["type"] == "completed"
        # over STOMP: the seed given, the defaults for the rest: 1 × ceil(20 / 20) = 1 credit
        await c.send_frame(
            "SEND",
            {"destination": "/app/tasks", "content-type": "application/json"},
            json.dumps({"clientId": "c1", "template": "txt2img", "params": {"prompt": "a cat", "seed": 42}}),
        )
        msgs = await c.collect_until(lambda m: m.get("type") in TERMINAL)
        stomp_queued = next(m for _, m in msgs if m["type"] == "queued")
        stomp_id = stomp_queued["taskId"]
        assert stomp_queued["cost"] == 1 and stomp_queued["params"]["seed"] == 42 and msgs[-1][1]["type"] == "completed"
        # a raw workflow beside them: size × price, and no template fields
        raw = await g.submit("alice", workflow("txt2img"))
        await c.collect_until(lambda m: m.get("type") in TERMINAL and m["taskId"] == raw["taskId"])

    # the ledger froze exactly the rule's price, and settled it
    assert journal(g, tmp_path, http_id) == [("freeze", 4), ("settle", 4)]
    assert journal(g, tmp_path, stomp_id) == [("freeze", 1), ("settle", 1)]
    assert (await g.balance("alice"))["balance"] == g.initial_credits - 4 - 1 - g.price
    # the task view and the results history carry the template and the resolved parameters
    view = (await g.http.get(f"{g.url}/api/tasks/{http_id}", headers=g.auth("alice"))).json()
    assert (view["state"], view["template"], view["params"], view["cost"]) == (
        "succeeded",
        "txt2img",
        queued["params"],
        4,
    )
    results = (await g.http.get(f"{g.url}/api/results", headers=g.auth("alice"))).json()["results"]
    by_id = {t["taskId"]: t for t in results}
    assert by_id[stomp_id]["template"] == "txt2img" and by_id[stomp_id]["params"] == stomp_queued["params"]
    assert by_id[http_id]["params"]["seed"] == drawn
    assert "template" not in by_id[raw["taskId"]] and "params" not in by_id[raw["taskId"]]
    # and ComfyUI ran the graph built from them
    history = (await g.http.get(f"{sim.url}/history/{view['prompt_id']}")).json()
    graph = history[view["prompt_id"]]["prompt"][2]
    assert graph["3"]["inputs"]["seed"] == drawn and graph["3"]["inputs"]["steps"] == 30
    assert graph["5"]["inputs"] == {"width": 256, "height": 256, "batch_size": 2}
    assert graph["6"]["inputs"]["text"] == "a lighthouse"


async def test_bad_parameters_are_refused_by_name_and_nothing_is_frozen(
    sim: FakeComfyUI, start_gateway: Any, tmp_path: Path
) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], initial_credits=3)
    cases = [
        (
            {"template": "txt2img", "params": {"prompt": "x", "steps": 500, "bogus": 1, "width": "512"}},
            "bad_params",
            [
                "bogus: unknown parameter",
                "steps: 500 is above the maximum 100",
                'width: must be an integer, not string "512"',
            ],
        ),
        ({"template": "txt2img", "params": {"steps": 20}}, "bad_params", ["prompt: is required"]),
        (
            {"template": "txt2img", "params": {"prompt": "x", "sampler": "nope"}},
            "bad_params",
            ["sampler: must be one of"],
        ),
        (
            {"template": "txt2img", "params": {"prompt": "x", "seed": -1}},
            "bad_params",
            ["seed: -1 is below the minimum 0"],
        ),
        ({"template": "txt2img", "params": "prompt=x"}, "bad_params", ["params: must be a JSON object"]),
        ({"template": "nope"}, "unknown_template", ["no template 'nope'", "txt2img"]),
        (
            {"template": "txt2img", "params": {"prompt": "x"}, "workflow": workflow("txt2img")},
            "bad_request",
            ["'workflow' does not go with 'template'"],
        ),
        ({"template": "txt2img", "params": {"prompt": "x"}, "size": 2}, "bad_request", ["'size' does not go"]),
        # well formed, but the rule's price (4 × ceil(20 / 20) = 4) is more than the 3 credits alice has
        (
            {"template": "txt2img", "params": {"prompt": "x", "batch_size": 4}},
            "insufficient_credits",
            ["3 credits available, 4 needed"],
        ),
    ]
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        for body, code, phrases in cases:
            r = await post_task(g, "alice", body)
            assert r.status_code == (402 if code == "insufficient_credits" else 400), r.text
            assert r.json()["error"] == code, r.text
            for phrase in phrases:
                assert phrase in r.json()["detail"], (phrase, r.json())
            await c.send_frame("SEND", {"destination": "/app/tasks"}, json.dumps({"clientId": "c1", **body}))
            _, msg = await c.next_message()
            assert msg == {"type": "rejected", "error": code, "detail": r.json()["detail"]}
    assert await g.balance("alice") == {"userId": "alice", "balance": 3, "frozen": 0, "available": 3}
    assert freezes(tmp_path) == 0


async def test_raw_workflows_for_admins_only(sim: FakeComfyUI, start_gateway: Any, tmp_path: Path) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], web={"raw_workflows": "admin"})
    user = (await g.http.get(f"{g.url}/api/templates", headers=g.auth("alice"))).json()
    admin = (
        await g.http.get(f"{g.url}/api/templates", headers={"Authorization": f"Bearer {g.token('root', admin=True)}"})
    ).json()
    assert user["rawWorkflows"] is False and admin["rawWorkflows"] is True
    assert user["templates"] == admin["templates"]

    r = await post_task(g, "alice", {"workflow": workflow("txt2img")})
    assert r.status_code == 403 and r.json()["error"] == "raw_workflow_forbidden", r.text
    assert "--raw-workflows admin" in r.json()["detail"]
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        await c.send_frame("SEND", {"destination": "/app/tasks"}, json.dumps({"workflow": workflow("txt2img")}))
        _, msg = await c.next_message()
        assert msg["type"] == "rejected" and msg["error"] == "raw_workflow_forbidden"
    assert freezes(tmp_path) == 0
    # the admin's raw workflow and the user's template task are accepted
    r = await post_task(g, "root", {"workflow": workflow("txt2img")}, admin=True)
    assert r.status_code == 202 and r.json()["cost"] == g.price, r.text
    r = await post_task(g, "alice", {"template": "txt2img", "params": {"prompt": "x"}})
    assert r.status_code == 202, r.text


async def test_allowed_nodes_refuse_a_raw_workflow_naming_the_node(
    sim: FakeComfyUI, start_gateway: Any, tmp_path: Path
) -> None:
    standard = {n["class_type"] for n in workflow("txt2img").values()}
    g: GatewayUnderTest = await start_gateway(
        [sim.url], web={"allowed_nodes": frozenset(standard - {"SaveImage"} | {"PreviewImage"})}
    )
    r = await post_task(g, "alice", {"workflow": workflow("txt2img")})
    assert r.status_code == 400 and r.json()["error"] == "node_not_allowed", r.text
    assert r.json()["detail"].startswith("node 9 (SaveImage) not in --allowed-nodes")
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        await c.send_frame("SEND", {"destination": "/app/tasks"}, json.dumps({"workflow": workflow("txt2img")}))
        _, msg = await c.next_message()
        assert msg["type"] == "rejected" and msg["error"] == "node_not_allowed" and "SaveImage" in msg["detail"]
    assert await g.balance("alice") == {"userId": "alice", "balance": 100, "frozen": 0, "available": 100}
    assert freezes(tmp_path) == 0
    previewing = workflow("txt2img")
    previewing["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    assert (await post_task(g, "alice", {"workflow": previewing})).status_code == 202
    # a template's graph is the operator's: it may use any node (txt2img saves with SaveImage)
    assert (await post_task(g, "alice", {"template": "txt2img", "params": {"prompt": "x"}})).status_code == 202


def cheap_template(cost: str = "1") -> dict[str, Any]:
    return {
        "name": "cheap",
        "title": "Cheap",
        "workflow": workflow("txt2img"),
        "cost": cost,
        "params": {"prompt": {"type": "string", "default": "a cat", "bind": ["6.inputs.text"]}},
    }


async def test_admin_reload_picks_up_a_change_and_reports_broken_files(
    sim: FakeComfyUI, start_gateway: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    shutil.copy(BUNDLED_DIR / "txt2img.json", folder)
    (folder / "cheap.json").write_text(json.dumps(cheap_template()))
    g: GatewayUnderTest = await start_gateway([sim.url], web={"templates_dir": str(folder)})
    admin = {"Authorization": f"Bearer {g.token('root', admin=True)}"}

    async def listed() -> dict[str, str]:
        r = await g.http.get(f"{g.url}/api/templates", headers=g.auth("alice"))
        return {t["name"]: t["cost"] for t in r.json()["templates"]}

    assert await listed() == {"cheap": "1", "txt2img": "batch_size * ceil(steps / 20)"}
    (folder / "cheap.json").write_text(json.dumps(cheap_template("2 + 3")))
    (folder / "broken.json").write_text(json.dumps(cheap_template("steps")))
    (folder / "extra.json").write_text(json.dumps(cheap_template() | {"name": "extra"}))
    r = await g.http.post(f"{g.url}/api/admin/templates/reload", headers=g.auth("alice"))
    assert r.status_code == 403
    assert await listed() == {"cheap": "1", "txt2img": "batch_size * ceil(steps / 20)"}  # nothing reloaded yet

    r = await g.http.post(f"{g.url}/api/admin/templates/reload", headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["templates"] == ["cheap", "extra", "txt2img"]
    [error] = r.json()["errors"]
    assert error["file"] == "broken.json" and error["field"] == "cost" and "'steps' is not a numeric" in error["error"]
    assert await listed() == {"cheap": "2 + 3", "extra": "1", "txt2img": "batch_size * ceil(steps / 20)"}
    r = await post_task(g, "alice", {"template": "cheap"})
    assert r.status_code == 202 and r.json()["cost"] == 5, r.text

    shutil.rmtree(folder)  # an unreadable directory: the loaded templates stay
    r = await g.http.post(f"{g.url}/api/admin/templates/reload", headers=admin)
    assert r.status_code == 500 and r.json()["error"] == "reload_failed", r.text
    assert set(await listed()) == {"cheap", "extra", "txt2img"}


async def test_every_bundled_template_runs_on_the_simulator(sim: FakeComfyUI, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url], initial_credits=10_000)
    await wait_backends_up(g)
    catalog = load_directory(BUNDLED_DIR)
    assert catalog.templates and not catalog.errors
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        for t in catalog.templates.values():
            required = {n: "a test" if p.type == "string" else p.low for n, p in t.params.items() if p.required}
            r = await post_task(g, "alice", {"template": t.name, "params": required})
            assert r.status_code == 202, (t.name, r.text)
            task_id = r.json()["taskId"]
            msgs = await c.collect_until(lambda m, t=task_id: m.get("type") in TERMINAL and m["taskId"] == t)
            assert msgs[-1][1]["type"] == "completed", (t.name, msgs[-1])


async def test_sighup_reloads_the_templates(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "cheap.json").write_text(json.dumps(cheap_template()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"PYTHONUNBUFFERED": "1", "GATEWAY_SECRET": TEST_SECRET.decode(), "GATEWAY_TEMPLATES": str(folder)}
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "web.cli",
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--data",
            str(tmp_path / "data"),
            "--comfyui",
            "http://127.0.0.1:9",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    buf = bytearray()

    async def line_with(needle: bytes) -> str:
        with trio.fail_after(20):
            return (await _read_line_with(proc.stdout, needle, buf)).decode()

    try:
        url = (await line_with(b"comfy-gateway serving on ")).rsplit(" ", 1)[1]
        from web.auth import Authenticator

        headers = {"Authorization": f"Bearer {Authenticator(TEST_SECRET).issue('alice')}"}
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{url}/api/templates", headers=headers)
            assert [(t["name"], t["cost"]) for t in r.json()["templates"]] == [("cheap", "1")]
            (folder / "cheap.json").write_text(json.dumps(cheap_template("7")))
            proc.send_signal(signal.SIGHUP)
            assert "templates reloaded: cheap" in await line_with(b"SIGHUP")
            r = await http.get(f"{url}/api/templates", headers=headers)
            assert [(t["name"], t["cost"]) for t in r.json()["templates"]] == [("cheap", "7")]
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- the policy alone ----------------------------------------------------------------------------------------


def test_raw_workflow_policy_and_allowed_nodes_file(tmp_path: Path) -> None:
    library = TemplateLibrary()
    raw = {"workflow": workflow("txt2img")}
    for policy, admin, status in [
        ("all", False, None),
        ("admin", False, 403),
        ("admin", True, None),
        ("none", True, 403),
        ("none", False, 403),
    ]:
        got = prepare_task(raw, library, WebConfig(raw_workflows=policy), admin=admin)
        assert (http_status(got.code) if isinstance(got, Refused) else None) == status, (policy, admin, got)
    with pytest.raises(ValueError, match="raw_workflows must be one of"):
        WebConfig(raw_workflows="users")

    listing = tmp_path / "nodes.txt"
    listing.write_text("# the standard graph\nKSampler, VAEDecode\n\nSaveImage  # output\n")
    assert parse_allowed_nodes(f"@{listing}") == {"KSampler", "VAEDecode", "SaveImage"}
    assert parse_allowed_nodes(" KSampler ,SaveImage,") == {"KSampler", "SaveImage"}
    assert parse_allowed_nodes("") is None
    for bad in (",", f"@{tmp_path / 'missing.txt'}"):
        with pytest.raises(ValueError, match="--allowed-nodes"):
            parse_allowed_nodes(bad)
    assert getattr(prepare_task(raw | {"template": None}, library, WebConfig(), admin=False), "size", None) == 1
    got = prepare_task(raw, library, WebConfig(allowed_nodes=frozenset({"KSampler"})), admin=True)
    assert getattr(got, "error", None) == "node_not_allowed"  # the allow-list holds for admins too
    assert getattr(got, "detail", "").startswith("nodes 4 (CheckpointLoaderSimple), 6 (CLIPTextEncode), 7 (CLIP")


def test_serve_refuses_a_missing_templates_directory_or_allowed_nodes_file(tmp_path: Path) -> None:
    from web.cli import main

    with pytest.raises(SystemExit, match=r"--templates .*missing: not a directory"):
        main(["serve", "--templates", str(tmp_path / "missing"), "--data", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--allowed-nodes @.*nodes\.txt: cannot read it"):
        main(["serve", "--allowed-nodes", f"@{tmp_path / 'nodes.txt'}", "--data", str(tmp_path)])
