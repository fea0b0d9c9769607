"""Tests of ``scripts/fake_comfyui.py`` against the transcripts of a real ComfyUI 0.3.64 (tests/data/comfyui-transcripts).

Real sockets on 127.0.0.1, port 0, with trio-websocket and httpx clients. Tests that run prompts run under
``MockClock(autojump_threshold=0)``: sampler steps cost no real time and timings are exact. (pytest-trio only
uses a clock that the test function itself takes, hence the ``autojump_clock`` argument next to ``sim``.) Every
network test has a ``trio.fail_after`` net: virtual seconds under the mock clock, so a hang fails at once.
Transcript comparisons check shapes (event types in order, key sets), not values.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import signal
import struct
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fake_comfyui
import httpx
import pytest
import trio
import trio.testing
from comfysim._constants import BURST_STEPS
from comfysim._execution import _PromptRun
from comfysim._records import _QueueItem
from comfysim._socket import _ws_frame
from comfysim._state import SimState
from conftest import TRANSCRIPTS as TRANSCRIPTS_DIR  # tests/data: recordings and workflows
from conftest import WORKFLOWS
from fake_comfyui import FakeComfyUI
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

STEP_MS = 50.0
STEP_S = STEP_MS / 1000
NET_S = 60  # per network test; virtual seconds under the autojump clock
CLI_NET_S = 30  # real seconds: the CLI test starts a Python process


# --- reading transcripts and workflows ------------------------------------------------------------------


def _shared_file(path: Path) -> Path:
    assert path.exists(), f"{path} is missing (tests/data is part of the repo)"
    return path


def transcript(name: str) -> list[dict[str, Any]]:
    text = _shared_file(TRANSCRIPTS_DIR / f"{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def transcript_workflow(name: str) -> dict[str, Any]:
    return json.loads(_shared_file(TRANSCRIPTS_DIR / "workflows" / f"{name}.json").read_text())


def shared_workflow(name: str) -> dict[str, Any]:
    return json.loads(_shared_file(WORKFLOWS / f"{name}.json").read_text())


@dataclass(frozen=True)
class Msg:
    type: str  # the JSON "type", or "binary:<event type>"
    data: Any


def recorded(lines: list[dict[str, Any]], conn: str) -> list[Msg]:
    """What socket ``conn`` received in a transcript, as Msg."""
    messages = []
    for line in lines:
        if line["dir"] == "recv" and line.get("conn") == conn:
            if line["kind"] == "text":
                messages.append(Msg(line["data"]["type"], line["data"]["data"]))
            elif line["kind"] == "binary":
                messages.append(Msg(f"binary:{line['data']['event_type']}", line["data"]))
    return messages


def recorded_prompt_bodies(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        line["data"]["body"]
        for line in lines
        if line["dir"] == "http"
        and line["kind"] == "request"
        and line["data"]["path"] == "/prompt"
        and "body" in line["data"]
    ]


def recorded_exchanges(lines: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request, response) pairs of a transcript's HTTP lines, in order."""
    requests = [line["data"] for line in lines if line["dir"] == "http" and line["kind"] == "request"]
    responses = [line["data"] for line in lines if line["dir"] == "http" and line["kind"] == "response"]
    assert len(requests) == len(responses)
    return list(zip(requests, responses, strict=True))


def types(messages: list[Msg]) -> list[str]:
    return [message.type for message in messages]


def shape(message: Msg) -> tuple[Any, ...]:
    """What must match between simulator and transcript: the type and the key sets, not the values."""
    data = message.data
    if message.type == "binary:4":
        return (message.type, frozenset(data["metadata"]))
    if message.type.startswith("binary:"):
        return (message.type,)
    keys = frozenset(data)
    if message.type == "progress_state":
        return (message.type, keys, frozenset(key for node in data["nodes"].values() for key in node))
    if message.type == "executed":
        return (message.type, keys, frozenset(data["output"] or ()))
    if message.type == "status":
        return (message.type, keys, frozenset(data["status"]["exec_info"]))
    return (message.type, keys)


def shapes(messages: list[Msg]) -> list[tuple[Any, ...]]:
    return [shape(message) for message in messages]


def key_tree(value: Any) -> Any:
    """The structure of a JSON value with the leaves blanked: equal trees = same keys everywhere."""
    if isinstance(value, dict):
        return {key: key_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [key_tree(item) for item in value]
    return None


def segments(messages: list[Msg]) -> list[list[Msg]]:
    """Split a socket's messages after each queue run: a status with queue_remaining 0 (and the idle
    ``executing`` that follows it when the prompt has a client)."""
    result: list[list[Msg]] = [[]]
    for message in messages:
        if message.type == "executing" and message.data.get("node") is None and not result[-1] and len(result) > 1:
            result[-2].append(message)
            continue
        result[-1].append(message)
        if message.type == "status" and message.data["status"]["exec_info"]["queue_remaining"] == 0:
            result.append([])
    return [segment for segment in result if segment]


def loose_tree(value: Any) -> Any:
    """Like key_tree, but a list is represented by its first element only (lengths may differ)."""
    if isinstance(value, dict):
        return {key: loose_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [loose_tree(item) for item in value[:1]]
    return None


def node_blocks(messages: list[Msg]) -> list[tuple[str, list[str]]]:
    """Per-node event groups: from progress_state(running) to the progress_state where that node finished."""
    blocks: list[tuple[str, list[str]]] = []
    block: list[str] = []
    node = None
    for message in messages:
        block.append(message.type)
        if message.type == "executing":
            node = message.data["node"]
        if message.type == "progress_state" and node is not None and message.data["nodes"][node]["state"] == "finished":
            blocks.append((node, block))
            block, node = [], None
    assert not block, f"unterminated node block {block}"
    return blocks


def block_pattern(block_types: list[str]) -> tuple[str, ...]:
    """A node block with its repeated progress steps folded into one "step*" (modulo step count)."""
    step = ("progress_state", "progress")
    folded: list[str] = []
    index = 0
    while index < len(block_types):
        if index >= 2 and tuple(block_types[index : index + 2]) == step and index + 2 < len(block_types):
            index += 2
            while index < len(block_types) and block_types[index].startswith("binary:"):
                index += 1
            if not folded or folded[-1] != "step*":
                folded.append("step*")
            continue
        if block_types[index].startswith("binary:") and folded and folded[-1] == "step*":
            index += 1
            continue
        folded.append(block_types[index])
        index += 1
    return tuple(folded)


def recorded_blocks(name: str) -> list[tuple[str, list[str]]]:
    messages = recorded(transcript(name), "primary")
    start = types(messages).index("execution_cached") + 1
    end = types(messages).index("execution_success")
    return node_blocks(messages[start:end])


# --- a recording WebSocket client ------------------------------------------------------------------------


def decode(frame: str | bytes) -> Msg:
    if isinstance(frame, str):
        parsed = json.loads(frame)
        return Msg(parsed["type"], parsed["data"])
    event, word = struct.unpack(">II", frame[:8])
    if event == 1:
        return Msg("binary:1", {"image_format": word, "image": frame[8:]})
    if event == 3:
        return Msg("binary:3", {"node_id": frame[8 : 8 + word].decode(), "text": frame[8 + word :].decode()})
    if event == 4:
        return Msg("binary:4", {"metadata": json.loads(frame[8 : 8 + word]), "image": frame[8 + word :]})
    return Msg(f"binary:{event}", {"raw": frame})


class Client:
    """A WebSocket client of the simulator that records what it receives, and when (trio time)."""

    def __init__(self, ws: WebSocketConnection, hello: Msg) -> None:
        self.ws = ws
        self.hello = hello
        self.times: list[float] = []

    async def next(self) -> Msg:
        message = decode(await self.ws.get_message())
        self.times.append(trio.current_time())
        return message

    async def until(self, predicate: Callable[[Msg], bool]) -> list[Msg]:
        got = []
        while True:
            got.append(await self.next())
            if predicate(got[-1]):
                return got

    async def until_idle(self, prompt_id: str) -> list[Msg]:
        """Everything up to the idle ``executing {node: null}`` of ``prompt_id``."""
        return await self.until(lambda m: m.type == "executing" and m.data == {"node": None, "prompt_id": prompt_id})

    async def until_queue_empty(self) -> list[Msg]:
        return await self.until(lambda m: m.type == "status" and m.data["status"]["exec_info"]["queue_remaining"] == 0)

    async def drain(self, seconds: float = 1.0) -> list[Msg]:
        """Whatever arrives within ``seconds``."""
        got = []
        with trio.move_on_after(seconds):
            while True:
                got.append(await self.next())
        return got


@asynccontextmanager
async def connect(
    sim: FakeComfyUI, client_id: str | None = None, *, path: str = "/ws", preview_metadata: bool = False,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[Client]:  # fmt: skip
    query = f"?clientId={client_id}" if client_id is not None else ""
    async with open_websocket_url(f"ws://127.0.0.1:{sim.port}{path}{query}", extra_headers=extra_headers) as ws:
        hello = decode(await ws.get_message())
        assert hello.type == "status" and "sid" in hello.data, hello
        client = Client(ws, hello)
        if preview_metadata:
            await ws.send_message(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            assert (await client.next()).type == "feature_flags"
        yield client


# --- fixtures and helpers --------------------------------------------------------------------------------


@pytest.fixture
async def sim(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> FakeComfyUI:
    simulator = FakeComfyUI(step_ms=STEP_MS, seed=1)
    port = await nursery.start(simulator.serve)
    assert port == simulator.port and simulator.url == f"http://127.0.0.1:{port}"
    return simulator


@pytest.fixture
async def http(sim: FakeComfyUI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        yield client


async def submit(http: httpx.AsyncClient, prompt: dict[str, Any], client_id: str | None = None, **fields: Any) -> str:
    body: dict[str, Any] = {"prompt": prompt, **fields}
    if client_id is not None:
        body["client_id"] = client_id
    response = await http.post("/prompt", json=body)
    assert response.status_code == 200, response.text
    return response.json()["prompt_id"]


async def history_entry(http: httpx.AsyncClient, prompt_id: str) -> dict[str, Any]:
    response = await http.get(f"/history/{prompt_id}")
    assert response.status_code == 200
    return response.json()[prompt_id]


async def start(nursery: trio.Nursery, simulator: FakeComfyUI, port: int = 0) -> Callable[[], Awaitable[None]]:
    """Serve ``simulator`` in its own cancel scope; returns ``kill()``, which returns once it is down."""
    scope, done = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await simulator.serve(port=port, task_status=task_status)
        finally:
            done.set()

    await nursery.start(run)

    async def kill() -> None:
        scope.cancel()
        await done.wait()

    return kill


def with_sleep(prompt: dict[str, Any], node_id: str, milliseconds: float) -> dict[str, Any]:
    changed = copy.deepcopy(prompt)
    changed[node_id]["inputs"]["sim_sleep_ms"] = milliseconds
    return changed


def is_progress(value: int) -> Callable[[Msg], bool]:
    return lambda m: m.type == "progress" and m.data["value"] == value


def node_running(node_id: str) -> Callable[[Msg], bool]:
    return lambda m: m.type == "progress_state" and m.data["nodes"].get(node_id, {}).get("state") == "running"


# --- WebSocket handshake --------------------------------------------------------------------------------


async def test_handshake_sends_status_with_sid(autojump_clock: trio.testing.MockClock, sim: FakeComfyUI) -> None:
    lines = transcript("ws_handshake")
    recorded_hello = recorded(lines, "api-prefix")[0]
    with trio.fail_after(NET_S):
        async with (
            connect(sim, "client-a") as named,
            connect(sim) as anonymous,
            connect(sim, "c2", path="/api/ws") as api,
        ):
            assert named.hello.data == {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "client-a"}
            assert re.fullmatch(r"[0-9a-f]{32}", anonymous.hello.data["sid"])
            assert api.hello.data["sid"] == "c2"
            assert shape(named.hello) == shape(recorded_hello)


async def test_feature_flags_answered_only_for_the_first_message(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI
) -> None:
    lines = transcript("ws_handshake")
    recorded_reply = next(m for m in recorded(lines, "flags") if m.type == "feature_flags")
    with trio.fail_after(NET_S):
        async with connect(sim, "flags") as client:
            await client.ws.send_message(
                json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            )
            reply = await client.next()
            assert reply == recorded_reply
            await client.ws.send_message(json.dumps({"type": "feature_flags", "data": {"x": 1}}))
            await client.ws.send_message("not json")
            assert await client.drain() == []
        async with httpx.AsyncClient(base_url=sim.url) as http:
            assert (await http.get("/features")).json() == recorded_reply.data


# --- event sequences ------------------------------------------------------------------------------------


async def test_happy_path_matches_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("happy_path")
    with trio.fail_after(NET_S):
        async with connect(sim, "primary-1") as primary, connect(sim, "observer-1") as observer:
            prompt_id = await submit(http, transcript_workflow("happy_path"), "primary-1")
            got = await primary.until_idle(prompt_id)
            observer_got = await observer.drain()
        entry = await history_entry(http, prompt_id)
    assert shapes(got) == shapes(recorded(lines, "primary")[1:])
    assert shapes(observer_got) == shapes(recorded(lines, "observer")[1:])  # the second socket: status only
    recorded_entry = next(
        line["data"]["body"] for line in lines if line["kind"] == "response" and line["path"].startswith("/history/")
    )
    assert key_tree(entry) == key_tree(next(iter(recorded_entry.values())))
    assert entry["outputs"] == {
        "3": {"images": [{"filename": "happy_00001_.png", "subfolder": "gw", "type": "output"}]}
    }
    assert [event for event, _ in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]


async def test_txt2img_sequence_and_one_progress_per_sampler_step(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    prompt = shared_workflow("txt2img")
    with trio.fail_after(NET_S):
        async with connect(sim, "t2i") as client:
            prompt_id = await submit(http, prompt, "t2i")
            got = await client.until_idle(prompt_id)
    kinds = types(got)
    assert kinds[:4] == ["status", "status", "execution_start", "execution_cached"]
    assert kinds[-3:] == ["execution_success", "status", "executing"]
    blocks = node_blocks(got[4:-3])
    assert sorted(node for node, _ in blocks) == sorted(prompt)
    allowed = {
        block_pattern(block) for name in ("happy_path", "progress_legacy_preview") for _, block in recorded_blocks(name)
    }
    assert {block_pattern(block) for _, block in blocks} <= allowed
    # KSampler: one progress per step, value 1..steps, step_ms apart, each followed by a legacy PNG preview.
    steps = prompt["3"]["inputs"]["steps"]
    progress_at = [(m.data, t) for m, t in zip(got, client.times, strict=True) if m.type == "progress"]
    assert [data["value"] for data, _ in progress_at] == list(range(1, steps + 1))
    assert {(data["max"], data["node"], data["prompt_id"]) for data, _ in progress_at} == {(steps, "3", prompt_id)}
    assert [b - a for (_, a), (_, b) in itertools.pairwise(progress_at)] == pytest.approx([STEP_S] * (steps - 1))
    previews = [after for before, after in itertools.pairwise(got) if before.type == "progress"]
    assert {m.type for m in previews} == {"binary:1"}
    assert all(m.data["image_format"] == 2 and m.data["image"].startswith(fake_comfyui.PNG_SIGNATURE) for m in previews)


async def test_no_sampler_previews_when_disabled(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    sim.previews = False
    with trio.fail_after(NET_S):
        async with connect(sim, "quiet") as client:
            got = await client.until_idle(await submit(http, shared_workflow("txt2img"), "quiet"))
    assert types(got).count("progress") == 20
    assert not [m for m in got if m.type.startswith("binary:")]


async def test_ksampler_advanced_steps_between_start_and_end(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    prompt = shared_workflow("txt2img")
    sampler = prompt["3"]["inputs"]
    prompt["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **{name: sampler[name] for name in ("model", "cfg", "sampler_name", "scheduler", "positive", "negative")},
            "latent_image": sampler["latent_image"], "add_noise": "enable", "noise_seed": 7, "steps": 10,
            "start_at_step": 2, "end_at_step": 8, "return_with_leftover_noise": "disable",
        },
    }  # fmt: skip
    with trio.fail_after(NET_S):
        async with connect(sim, "advanced") as client:
            got = await client.until_idle(await submit(http, prompt, "advanced"))
    assert [(m.data["value"], m.data["max"]) for m in got if m.type == "progress"] == [(n, 6) for n in range(1, 7)]
    assert got[-3].type == "execution_success"


@pytest.mark.parametrize(
    ("name", "preview_metadata"), [("progress_legacy_preview", False), ("progress_metadata_preview", True)]
)
async def test_save_image_websocket_frames_match_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient, name: str, preview_metadata: bool
) -> None:
    lines = transcript(name)
    with trio.fail_after(NET_S):
        async with connect(sim, "frames", preview_metadata=preview_metadata) as client:
            prompt_id = await submit(http, transcript_workflow("progress_ws_images"), "frames")
            got = await client.until_idle(prompt_id)
    expected = [m for m in recorded(lines, "primary")[1:] if m.type != "feature_flags"]
    assert shapes(got) == shapes(expected)
    frames = [m for m in got if m.type.startswith("binary:")]
    assert len(frames) == 4
    for frame in frames:
        if preview_metadata:
            assert frame.data["metadata"] == {
                "node_id": "3", "prompt_id": prompt_id, "display_node_id": "3", "parent_node_id": None,
                "real_node_id": "3", "image_type": "image/png",
            }  # fmt: skip
        assert frame.data["image"].startswith(fake_comfyui.PNG_SIGNATURE)
    assert [m.data["value"] for m in got if m.type == "progress"] == [0, 1, 2, 3]


async def test_multi_output_and_text_frame_broadcast(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("multi_output")
    with trio.fail_after(NET_S):
        async with connect(sim, "multi") as primary, connect(sim, "watcher") as observer:
            prompt_id = await submit(http, transcript_workflow("multi_output"), "multi")
            got = await primary.until_idle(prompt_id)
            observer_got = await observer.drain()
        entry = await history_entry(http, prompt_id)
    assert shapes(got) == shapes(recorded(lines, "primary")[1:])
    assert shapes(observer_got) == shapes(recorded(lines, "observer")[1:])
    text = next(m for m in observer_got if m.type == "binary:3")
    assert text.data == {"node_id": "7", "text": "width: 128, height: 64\n batch size: 2"}
    assert entry["outputs"]["8"] == {"text": ["128"]} and entry["outputs"]["11"] == {"text": ["hello, world"]}
    assert list(entry["outputs"]) == ["11", "3", "6", "8"] == list(entry["meta"])
    assert [image["type"] for image in entry["outputs"]["6"]["images"]] == ["temp", "temp"]


async def test_view_returns_the_saved_png(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        async with connect(sim, "viewer") as client:
            prompt_id = await submit(http, shared_workflow("txt2img"), "viewer")
            await client.until_idle(prompt_id)
        image = (await history_entry(http, prompt_id))["outputs"]["9"]["images"][0]
        assert image == {"filename": "gateway_00001_.png", "subfolder": "", "type": "output"}
        response = await http.get("/view", params=image)
        api_response = await http.get("/api/view", params=image)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == 'filename="gateway_00001_.png"'
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n") and api_response.content == response.content
    assert fake_comfyui.png_size(response.content) == (fake_comfyui.SAVED_IMAGE_MAX_SIDE_PX,) * 2


# --- failures -------------------------------------------------------------------------------------------


async def test_sim_error_gives_execution_error_and_error_history(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    prompt = shared_workflow("txt2img_sim_error")
    text = prompt["3"]["inputs"]["sim_error"]
    recorded_error = next(m for m in recorded(transcript("runtime_error"), "primary") if m.type == "execution_error")
    with trio.fail_after(NET_S):
        async with connect(sim, "failing") as client:
            prompt_id = await submit(http, prompt, "failing")
            got = await client.until_idle(prompt_id)
        entry = await history_entry(http, prompt_id)
    assert types(got)[-3:] == ["execution_error", "status", "executing"]
    error = got[-3].data
    assert set(error) == set(recorded_error.data)
    assert error["exception_message"] == text + "\n"  # ComfyUI appends "\n" (and OOM tips)
    assert (error["node_id"], error["node_type"], error["exception_type"]) == ("3", "KSampler", "RuntimeError")
    assert sorted(error["executed"]) == ["4", "5", "6", "7"]
    assert error["current_inputs"]["steps"] == [20] and isinstance(error["traceback"], list)
    assert "progress" not in types(got)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1] == ["execution_error", error]
    assert sim.runs[-1].outcome == "error"


async def test_runtime_error_matches_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("runtime_error")
    with trio.fail_after(NET_S):
        async with connect(sim, "regex") as client:
            prompt_id = await submit(http, transcript_workflow("runtime_error"), "regex")
            got = await client.until_idle(prompt_id)
        entry = await history_entry(http, prompt_id)
    expected = recorded(lines, "primary")[1:]
    assert shapes(got) == shapes(expected)
    executing = [m.data["node"] for m in got if m.type == "executing"]
    assert executing == [m.data["node"] for m in expected if m.type == "executing"] == ["4", "5", "1", "2", None]
    error = next(m.data for m in got if m.type == "execution_error")
    assert error["exception_type"] == "re.error"
    assert error["exception_message"] == "missing ), unterminated subpattern at position 0\n"
    assert error["current_inputs"] == {"string": ["abc"], "regex_pattern": ["(unclosed"], "replace": ["x"]}
    assert list(entry["outputs"]) == ["5"]  # the sibling branch's output is kept
    assert entry["status"]["status_str"] == "error"


async def test_fail_rate_fails_prompts_reproducibly(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    outcomes = []
    for _ in range(2):
        simulator = FakeComfyUI(step_ms=1, fail_rate=0.5, seed=1234)
        kill = await start(nursery, simulator)
        with trio.fail_after(NET_S):
            async with httpx.AsyncClient(base_url=simulator.url) as http, connect(simulator, "dice") as client:
                for _ in range(8):
                    prompt_id = await submit(http, shared_workflow("txt2img"), "dice")
                    got = await client.until_idle(prompt_id)
                    if got[-3].type == "execution_error":
                        assert got[-3].data["exception_message"].startswith("Simulated failure")
        outcomes.append([run.outcome for run in simulator.runs])
        await kill()
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {"success", "error"}


# --- validation -----------------------------------------------------------------------------------------


def validation_summary(body: dict[str, Any]) -> dict[str, Any]:
    def error_summary(error: dict[str, Any]) -> tuple[Any, ...]:
        return (error["type"], error["message"], error["details"], sorted(error), sorted(error["extra_info"]))

    return {
        "keys": sorted(body),
        "error": error_summary(body["error"]) if "error" in body else None,
        "node_errors": {
            node_id: (
                sorted(entry),
                entry["class_type"],
                entry["dependent_outputs"],
                sorted(map(error_summary, entry["errors"])),
            )
            for node_id, entry in body["node_errors"].items()
        },
    }


async def test_validation_answers_match_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    exchanges = [
        (req, resp) for req, resp in recorded_exchanges(transcript("validation_errors")) if req["path"] == "/prompt"
    ]
    assert len(exchanges) == 10
    with trio.fail_after(NET_S):
        for request, expected in exchanges:
            if "raw_body" in request:
                response = await http.post("/prompt", content=request["raw_body"].encode())
                assert (response.status_code, response.headers["content-type"], response.text) == (
                    expected["status"], expected["content_type"], expected["body"],
                )  # fmt: skip
                continue
            response = await http.post("/prompt", json=request["body"])
            assert response.status_code == expected["status"], request
            assert validation_summary(response.json()) == validation_summary(expected["body"]), request


async def test_unknown_node_is_rejected_like_comfyui(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("validation_errors")
    recorded_body = next(
        resp["body"] for req, resp in recorded_exchanges(lines) if "NoSuchNodeClass" in json.dumps(req.get("body"))
    )
    with trio.fail_after(NET_S):
        response = await http.post(
            "/prompt", json={"prompt": shared_workflow("txt2img_unknown_node"), "client_id": "x"}
        )
    assert response.status_code == 400
    body = response.json()
    assert key_tree(body) == key_tree(recorded_body)
    assert body["error"] == {
        "type": "invalid_prompt", "message": "Cannot execute because node KSamplerThatDoesNotExist does not exist.",
        "details": "Node ID '#3'", "extra_info": {},
    }  # fmt: skip
    assert sim.submitted == []


async def test_number_advances_for_rejected_prompts_too(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        assert (await http.post("/prompt", json={"client_id": "x"})).status_code == 400
        assert (await http.post("/prompt", json={"prompt": {}})).status_code == 400
        response = await http.post("/api/prompt", json={"prompt": transcript_workflow("happy_path")})
    assert response.json()["number"] == 2


def test_missing_class_type_and_type_mismatch() -> None:
    result = fake_comfyui.validate_prompt({"1": {"inputs": {}}})
    assert result.error == {
        "type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.",
        "details": "Node ID '#1'", "extra_info": {},
    }  # fmt: skip
    mismatch = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "x"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
    }
    result = fake_comfyui.validate_prompt(mismatch)
    assert result.error is not None and result.error["type"] == "prompt_outputs_failed_validation"
    assert [e["type"] for e in result.node_errors["2"]["errors"]] == ["return_type_mismatch"]
    extras = copy.deepcopy(mismatch)
    extras["2"]["inputs"] = {"images": ["3", 0], "filename_prefix": "p", "sim_error": "boom", "sim_sleep_ms": 5}
    extras["3"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    assert fake_comfyui.validate_prompt(extras).ok  # the simulator's extra inputs pass validation


def test_execution_order_is_comfyuis() -> None:
    runtime_error = json.loads(_shared_file(TRANSCRIPTS_DIR / "workflows" / "runtime_error.json").read_text())
    assert fake_comfyui.execution_order(runtime_error, ["3", "5"]) == ["4", "5", "1", "2", "3"]
    assert fake_comfyui.execution_order(runtime_error, ["5", "3"]) == ["4", "5", "1", "2", "3"]
    load_uploaded = json.loads(_shared_file(TRANSCRIPTS_DIR / "workflows" / "load_uploaded.json").read_text())
    assert fake_comfyui.execution_order(load_uploaded, ["3", "4"]) == ["1", "4", "2", "3"]


# --- routing --------------------------------------------------------------------------------------------


async def test_prompts_without_client_id_match_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("no_client_id")
    bodies = recorded_prompt_bodies(lines)
    assert len(bodies) == 3 and all("client_id" not in body for body in bodies)
    # the third prompt was interrupted during a slow ImageBlur (node 3): make that node slow here
    bodies[2] = {"prompt": with_sleep(bodies[2]["prompt"], "3", 1000)}
    got: dict[str, list[Msg]] = {"primary": [], "observer": []}
    with trio.fail_after(NET_S):
        async with connect(sim, "noid-primary") as primary, connect(sim, "noid-observer") as observer:
            for index, body in enumerate(bodies):
                await submit(http, body["prompt"])
                if index == 2:
                    got["primary"] += await primary.until(node_running("3"))
                    assert (await http.post("/interrupt")).status_code == 200
                got["primary"] += await primary.until_queue_empty()
                got["observer"] += await observer.until_queue_empty()
    for conn, messages in got.items():
        expected = recorded(lines, conn)[1:]
        assert [shapes(s) for s in segments(messages)] == [shapes(s) for s in segments(expected)], conn
    interrupted = [m for m in got["observer"] if m.type == "execution_interrupted"]
    assert [m.data["node_id"] for m in interrupted] == ["4"]


async def test_second_socket_gets_no_per_prompt_events(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("second_socket_view")
    with trio.fail_after(NET_S):
        async with connect(sim, "owner") as owner, connect(sim, "bystander") as bystander:
            for name in ("multi_output", "progress_ws_images", "runtime_error"):
                await owner.until_idle(await submit(http, transcript_workflow(name), "owner"))
            seen = await bystander.drain()
    counts = {kind: types(seen).count(kind) for kind in set(types(seen))}
    assert counts == {"status": 9, "binary:3": 1}
    recorded_counts = next(line["counts"] for line in lines if line["data"] == "observer received (by type)")
    assert set(recorded_counts) == {"status", "binary:TEXT"}


async def test_same_client_id_trap_matches_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("same_client_id")
    close_older, older_closed = trio.Event(), trio.Event()

    async def hold_older(task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        async with connect(sim, "shared") as older:
            task_status.started(older)
            await close_older.wait()
        older_closed.set()

    with trio.fail_after(NET_S):
        async with trio.open_nursery() as nursery:
            older = await nursery.start(hold_older)
            async with connect(sim, "shared") as newer:
                first_id = await submit(http, transcript_workflow("happy_path"), "shared")
                got = await newer.until_idle(first_id)
                assert shapes(got) == shapes(recorded(lines, "second")[1:])  # the newer socket gets the events
                assert await older.drain() == []  # the replaced one: nothing, not even status
                close_older.set()
                await older_closed.wait()  # this unregisters "shared", i.e. the newer socket
                second_id = await submit(http, transcript_workflow("happy_path"), "shared")
                assert await newer.drain(2.0) == []  # open, but silent: only /history knows
                assert (await history_entry(http, second_id))["status"]["status_str"] == "success"
            async with connect(sim, "shared") as reconnected:  # a new connection is registered again
                await reconnected.until_idle(await submit(http, transcript_workflow("happy_path"), "shared"))


async def test_reconnect_mid_run_matches_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    recorded_reconnect = recorded(transcript("reconnect_midrun"), "primary-reconnected")
    with trio.fail_after(NET_S):
        async with connect(sim, "reconn") as first:
            prompt_id = await submit(http, shared_workflow("txt2img"), "reconn")
            await first.until(is_progress(3))
        await trio.sleep(4 * STEP_S)  # events of these steps are lost
        async with connect(sim, "reconn") as again:
            assert shape(again.hello) == shape(recorded_reconnect[0])
            assert again.hello.data["status"]["exec_info"]["queue_remaining"] == 1
            catch_up = await again.next()
            assert catch_up == Msg("executing", {"node": "3"})
            assert shape(catch_up) == shape(recorded_reconnect[1])  # no prompt_id, no display_node
            rest = await again.until_idle(prompt_id)
    values = [m.data["value"] for m in rest if m.type == "progress"]
    assert values[0] > 4 and values[-1] == 20


# --- interrupts -----------------------------------------------------------------------------------------


async def test_targeted_interrupt_matches_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("interrupted")
    prompt = with_sleep(transcript_workflow("long_chain"), "3", 1000)  # a long node without progress
    with trio.fail_after(NET_S):
        async with connect(sim, "intr") as client:
            prompt_id = await submit(http, prompt, "intr")
            got = await client.until(lambda m: m.type == "executing" and m.data["node"] == "3")
            response = await http.post("/interrupt", json={"prompt_id": "00000000-not-running"})
            assert (response.status_code, response.content) == (200, b"")
            await trio.sleep(0.5)  # the other prompt id changed nothing: node 3 goes on
            await http.post("/interrupt", json={"prompt_id": prompt_id})
            got += await client.until_idle(prompt_id)
        entry = await history_entry(http, prompt_id)
    assert shapes(got) == shapes(recorded(lines, "primary")[1:])
    interrupted = next(m.data for m in got if m.type == "execution_interrupted")
    assert (interrupted["node_id"], interrupted["node_type"], sorted(interrupted["executed"])) == (
        "4",
        "ImageBlur",
        ["1", "2", "3"],
    )
    assert (entry["status"]["status_str"], entry["status"]["completed"], entry["outputs"]) == ("error", False, {})
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert sim.interrupts == ["00000000-not-running", prompt_id]
    assert sim.runs[-1].outcome == "interrupted"


async def test_global_interrupt_stops_the_sampler_at_the_next_step(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        assert (await http.post("/interrupt")).status_code == 200  # nothing runs: lost
        async with connect(sim, "stop") as client:
            prompt_id = await submit(http, shared_workflow("txt2img"), "stop")
            await client.until(is_progress(5))
            await http.post("/interrupt")
            rest = await client.until_idle(prompt_id)
    assert [kind for kind in types(rest) if not kind.startswith("binary:")] == [
        "execution_interrupted",
        "status",
        "executing",
    ]
    interrupted = next(m.data for m in rest if m.type == "execution_interrupted")
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "KSampler")
    assert [m for m in rest if m.type == "progress"] == []  # the next step did not happen
    assert sim.interrupts == [None, None]


async def test_interrupt_during_frames_matches_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    expected = recorded(transcript("interrupt_during_progress"), "primary")[1:]
    with trio.fail_after(NET_S):
        async with connect(sim, "frames") as client:
            prompt_id = await submit(http, transcript_workflow("progress_long"), "frames")
            got = await client.until(is_progress(3))
            await http.post("/interrupt")
            got += await client.until_idle(prompt_id)
    first_progress = types(expected).index("progress")
    assert shapes(got[: first_progress + 1]) == shapes(expected[: first_progress + 1])
    assert shapes(got[-3:]) == shapes(expected[-3:])
    assert set(types(got[first_progress + 1 : -3])) == set(types(expected[first_progress + 1 : -3]))
    interrupted = got[-3].data
    assert (interrupted["node_id"], interrupted["node_type"], interrupted["executed"]) == (
        "2",
        "SaveImageWebsocket",
        ["1"],
    )


# --- queue ----------------------------------------------------------------------------------------------


async def test_queue_ops(autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient) -> None:
    happy = transcript_workflow("happy_path")
    with trio.fail_after(NET_S):
        async with connect(sim, "queue") as client:
            running_id = await submit(http, with_sleep(transcript_workflow("long_chain"), "3", 5000), "queue")
            await client.until(lambda m: m.type == "execution_start")
            second = await submit(http, happy, "queue", extra_data={"tag": "P2"})
            third = await submit(http, happy, "queue")
            response = await http.post("/prompt", json={"prompt": happy, "client_id": "queue", "front": True})
            front, front_number = response.json()["prompt_id"], response.json()["number"]
            response = await http.post(
                "/prompt", json={"prompt": happy, "client_id": "queue", "prompt_id": "own-id", "number": 1000}
            )
            assert response.json() == {"prompt_id": "own-id", "number": 1000.0, "node_errors": {}}
            queue = (await http.get("/queue")).json()
            assert [item[1] for item in queue["queue_running"]] == [running_id]
            pending = {item[1]: item for item in queue["queue_pending"]}
            assert set(pending) == {second, third, front, "own-id"}
            assert all(len(item) == 5 for item in queue["queue_pending"])
            assert pending[second][3] == {"tag": "P2", "client_id": "queue"} and pending[second][4] == ["3"]
            assert front_number == -3 and pending[front][0] == -3 and pending["own-id"][0] == 1000.0
            assert (await http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 5}}
            await client.until(lambda m: m.type == "status" and m.data["status"]["exec_info"]["queue_remaining"] == 5)
            response = await http.post("/queue", json={"delete": [third, running_id]})  # the running one: no effect
            assert (response.status_code, response.content) == (200, b"")
            await client.until(lambda m: m.type == "status" and m.data["status"]["exec_info"]["queue_remaining"] == 4)
            await http.post("/interrupt", json={"prompt_id": running_id})
            await client.until_idle("own-id")
        assert (await http.get(f"/history/{third}")).json() == {}
    assert [run.prompt_id for run in sim.runs] == [running_id, front, second, "own-id"]
    assert [run.outcome for run in sim.runs] == ["interrupted", "success", "success", "success"]
    assert sim.submitted == [running_id, second, third, front, "own-id"]
    assert sim.max_in_queue == 5


async def test_queue_clear(autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient) -> None:
    with trio.fail_after(NET_S):
        sim.pause()
        ids = [await submit(http, transcript_workflow("happy_path")) for _ in range(3)]
        assert (await http.get("/prompt")).json()["exec_info"]["queue_remaining"] == 3
        assert (await http.post("/api/queue", json={"clear": True})).status_code == 200
        assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        sim.resume()
        await trio.sleep(1)
        assert [(await http.get(f"/history/{prompt_id}")).json() for prompt_id in ids] == [{}, {}, {}]
    assert sim.runs == []


async def test_one_prompt_at_a_time(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        async with connect(sim, "serial") as client:
            ids = [await submit(http, shared_workflow("txt2img"), "serial") for _ in range(3)]
            got = await client.until_idle(ids[-1])
    assert sim.max_in_queue == 3
    assert [run.prompt_id for run in sim.runs] == ids
    assert all(after.started >= before.ended for before, after in itertools.pairwise(sim.runs))
    assert sim.gaps() == pytest.approx([0.0, 0.0])  # the worker picks the next prompt at once
    assert [run.ended - run.started for run in sim.runs] == pytest.approx([20 * STEP_S] * 3)
    starts = [m.data["prompt_id"] for m in got if m.type == "execution_start"]
    assert starts == ids
    assert {run.client_id for run in sim.runs} == {"serial"}


async def test_pause_and_resume(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        async with connect(sim, "paused") as client:
            sim.pause()
            prompt_id = await submit(http, transcript_workflow("happy_path"), "paused")
            waited = await client.drain(5.0)
            assert types(waited) == ["status"] and waited[0].data["status"]["exec_info"]["queue_remaining"] == 1
            assert [item[1] for item in (await http.get("/queue")).json()["queue_pending"]] == [prompt_id]
            sim.resume()
            got = await client.until_idle(prompt_id)
    assert types(got)[:2] == ["status", "execution_start"]


async def test_history_listing_and_deletion(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        async with connect(sim, "hist") as client:
            ids = []
            for _ in range(3):
                ids.append(await submit(http, transcript_workflow("happy_path"), "hist"))
                await client.until_idle(ids[-1])
        assert list((await http.get("/history")).json()) == ids
        assert list((await http.get("/history", params={"max_items": 2})).json()) == ids[1:]
        assert list((await http.get("/history", params={"max_items": 1, "offset": 0})).json()) == ids[:1]
        assert list((await http.get("/api/history", params={"offset": 1})).json()) == ids[1:]
        assert (await http.get("/history/does-not-exist")).json() == {}
        assert (await http.post("/history", json={"delete": [ids[0]]})).status_code == 200
        assert list((await http.get("/history")).json()) == ids[1:]
        await http.post("/history", json={"clear": True})
        assert (await http.get("/history")).json() == {}
        outputs = [f"happy_{n:05}_.png" for n in (1, 2, 3)]
        for filename in outputs:  # files stay: each run got the next counter
            assert (await http.get("/view", params={"filename": filename, "subfolder": "gw"})).status_code == 200


async def test_cached_rerun_matches_transcript(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    lines = transcript("cached_rerun")
    expected_second = segments(recorded(lines, "primary")[1:])[1]
    simulator = FakeComfyUI(step_ms=STEP_MS, cache=True)
    await start(nursery, simulator)
    prompt = transcript_workflow("multi_output")
    with trio.fail_after(NET_S):
        async with httpx.AsyncClient(base_url=simulator.url) as http, connect(simulator, "cache") as client:
            first = await client.until_idle(await submit(http, prompt, "cache"))
            second_id = await submit(http, prompt, "cache")
            second = await client.until_idle(second_id)
            entry = await history_entry(http, second_id)
    assert next(m.data["nodes"] for m in first if m.type == "execution_cached") == []
    # the order of the replayed outputs is ComfyUI's set order (6, 8, 11, 3 there): compare it loosely
    assert types(second) == types(expected_second)
    assert Counter(shapes(second)) == Counter(shapes(expected_second))
    assert next(m.data["nodes"] for m in second if m.type == "execution_cached") == list(prompt)
    first_outputs = {m.data["node"]: m.data["output"] for m in first if m.type == "executed"}
    assert {m.data["node"]: m.data["output"] for m in second if m.type == "executed"} == first_outputs
    assert entry["outputs"] == {node: first_outputs[node] for node in sorted(first_outputs)}


async def test_identical_prompts_run_again_without_cache(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        async with connect(sim, "nocache") as client:
            await client.until_idle(await submit(http, transcript_workflow("happy_path"), "nocache"))
            got = await client.until_idle(await submit(http, transcript_workflow("happy_path"), "nocache"))
    assert next(m.data["nodes"] for m in got if m.type == "execution_cached") == []
    assert types(got).count("executing") == 4


# --- files ----------------------------------------------------------------------------------------------


async def test_upload_and_load_match_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    lines = transcript("upload_and_load")
    image = fake_comfyui.encode_png(4, 3, bytes(range(36)))
    uploads = [resp["body"] for req, resp in recorded_exchanges(lines) if req["path"] == "/upload/image"]
    with trio.fail_after(NET_S):
        form = {"type": "input", "subfolder": "gw", "overwrite": "true"}
        first = await http.post("/upload/image", files={"image": ("gw_upload.png", image, "image/png")}, data=form)
        again = await http.post(
            "/upload/image",
            files={"image": ("gw_upload.png", image, "image/png")},
            data={"type": "input", "subfolder": "gw"},
        )
        assert [first.json(), again.json()] == uploads  # same bytes under the same name: reused
        other = await http.post(
            "/api/upload/image", files={"image": ("gw_upload.png", b"other", "image/png")}, data={"subfolder": "gw"}
        )
        assert other.json() == {"name": "gw_upload (1).png", "subfolder": "gw", "type": "input"}
        async with connect(sim, "loader") as client:
            prompt_id = await submit(http, transcript_workflow("load_uploaded"), "loader")
            got = await client.until_idle(prompt_id)
        viewed = await http.get("/view", params={"filename": "gw_upload.png", "type": "input", "subfolder": "gw"})
        assert (await http.post("/upload/image", data={"type": "input"})).status_code == 400
    assert shapes(got) == shapes(recorded(lines, "primary")[1:])
    assert viewed.content == image


async def test_http_endpoints_match_transcript(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    exchanges = recorded_exchanges(transcript("http_endpoints"))
    exact_paths = {
        "/features", "/prompt", "/api/prompt", "/queue", "/history/does-not-exist", "/object_info/EmptyImage",
        "/object_info/ImageScale", "/object_info/LoadImage", "/object_info/NoSuchNode", "/embeddings", "/models",
    }  # fmt: skip
    skipped = {"/object_info", "/object_info/ImageQuantize", "/history?max_items=1", "/internal/files/output"}
    checked = 0
    with trio.fail_after(NET_S):
        for request, expected in exchanges:
            if request["path"] in skipped:
                continue
            response = await http.request(request["method"], request["path"], json=request.get("body"))
            checked += 1
            assert response.status_code == expected["status"], request["path"]
            assert response.headers.get("content-type", "") == expected["content_type"], request["path"]
            if expected["content_type"].startswith("application/json"):
                body = response.json()
                if request["path"] in exact_paths:
                    assert body == expected["body"], request["path"]
                else:
                    assert loose_tree(body) == loose_tree(expected["body"]) or set(body) == set(expected["body"]), (
                        request["path"]
                    )
            else:
                assert response.content == b"", request["path"]
    assert checked == 21


# --- origin check, refusal, drops, restarts -------------------------------------------------------------


async def test_origin_check(autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient) -> None:
    with trio.fail_after(NET_S):
        with pytest.raises(ConnectionRejected) as rejected:
            async with connect(sim, "browser", extra_headers=[(b"Origin", b"http://localhost:3000")]):
                pass
        assert rejected.value.status_code == 403
        same_origin = [(b"Origin", f"http://127.0.0.1:{sim.port}".encode())]
        async with connect(sim, "browser", extra_headers=same_origin) as client:
            assert client.hello.data["sid"] == "browser"
        assert (await http.get("/prompt", headers={"Origin": "http://localhost:3000"})).status_code == 403
        assert (await http.get("/prompt", headers={"Origin": "http://evil.example"})).status_code == 403
        assert (await http.get("/prompt", headers={"Origin": f"http://127.0.0.1:{sim.port}"})).status_code == 200


async def test_refuse_websockets(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        sim.refuse_websockets = True
        with pytest.raises(ConnectionRejected) as rejected:
            async with connect(sim, "refused"):
                pass
        assert rejected.value.status_code == 503
        assert (await http.get("/system_stats")).status_code == 200
        sim.refuse_websockets = False
        async with connect(sim, "accepted") as client:
            assert client.hello.data["sid"] == "accepted"


async def test_drop_sockets_cuts_connections_but_not_the_queue(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(NET_S):
        async with connect(sim, "dropped") as client, connect(sim, "bystander") as bystander:
            prompt_id = await submit(http, shared_workflow("txt2img"), "dropped")
            await client.until(is_progress(2))
            sim.drop_sockets()
            for cut in (client, bystander):
                with pytest.raises(ConnectionClosed) as closed:
                    await cut.until(lambda m: False)
                assert closed.value.reason.code == 1006  # no close frame: like a network failure
        async with connect(sim, "dropped") as again:
            rest = await again.until_idle(prompt_id)
    assert rest[-3].type == "execution_success"
    assert sim.runs[-1].outcome == "success"


async def test_kill_drops_sockets_and_queue_new_object_forgets_history(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    first = FakeComfyUI(step_ms=STEP_MS)
    kill = await start(nursery, first)
    with trio.fail_after(NET_S):
        async with httpx.AsyncClient(base_url=first.url) as http, connect(first, "k") as client:
            done_id = await submit(http, transcript_workflow("happy_path"), "k")
            await client.until_idle(done_id)
            running_id = await submit(http, shared_workflow("txt2img"), "k")
            pending_id = await submit(http, shared_workflow("txt2img"), "k")
            await client.until(is_progress(2))
            await kill()
            with pytest.raises(ConnectionClosed):
                await client.until(lambda m: False)
        # the same object again, on the same port: history kept, the queue and the running prompt gone
        kill = await start(nursery, first, first.port)
        async with httpx.AsyncClient(base_url=first.url) as http:
            assert (await history_entry(http, done_id))["status"]["status_str"] == "success"
            assert (await http.get(f"/history/{running_id}")).json() == {}
            assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        assert first.submitted == [done_id, running_id, pending_id]
        assert [run.prompt_id for run in first.runs] == [done_id]
        port = first.port
        await kill()
        # a new object on the same port: a restarted ComfyUI has forgotten everything
        second = FakeComfyUI()
        await start(nursery, second, port)
        assert second.port == port
        async with httpx.AsyncClient(base_url=second.url) as http:
            assert (await http.get(f"/history/{done_id}")).json() == {}
            assert (await http.get("/history")).json() == {}


async def test_serve_fake_comfyui_function(nursery: trio.Nursery) -> None:
    simulator = FakeComfyUI()
    with trio.fail_after(NET_S):
        port = await nursery.start(fake_comfyui.serve_fake_comfyui, simulator)
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/api/system_stats")
    assert response.json()["system"]["comfyui_version"] == "0.3.64"


# --- PNG and CLI ----------------------------------------------------------------------------------------


def test_encoded_png_is_valid() -> None:
    width, height = 5, 3
    rgb = bytes(range(width * height * 3))
    data = fake_comfyui.encode_png(width, height, rgb, text={"prompt": "{}"})
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        tag, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(tag + body)
        chunks.append((tag, body))
        offset += 12 + length
    assert [tag for tag, _ in chunks] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (width, height, 8, 2, 0, 0, 0)
    scanlines = zlib.decompress(chunks[2][1])
    assert b"".join(scanlines[row * 16 + 1 : (row + 1) * 16] for row in range(height)) == rgb
    assert fake_comfyui.png_size(data) == (width, height)


async def test_cli_prints_its_line_and_exits_0_on_sigterm() -> None:
    script = Path(fake_comfyui.__file__)
    command = [sys.executable, str(script), "--port", "0", "--step-ms", "5", "--seed", "3", "--no-previews"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(CLI_NET_S):
            assert process.stdout is not None
            output = b""
            while not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, "the simulator exited before printing its line"
                output += chunk
            line = output.decode().rstrip("\n")
            match = re.fullmatch(r"fake ComfyUI listening on http://127\.0\.0\.1:(\d+)", line)
            assert match, line
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{match.group(1)}") as http:
                assert (await http.get("/system_stats")).status_code == 200
                assert (
                    await http.post("/prompt", json={"prompt": transcript_workflow("happy_path")})
                ).status_code == 200
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            rest = b""
            while chunk := await process.stdout.receive_some():
                rest += chunk
            assert rest == b""  # exactly one line
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- full speed (step_ms 0): bursts of steps, the same frames -------------------------------------------------

_JSON_NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 0.0, -0.0, 1, 1.0]),
)  # equal numbers with different encodings must not share a cached encoding
_NODE_IDS = st.one_of(st.sampled_from(["3", "10"]), st.text(min_size=1, max_size=6))  # the same node again, often


@settings(max_examples=200, deadline=None)
@given(
    prompt_id=st.text(max_size=40),
    updates=st.lists(
        st.tuples(_NODE_IDS, _JSON_NUMBERS, _JSON_NUMBERS, st.sampled_from(["running", "finished", "pending"])),
        min_size=1,
        max_size=30,
    ),
)
def test_progress_state_frame_is_json_dumps_of_every_node(prompt_id: str, updates: list[tuple[Any, ...]]) -> None:
    """The cached per-node encodings give exactly ``json.dumps`` of ComfyUI's whole message, after any sequence of
    node updates (ints and floats, the same node again, a node's max or state changing)."""
    run = _PromptRun(SimState(), _QueueItem(0.0, prompt_id, {}, {}, []))
    for node_id, value, maximum, state in updates:
        frame = run.state_frame(node_id, value, maximum, state)
        assert frame == json.dumps(
            {"type": "progress_state", "data": {"prompt_id": prompt_id, "nodes": run.node_states}}
        )


@settings(max_examples=200, deadline=None)
@given(
    prompt_id=st.text(max_size=40),
    steps=st.lists(st.tuples(_NODE_IDS, _JSON_NUMBERS, _JSON_NUMBERS), min_size=1, max_size=20),
    client_id=st.one_of(st.none(), st.text(max_size=8)),
)
def test_progress_frames_are_json_dumps(prompt_id: str, steps: list[tuple[Any, ...]], client_id: str | None) -> None:
    """A step's frames: progress_state then progress, each ``json.dumps`` of ComfyUI's message, key order included."""
    run = _PromptRun(SimState(previews=False), _QueueItem(0.0, prompt_id, {}, {"client_id": client_id}, []))
    for node_id, value, total in steps:
        out: list[str | bytes] = []
        run.progress(node_id, value, total, None, out)
        progress = {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}
        assert out == [
            json.dumps({"type": "progress_state", "data": {"prompt_id": prompt_id, "nodes": run.node_states}}),
            json.dumps({"type": "progress", "data": progress}),
        ]


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.one_of(
            st.text(max_size=300),
            st.binary(max_size=300),
            st.sampled_from([125, 126, 127, 65535, 65536]).map(lambda n: "x" * n),
            st.sampled_from([125, 126, 65535, 65536]).map(lambda n: b"\0" * n),
        ),
        max_size=5,
    )
)
def test_ws_frame_is_what_wsproto_sends(frames: list[str | bytes]) -> None:
    """The simulator's own frame encoder gives wsproto's server frames byte for byte (no extension enabled)."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, TextMessage

    connection = Connection(ConnectionType.SERVER)
    for frame in frames:
        expected = connection.send(TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame))
        assert _ws_frame(frame) == expected


@pytest.mark.parametrize("previews", [False, True])
async def test_full_speed_sampler_sends_every_step_in_order(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient, previews: bool
) -> None:
    """step_ms 0: the steps between two turns of the event loop leave together, but each event is still its own
    frame, in ComfyUI's order (progress_state, progress, preview per step), canonical ``json.dumps`` text; the
    ``progress_hook`` hears of every step once, in order, in bursts of at most BURST_STEPS."""
    sim.step_ms = 0
    sim.previews = previews
    steps = 3 * BURST_STEPS + 5
    prompt = shared_workflow("txt2img")
    prompt["3"]["inputs"]["steps"] = steps
    heard: list[tuple[str, tuple[int, ...]]] = []
    sim.progress_hook = lambda prompt_id, values: heard.append((prompt_id, values))
    with trio.fail_after(NET_S):
        async with connect(sim, "fast") as client:
            frames: list[str | bytes] = []

            async def raw() -> Msg:
                frames.append(await client.ws.get_message())
                return decode(frames[-1])

            client.next = raw  # type: ignore[method-assign]
            prompt_id = await submit(http, prompt, "fast")
            got = await client.until_idle(prompt_id)
    for frame in frames:
        if isinstance(frame, str):
            assert frame == json.dumps(json.loads(frame))
    step_types = ["progress_state", "progress", "binary:1"] if previews else ["progress_state", "progress"]
    start = next(i for i, m in enumerate(got) if m.type == "executing" and m.data["node"] == "3") + 1
    running = got[start : start + len(step_types) * steps]
    assert got[start + len(step_types) * steps].data["nodes"]["3"]["state"] == "finished"
    assert types(running) == step_types * steps
    progress = [m.data for m in running if m.type == "progress"]
    assert progress == [{"value": v, "max": steps, "prompt_id": prompt_id, "node": "3"} for v in range(1, steps + 1)]
    states = [m.data["nodes"]["3"] for m in running if m.type == "progress_state"]
    assert [(s["value"], s["max"], s["state"]) for s in states] == [(v, steps, "running") for v in range(1, steps + 1)]
    assert [value for pid, values in heard for value in values] == list(range(1, steps + 1))
    assert {pid for pid, _ in heard} == {prompt_id}
    assert max(len(values) for _, values in heard) == BURST_STEPS


async def test_interrupt_at_full_speed_sends_the_steps_before_it(
    autojump_clock: trio.testing.MockClock, sim: FakeComfyUI, http: httpx.AsyncClient
) -> None:
    """A failure in the middle of a burst: the steps before it leave first, then the error, as in ComfyUI."""
    sim.step_ms = 0
    sim.previews = False
    sim.fail_rate = 1.0
    prompt = shared_workflow("txt2img")
    prompt["3"]["inputs"]["steps"] = 4 * BURST_STEPS
    heard: list[int] = []
    sim.progress_hook = lambda prompt_id, values: heard.extend(values)
    for attempt in range(20):  # fail_rate picks a node, then (for the sampler) a step: until the sampler fails
        heard.clear()
        with trio.fail_after(NET_S):
            async with connect(sim, f"fail{attempt}") as client:
                prompt_id = await submit(http, prompt, f"fail{attempt}")
                got = await client.until_idle(prompt_id)
        error = next(m for m in got if m.type == "execution_error")
        if error.data["node_id"] != "3":
            continue
        values = [m.data["value"] for m in got if m.type == "progress"]
        assert values == list(range(1, len(values) + 1)) == heard
        assert len(values) < 4 * BURST_STEPS
        assert types(got).index("execution_error") > max(
            (i for i, m in enumerate(got) if m.type == "progress"), default=-1
        )
        return
    pytest.fail("the sampler never failed")
