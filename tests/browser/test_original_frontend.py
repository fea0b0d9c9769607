"""Issue 13's "original frontend" in headless Chromium, served from another origin than the gateway: the
documented SockJS + stompjs 2.3.3 code over each SockJS transport, and the same message handling with
@stomp/stompjs 7 over SockJS and over a plain WebSocket. Progress must move, the images must load through a
plain ``<img src>`` (the signed URLs need no header), and a failing task must show its error.

Runs through the browser harness (``_harness.py`` + ``browser_lib.mjs``, shared with the page's tests): a missing
Node, Chromium or tests/node package fails the test (``scripts/test`` installs them), it is never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from _harness import browser_tools, run_scenario
from conftest import GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI

from web.sockjs import SockJSConfig

NODE_PACKAGES = ("playwright-core", "sockjs-client", "stompjs", "@stomp/stompjs")
SIM_ERROR = "sim: the sampler caught fire"


def failing_workflow() -> dict[str, Any]:
    wf = workflow("txt2img")
    loader = next(n for n in wf.values() if n["class_type"] == "CheckpointLoaderSimple")
    loader["inputs"]["sim_error"] = SIM_ERROR  # fails before any progress, so the page's bar is the good task's
    return wf


async def run_page(g: GatewayUnderTest, tmp_path: Path, lib: str, transport: str) -> dict[str, Any]:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    wf = workflow("txt2img")
    next(n for n in wf.values() if n["class_type"] == "KSampler")["inputs"]["steps"] = 8
    good.write_text(json.dumps(wf))
    bad.write_text(json.dumps(failing_workflow()))
    return await run_scenario(
        "original_frontend.mjs",
        f"original-{lib}-{transport}",
        g.url,
        token=g.token("frontend-user"),
        lib=lib,
        transport=transport,
        good=good,
        bad=bad,
    )


@pytest.mark.parametrize(
    ("lib", "transport"),
    [
        ("stompjs2", "websocket"),
        ("stompjs2", "xhr-streaming"),
        ("stompjs2", "xhr-polling"),
        ("stompjs2", "eventsource"),
        ("stomp7", "websocket"),
        ("stomp7", "xhr-streaming"),
        ("stomp7", "xhr-polling"),
        ("stomp7", "plain"),
    ],
)
async def test_original_frontend_in_chromium(
    nursery: trio.Nursery, start_gateway: Any, tmp_path: Path, lib: str, transport: str
) -> None:
    browser_tools(NODE_PACKAGES, page=False)
    sim = FakeComfyUI(step_ms=40, seed=1)
    await nursery.start(sim.serve)
    # xhr-streaming: a 4 KiB response limit makes sockjs-client reopen its stream several times during the task
    web = {"sockjs": SockJSConfig(stream_limit=4096)} if transport == "xhr-streaming" else None
    g: GatewayUnderTest = await start_gateway([sim.url], web=web)
    await wait_backends_up(g)
    out = await run_page(g, tmp_path, lib, transport)
    where = f"\nbrowser log: {out['logs']}\npage console: {out['console']}"
    assert out["transportUsed"] == transport, where  # SockJS did not fall back to another transport
    assert out["good"]["status"] == 202 and out["bad"]["status"] == 202, where
    values = [v for v, _ in out["progress"]]
    assert values and values == sorted(values) and values[-1] == 8 and all(m == 8 for _, m in out["progress"]), where
    assert out["images"] and all(i["naturalWidth"] > 0 for i in out["images"]), where
    good_id = out["good"]["body"]["taskId"]
    assert all(f"/api/images/{good_id}/" in i["src"] and "sig=" in i["src"] for i in out["images"]), where
    assert any(SIM_ERROR in e for e in out["shownErrors"]), where
    assert out["errors"] == [], where  # no uncaught exception in the page
    if transport == "xhr-streaming":  # the stream was ended at 4 KiB and reopened, nothing lost meanwhile
        assert out["requests"].get("xhr_streaming", 0) >= 2, (out["requests"], where)
    if transport == "xhr-polling":
        assert out["requests"].get("xhr", 0) >= 3 and out["requests"].get("xhr_send", 0) >= 2, where
