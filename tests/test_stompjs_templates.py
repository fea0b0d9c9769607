"""Workflow templates end to end with the real browser client: @stomp/stompjs 7 (over `ws`, in Node) lists the
templates, runs one template task over STOMP and one over HTTP on the simulator, and reads them back; the queued
messages, the task views and the results carry the template, the resolved parameters (the drawn seed too) and the
cost. Needs ``node`` and ``tests/node/node_modules`` (``scripts/test`` installs them); without them it fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from conftest import GatewayUnderTest, wait_backends_up
from fake_comfyui import FakeComfyUI
from test_stompjs import NODE_DIR, node_or_fail

SCRIPT = NODE_DIR / "stompjs_template.mjs"
NODE_TIMEOUT = 45  # seconds; the script gives up by itself after 30


async def test_stompjs_runs_template_tasks_over_stomp_and_http(
    sim: FakeComfyUI, start_gateway: Any, tmp_path: Path
) -> None:
    node = node_or_fail()
    g: GatewayUnderTest = await start_gateway([sim.url])
    await wait_backends_up(g)
    stomp_params = {"prompt": "a lighthouse at dawn", "steps": 21, "batch_size": 2}  # seed drawn; 2 × 2 credits
    http_params = {"prompt": "a cat", "seed": 1234, "sampler": "ddim", "cfg": 4.5}  # 1 × 1 credit
    cmd = [
        node,
        str(SCRIPT),
        "--ws",
        g.ws_url,
        "--http",
        g.url,
        "--token",
        g.token("alice"),
        "--client-id",
        "sj-1",
        "--template",
        "txt2img",
        "--stomp-params",
        json.dumps(stomp_params),
        "--http-params",
        json.dumps(http_params),
    ]
    with trio.fail_after(NODE_TIMEOUT):
        proc = await trio.run_process(cmd, cwd=NODE_DIR, capture_stdout=True, capture_stderr=True, check=False)
    stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    where = f"\n--- stdout:\n{stdout[-4000:]}\n--- stderr:\n{stderr[-4000:]}"
    assert proc.returncode == 0 and stdout.strip(), f"stompjs_template.mjs failed (exit {proc.returncode}){where}"
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["errors"] == [], where

    assert "txt2img" in [t["name"] for t in out["templates"]["templates"]] and out["templates"]["rawWorkflows"]
    stomp, http = out["stomp"], out["http"]
    assert http["status"] == 202 and http["body"]["cost"] == 1, where
    for run, given, cost in ((stomp, stomp_params, 4), (http, http_params, 1)):
        queued, terminal = run["queued"], run["terminal"]
        assert terminal["type"] == "completed" and terminal["urls"], where
        assert queued["template"] == "txt2img" and queued["cost"] == cost, where
        assert {k: queued["params"][k] for k in given} == given, where
        task = out["tasks"][queued["taskId"]]
        assert (task["state"], task["template"], task["params"], task["cost"]) == (
            "succeeded",
            "txt2img",
            queued["params"],
            cost,
        ), where
        [result] = [r for r in out["results"]["results"] if r["taskId"] == queued["taskId"]]
        assert (result["template"], result["params"]) == ("txt2img", queued["params"]), where
    assert isinstance(stomp["queued"]["params"]["seed"], int)  # drawn, and reported
    assert len(stomp["terminal"]["urls"]) == 2  # batch_size reached ComfyUI's EmptyLatentImage
    assert (await g.balance("alice"))["balance"] == g.initial_credits - 5
