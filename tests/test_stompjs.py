"""End to end with the real browser client: @stomp/stompjs 7 (over the `ws` WebSocket, in Node) against the
whole gateway and the ComfyUI simulator.

``tests/node/stompjs_flow.mjs`` connects, subscribes to ``/user/topic/messages``, submits a task with
``SEND /app/tasks``, drops its socket after the first ``progress``, lets stompjs reconnect by itself, resumes with
``last-seq`` and, once the task is finished, disconnects with stompjs's DISCONNECT + RECEIPT. It prints one JSON
line, checked here. An independent observer (tests/stomp_client.py) on the same session records when the gateway
sent each ``seq``, which tells which of the messages stompjs got after the reconnect could only come from replay.

Needs ``node`` and ``tests/node/node_modules`` (``scripts/test`` installs them); without them the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI
from stomp_client import StompClient, stomp_connect

NODE_DIR = Path(__file__).resolve().parent / "node"
FLOW_SCRIPT = NODE_DIR / "stompjs_flow.mjs"
NODE_PACKAGES = ("@stomp/stompjs", "ws")
STEP_MS = 20  # 20 KSampler steps at 20 ms: the task outlives stompjs's 300 ms reconnect delay
CLIENT_ID = "stompjs-1"
NODE_TIMEOUT = 45  # seconds; the script gives up by itself after 30
OBSERVER_TIMEOUT = 60
NOISE = ("Received data", "<<< PONG", ">>> PING")  # stompjs debug lines left out of failure reports


def node_or_fail() -> str:
    """The ``node`` executable, or a test failure saying how to get it and the packages (never a skip)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "`node` is not on PATH: the stompjs end-to-end test needs Node.js >= 18. Install it, then run "
            "scripts/test (it installs tests/node's packages).",
            pytrace=False,
        )
    missing = [p for p in NODE_PACKAGES if not (NODE_DIR / "node_modules" / p / "package.json").is_file()]
    if missing:
        pytest.fail(
            f"tests/node/node_modules lacks {', '.join(missing)}: run scripts/test (it runs `npm install` in "
            "tests/node), or `npm ci` in tests/node.",
            pytrace=False,
        )
    return node


def collapse(types: list[str]) -> list[str]:
    out: list[str] = []
    for t in types:
        if not out or out[-1] != t:
            out.append(t)
    return out


async def observe(
    c: StompClient, seen: dict[int, tuple[float, str]], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Subscribe to the session's messages, report started once the SUBSCRIBE is acknowledged (nothing sent after
    that is missed), then record for every seq the wall-clock ms it arrived (comparable with Node's Date.now())
    and its type."""
    await c.send_frame("SUBSCRIBE", {"id": "sub-0", "destination": "/user/topic/messages", "receipt": "sub"})
    frame = await c.next_frame()
    assert frame.command == "RECEIPT" and frame.headers["receipt-id"] == "sub", frame
    task_status.started()
    while True:
        headers, body = await c.next_message(timeout=OBSERVER_TIMEOUT)
        seen[int(headers["seq"])] = (time.time() * 1000, str(body.get("type")))


async def run_flow(node: str, g: GatewayUnderTest, token: str, wf: Path, drop: str) -> dict[str, Any]:
    cmd = [
        node,
        str(FLOW_SCRIPT),
        "--ws",
        g.ws_url,
        "--http",
        g.url,
        "--token",
        token,
        "--client-id",
        CLIENT_ID,
        "--workflow",
        str(wf),
        "--drop",
        drop,
    ]
    with trio.fail_after(NODE_TIMEOUT):
        proc = await trio.run_process(
            cmd,
            cwd=NODE_DIR,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "STOMP_DEBUG": "1"},
        )
    stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    stderr = "\n".join(line for line in stderr.splitlines() if not line.endswith(NOISE))
    where = f"\n--- stdout:\n{stdout}\n--- stompjs debug (tail):\n{stderr[-6000:]}"
    lines = stdout.strip().splitlines()
    assert lines, f"stompjs_flow.mjs printed nothing (exit {proc.returncode}){where}"
    out = json.loads(lines[-1])
    assert proc.returncode == 0, f"stompjs_flow.mjs failed (exit {proc.returncode}): {out.get('error')}{where}"
    out["_where"] = where
    return out


# "terminate": ws.terminate() on the underlying socket, a network drop as the gateway sees it (no close frame);
# "force": stompjs's own client.forceDisconnect() (a WebSocket close handshake, no STOMP DISCONNECT).
@pytest.mark.parametrize("drop", ["terminate", "force"])
async def test_stompjs_reconnects_and_resumes_without_gap_or_duplicate(
    nursery: trio.Nursery, start_gateway: Any, tmp_path: Path, drop: str
) -> None:
    node = node_or_fail()
    sim = FakeComfyUI(step_ms=STEP_MS, seed=1)
    await nursery.start(sim.serve)
    g: GatewayUnderTest = await start_gateway([sim.url])
    await wait_backends_up(g)
    wf = tmp_path / "txt2img.json"
    wf.write_text(json.dumps(workflow("txt2img")))
    token = g.token("alice")

    seen: dict[int, tuple[float, str]] = {}
    async with stomp_connect(g.ws_url, token=token, client_id=CLIENT_ID) as observer, trio.open_nursery() as n:
        await n.start(observe, observer, seen)
        out = await run_flow(node, g, token, wf, drop)
        last = max((m["seq"] for m in out["messages"]), default=0)
        with trio.fail_after(5):  # the observer got as far as stompjs did
            while last not in seen:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()

    where = out.pop("_where")
    msgs: list[dict[str, Any]] = out["messages"]
    assert out["errors"] == [], f"{out['errors']}{where}"
    assert out["connects"] == 2, f"expected one connect plus one automatic reconnect{where}"

    # the reconnect resumed from the highest seq seen before it
    first, second = out["subscribes"]
    assert first["lastSeq"] is None
    assert second["lastSeq"] == max(m["seq"] for m in msgs if m["conn"] == 1), where

    # every seq exactly once, consecutive, across the drop; each the same message the observer got
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (
        f"seq gap or duplicate across the reconnect (after last-seq {second['lastSeq']}): "
        f"{[(m['seq'], m['type'], m['conn']) for m in msgs]}{where}"
    )
    assert [m["type"] for m in msgs if m["seq"] in seen] == [seen[s][1] for s in seqs if s in seen], where

    task_id = out["taskId"]
    mine = [m for m in msgs if m["taskId"] == task_id]
    assert collapse([m["type"] for m in mine if m["type"] != "preview"]) in (
        ["queued", "started", "progress", "imageResult", "completed"],
        ["queued", "started", "progress", "completed"],
    ), f"{[(m['seq'], m['type']) for m in mine]}{where}"
    assert [m["value"] for m in mine if m["type"] == "progress"] == list(range(1, 21)), where

    # the drop happened mid-task, and the messages the gateway sent while stompjs was away came by replay:
    # the observer had them before stompjs even sent its second SUBSCRIBE
    assert next(m["conn"] for m in mine if m["type"] == "progress") == 1
    assert mine[-1]["conn"] == 2
    replayed = [m["seq"] for m in msgs if m["conn"] == 2 and m["seq"] in seen and seen[m["seq"]][0] < second["at"]]
    assert replayed, f"nothing was replayed: the task did not outlive the drop{where}"
    assert replayed[0] == second["lastSeq"] + 1, where

    assert out["disconnectReceipt"] is True, f"no RECEIPT for stompjs's DISCONNECT{where}"
    assert out["httpTask"] == {"status": 200, "state": "succeeded"}, where
