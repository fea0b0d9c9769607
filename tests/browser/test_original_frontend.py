"""Issue 13's "original frontend" in headless Chromium, served from another origin than the gateway: the
documented SockJS + stompjs 2.3.3 code over each SockJS transport, and the same message handling with
@stomp/stompjs 7 over SockJS and over a plain WebSocket. Progress must move, the images must load through a
plain ``<img src>`` (the signed URLs need no header), and a failing task must show its error.

Needs ``node``, ``/usr/bin/chromium`` and tests/node's packages (``scripts/test`` installs all three); without
them the test fails, it is never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI

from web.sockjs import SockJSConfig

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE.parent / "node"
DRIVER = HERE / "original_frontend.mjs"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE_PACKAGES = ("playwright-core", "sockjs-client", "stompjs", "@stomp/stompjs")
SIM_ERROR = "sim: the sampler caught fire"
DRIVER_TIMEOUT = 90  # seconds for the whole browser run (the driver's own waits are 30 s each)


def tools_or_fail() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "`node` is not on PATH: the browser tests need Node.js >= 18 (scripts/test expects it).", pytrace=False
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/test (it installs Debian's chromium with apt-get).", pytrace=False
        )
    missing = [p for p in NODE_PACKAGES if not (NODE_DIR / "node_modules" / p / "package.json").is_file()]
    if missing:
        pytest.fail(
            f"tests/node/node_modules lacks {', '.join(missing)}: run scripts/test (npm install).", pytrace=False
        )
    return node


def failing_workflow() -> dict[str, Any]:
    wf = workflow("txt2img")
    loader = next(n for n in wf.values() if n["class_type"] == "CheckpointLoaderSimple")
    loader["inputs"]["sim_error"] = SIM_ERROR  # fails before any progress, so the page's bar is the good task's
    return wf


async def run_page(node: str, g: GatewayUnderTest, tmp_path: Path, lib: str, transport: str) -> dict[str, Any]:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    wf = workflow("txt2img")
    next(n for n in wf.values() if n["class_type"] == "KSampler")["inputs"]["steps"] = 8
    good.write_text(json.dumps(wf))
    bad.write_text(json.dumps(failing_workflow()))
    cmd = [node, str(DRIVER), g.url, g.token("frontend-user"), lib, transport, str(good), str(bad)]
    with trio.fail_after(DRIVER_TIMEOUT):
        proc = await trio.run_process(cmd, cwd=NODE_DIR, capture_stdout=True, capture_stderr=True, check=False)
    stdout = proc.stdout.decode(errors="replace").strip()
    where = f"\n--- stdout:\n{stdout[-6000:]}\n--- stderr:\n{proc.stderr.decode(errors='replace')[-3000:]}"
    assert stdout, f"the driver printed nothing (exit {proc.returncode}){where}"
    out: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    assert out["ok"], f"{out.get('failure')}{where}"
    out["_where"] = where
    return out


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
    node = tools_or_fail()
    sim = FakeComfyUI(step_ms=40, seed=1)
    await nursery.start(sim.serve)
    # xhr-streaming: a 4 KiB response limit makes sockjs-client reopen its stream several times during the task
    web = {"sockjs": SockJSConfig(stream_limit=4096)} if transport == "xhr-streaming" else None
    g: GatewayUnderTest = await start_gateway([sim.url], web=web)
    await wait_backends_up(g)
    out = await run_page(node, g, tmp_path, lib, transport)
    where = out.pop("_where")
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
