"""parse_comfy_message and format_rejection against every frame of the real ComfyUI transcripts (sans-IO)."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from conftest import TRANSCRIPTS
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.comfy import (
    BinaryText,
    ComfyProtocolError,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    FeatureFlags,
    PreviewImage,
    Progress,
    ProgressState,
    Status,
    UnknownComfyEvent,
    format_rejection,
    is_noise,
    parse_comfy_message,
)
from actors.comfy._protocol import parse_progress

MODELLED = {
    "status": Status,
    "feature_flags": FeatureFlags,
    "execution_start": ExecutionStart,
    "execution_cached": ExecutionCached,
    "executing": Executing,
    "progress": Progress,
    "progress_state": ProgressState,
    "executed": Executed,
    "execution_success": ExecutionSuccess,
    "execution_error": ExecutionError,
    "execution_interrupted": ExecutionInterrupted,
}
NOT_MODELLED = {"logs", "display_component"}  # internal / API-node only: UnknownComfyEvent


def _lines(*names: str) -> list[dict[str, Any]]:
    files = [TRANSCRIPTS / n for n in names] if names else sorted(TRANSCRIPTS.glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def _recv(kind: str, *names: str) -> list[dict[str, Any]]:
    return [r["data"] for r in _lines(*names) if r["dir"] == "recv" and r["kind"] == kind]


TRANSCRIPT_NAMES = sorted(p.name for p in TRANSCRIPTS.glob("*.jsonl"))


def test_transcripts_are_there() -> None:
    text, binary = _recv("text"), _recv("binary")
    assert len(TRANSCRIPT_NAMES) == 20 and len(text) > 1000 and len(binary) > 100
    assert {f["type"] for f in text} <= MODELLED.keys() | NOT_MODELLED
    assert {f["event_type"] for f in binary} == {1, 3, 4}


@pytest.mark.parametrize("name", TRANSCRIPT_NAMES)
def test_every_transcript_text_frame_parses(name: str) -> None:
    for frame in _recv("text", name):
        try:
            _check_text_frame(frame)
        except Exception as exc:
            raise AssertionError(f"{name}: {json.dumps(frame)[:300]}") from exc


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")])
def test_noise_is_told_by_its_head_and_nothing_else_is_dropped(separators: tuple[str, str]) -> None:
    """The comfy actor drops progress_state and executing-a-node unparsed; every other frame of the real
    transcripts (executing with node null ends a prompt) is kept."""
    seen = set()
    for frame in _recv("text"):
        kind, data = frame["type"], frame.get("data") or {}
        noise = kind == "progress_state" or (kind == "executing" and data.get("node") is not None)
        assert is_noise(json.dumps(frame, separators=separators)) is noise, json.dumps(frame)[:200]
        seen.add((kind, noise))
    assert {("progress_state", True), ("executing", True), ("executing", False), ("progress", False)} <= seen


def _check_text_frame(frame: dict[str, Any]) -> None:
    event = parse_comfy_message(json.dumps(frame))
    if frame["type"] in NOT_MODELLED:
        assert event == UnknownComfyEvent(frame["type"], frame["data"])
        return
    assert type(event) is MODELLED[frame["type"]]
    data = frame["data"]
    if "prompt_id" in data:
        assert event.prompt_id == data["prompt_id"]  # type: ignore[union-attr]
    match event:
        case Status(queue_remaining, sid):
            assert queue_remaining == data["status"]["exec_info"]["queue_remaining"] and sid == data.get("sid")
        case Executing(prompt_id, node, display_node):
            assert (prompt_id, node, display_node) == (data.get("prompt_id"), data["node"], data.get("display_node"))
        case Progress(_, node, value, maximum):
            assert (node, value, maximum) == (data["node"], data["value"], data["max"])
        case ProgressState(_, nodes):
            assert nodes == data["nodes"]
        case Executed(_, node, output, display_node):
            assert (node, output, display_node) == (data["node"], data["output"], data["display_node"])
        case ExecutionCached(_, nodes):
            assert nodes == tuple(data["nodes"])
        case ExecutionError():
            assert event.exception_type == data["exception_type"] and event.node_type == data["node_type"]
            assert event.traceback == tuple(data["traceback"]) and not event.blocked
        case ExecutionInterrupted(_, node_id, node_type):
            assert (node_id, node_type) == (data["node_id"], data["node_type"])
        case FeatureFlags(flags):
            assert flags == data


def test_reconnect_executing_has_no_prompt_id() -> None:
    frames = [r["data"] for r in _lines("reconnect_midrun.jsonl") if r.get("conn") == "primary-reconnected"]
    executing = [parse_comfy_message(json.dumps(f)) for f in frames if f.get("type") == "executing"]
    assert executing[0] == Executing(prompt_id=None, node="5")


def test_execution_blocked_is_not_terminal() -> None:
    msg = {
        "type": "execution_error",
        "data": {
            "prompt_id": "p1",
            "node_id": "4",
            "node_type": "X",
            "executed": [],
            "exception_message": "Execution Blocked: nope",
            "exception_type": "ExecutionBlocked",
            "traceback": [],
            "current_inputs": {},
            "current_outputs": [],
        },
    }
    event = parse_comfy_message(json.dumps(msg))
    assert event == ExecutionError("p1", "4", "X", "Execution Blocked: nope", "ExecutionBlocked", (), blocked=True)


def test_optional_keys_may_be_missing() -> None:
    assert parse_comfy_message('{"type":"execution_start","data":{"prompt_id":"p"}}') == ExecutionStart("p", None)
    assert parse_comfy_message('{"type":"executing","data":{"node":null}}') == Executing(None, None)
    assert parse_comfy_message('{"type":"progress_state","data":{}}') == ProgressState(None, {})
    assert parse_comfy_message('{"type":"execution_error","data":{"prompt_id":"p"}}') == ExecutionError(
        "p", None, None, "", ""
    )
    assert parse_comfy_message('{"type":"executed","data":{"prompt_id":"p","node":"9"}}') == Executed("p", "9", None)
    assert parse_comfy_message('{"type":"something_new"}') == UnknownComfyEvent("something_new", None)


# ---- binary frames, rebuilt from the transcript headers -----------------------------------------------------------

PNG_MAGIC = bytes.fromhex("89504e470d0a1a0a")


def _rebuild(frame: dict[str, Any]) -> tuple[bytes, bytes]:
    """The wire message for a recorded binary frame, and the payload (image or text) it must decode to."""
    header = bytes.fromhex(frame["header_hex"])
    if frame["event_type"] == 1:
        image = bytes.fromhex(frame["image_magic_hex"]).ljust(frame["image_len"], b"\x00")
        return header + image, image
    if frame["event_type"] == 4:
        meta = json.dumps(frame["metadata"]).encode()
        # The recorded header's length is the server's encoding (no spaces); ours may differ, so re-pack it.
        assert struct.unpack(">I", header[4:8])[0] == frame["metadata_len"]
        image = bytes.fromhex(frame["image_magic_hex"]).ljust(frame["image_len"], b"\x00")
        return header[:4] + struct.pack(">I", len(meta)) + meta + image, image
    assert frame["event_type"] == 3
    node = frame["node_id"].encode()
    text = frame["text"].encode()
    assert header == struct.pack(">II", 3, len(node))
    return header + node + text, text


@pytest.mark.parametrize("name", [n for n in TRANSCRIPT_NAMES if _recv("binary", n)])
def test_every_transcript_binary_frame_parses(name: str) -> None:
    for frame in _recv("binary", name):
        try:
            _check_binary_frame(frame)
        except Exception as exc:
            raise AssertionError(f"{name}: {json.dumps(frame)[:300]}") from exc


def _check_binary_frame(frame: dict[str, Any]) -> None:
    wire, payload = _rebuild(frame)
    assert len(wire) == frame["len"] or frame["event_type"] == 4
    event = parse_comfy_message(wire)
    if frame["event_type"] == 1:
        mime = {1: "image/jpeg", 2: "image/png"}[frame["image_format"]]
        assert event == PreviewImage(mime, payload)
    elif frame["event_type"] == 4:
        meta = frame["metadata"]
        assert event == PreviewImage(meta["image_type"], payload, meta["prompt_id"], meta["node_id"])
    else:
        assert event == BinaryText(frame["node_id"], frame["text"])


def test_binary_jpeg_and_unknown_types() -> None:
    assert parse_comfy_message(struct.pack(">II", 1, 1) + b"\xff\xd8jpeg") == PreviewImage(
        "image/jpeg", b"\xff\xd8jpeg"
    )
    assert parse_comfy_message(struct.pack(">II", 2, 0) + b"x") == UnknownComfyEvent(2, b"\x00\x00\x00\x00x")
    assert parse_comfy_message(struct.pack(">I", 99)) == UnknownComfyEvent(99, b"")
    meta = json.dumps({"prompt_id": "p", "node_id": "3"}).encode()  # no image_type: sniffed from the bytes
    wire = struct.pack(">II", 4, len(meta)) + meta + PNG_MAGIC
    assert parse_comfy_message(wire) == PreviewImage("image/png", PNG_MAGIC, "p", "3")
    assert parse_comfy_message(struct.pack(">II", 3, 0)) == BinaryText("", "")


@pytest.mark.parametrize(
    "msg",
    [
        "",
        "{not json",
        "[1, 2]",
        '"status"',
        "null",
        '{"data": {}}',
        '{"type": 7, "data": {}}',
        '{"type": "status", "data": []}',
        '{"type": "status", "data": {"status": {}}}',
        '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": "x"}}}}',
        '{"type": "execution_start", "data": {}}',
        '{"type": "execution_success", "data": {"prompt_id": null}}',
        '{"type": "executed", "data": {"prompt_id": "p"}}',
        '{"type": "progress", "data": {"prompt_id": "p", "node": "1", "value": 1}}',
        '{"type": "progress_state", "data": {"nodes": [1]}}',
        '{"type": "execution_cached", "data": {"prompt_id": "p", "nodes": "1,2"}}',
        b"",
        b"\x00\x00\x01",
        b"\x00\x00\x00\x01",
        b"\x00\x00\x00\x01\x00\x00\x00",
        b"\x00\x00\x00\x01\x00\x00\x00\x07image",  # unknown image format
        b"\x00\x00\x00\x04\x00\x00\x00\x10{}",  # metadata longer than the frame
        b"\x00\x00\x00\x04\x00\x00\x00\x02[]",  # metadata not an object
        b"\x00\x00\x00\x04\x00\x00\x00\x03{x}",  # metadata not JSON
        b"\x00\x00\x00\x04\x00\x00\x00\x02\xff\xfe",  # metadata not UTF-8
        b"\x00\x00\x00\x03\x00\x00\x00\x09ab",  # node id longer than the frame
        b"\x00\x00\x00\x03\x00\x00\x00\x01a\xff",  # text not UTF-8
    ],
)
def test_malformed_raises(msg: str | bytes) -> None:
    with pytest.raises(ComfyProtocolError) as info:
        parse_comfy_message(msg)
    assert info.value.snippet == repr(msg[:200])[:200]


def test_absurd_nesting_is_malformed_not_fatal() -> None:
    with pytest.raises(ComfyProtocolError, match="not JSON"):
        parse_comfy_message("[" * 100_000)
    meta = b"[" * 100_000
    with pytest.raises(ComfyProtocolError, match="metadata is not JSON"):
        parse_comfy_message(struct.pack(">II", 4, len(meta)) + meta)


def test_error_snippet_is_short_for_huge_frames() -> None:
    with pytest.raises(ComfyProtocolError) as info:
        parse_comfy_message(b"\x00\x00\x00\x01\x00\x00\x00\x09" + b"\x00" * 5_000_000)
    assert len(info.value.snippet) <= 200 and "unknown image format 9" in str(info.value)


def test_wrong_argument_type() -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        parse_comfy_message(42)  # type: ignore[arg-type]


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_fuzz_only_typed_events_or_protocol_errors(msg: str | bytes) -> None:
    try:
        parse_comfy_message(msg)
    except ComfyProtocolError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=10), c),
        max_leaves=20,
    )
)
def test_fuzz_any_json_data(data: Any) -> None:
    for kind in (*MODELLED, "logs"):
        try:
            parse_comfy_message(json.dumps({"type": kind, "data": data}))
        except ComfyProtocolError:
            pass


# ---- rejections ---------------------------------------------------------------------------------------------------


def _rejections() -> list[tuple[int, Any]]:
    return [
        (r["data"]["status"], r["data"]["body"])
        for r in _lines("validation_errors.jsonl")
        if r["dir"] == "http" and r["kind"] == "response" and r["data"]["status"] != 200
    ]


REJECTIONS = _rejections()


def test_rejections_cover_every_shape() -> None:
    statuses = [status for status, _ in REJECTIONS]
    assert statuses.count(400) == 8 and statuses.count(500) == 1


@pytest.mark.parametrize(("status", "body"), REJECTIONS, ids=lambda v: v if isinstance(v, int) else "")
def test_format_rejection_of_every_transcript_body(status: int, body: Any) -> None:
    text = format_rejection(status, body)
    assert text and "\n" not in text
    if not isinstance(body, dict):
        assert "Server got itself in trouble" in text
        return
    assert body["error"]["message"] in text
    for node_id, info in body["node_errors"].items():
        assert f"node {node_id} ({info['class_type']})" in text
        for error in info["errors"]:
            assert error["type"] in text and error["message"] in text
    if body["error"]["type"] == "invalid_prompt":
        assert "Node ID '#2'" in text and "NoSuchNodeClass" in text


def test_format_rejection_example() -> None:
    body = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
        },
        "node_errors": {
            "3": {
                "errors": [
                    {"type": "value_smaller_than_min", "message": "Value -1 smaller than min of 1", "details": "steps"}
                ],
                "dependent_outputs": ["9"],
                "class_type": "KSampler",
            }
        },
    }
    assert format_rejection(400, body) == (
        "Prompt outputs failed validation; node 3 (KSampler): value_smaller_than_min: Value -1 smaller than min of 1 (steps)"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, "HTTP 502 with an empty body"),
        ("", "HTTP 502 with an empty body"),
        (b"bad gateway\n", "bad gateway"),
        ({}, "HTTP 502 with an empty body"),
        ([1, 2], "[1, 2]"),
        ({"error": "boom"}, "boom"),
        ({"error": {"type": "no_prompt"}}, "no_prompt"),
        ({"node_errors": {"5": "weird"}}, "node 5: weird"),
        ({"node_errors": {"5": {"errors": [{}]}}}, "node 5: invalid"),
        ({"node_errors": {"5": {"class_type": "X"}}}, "node 5 (X): invalid"),
        ({"something": "else"}, '{"something": "else"}'),
    ],
)
def test_format_rejection_any_shape(body: Any, expected: str) -> None:
    assert format_rejection(502, body) == expected


def test_format_rejection_is_capped() -> None:
    assert len(format_rejection(500, "x" * 100_000)) == 2000


# ---- the progress fast path: the same event as the general path, or the general path itself -------------------------

_PROGRESS_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**16), 10**16),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["3", "", "a\\b", 'q"uote', "\x00", "\x1f", "\x7f", "é", "\ud7ff", "10:3", "null"]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(
    data=st.dictionaries(
        st.sampled_from(["value", "max", "prompt_id", "node", "extra"]), _PROGRESS_VALUES, max_size=5
    ).flatmap(lambda d: st.permutations(list(d.items())).map(dict)),
    canonical=st.fixed_dictionaries(
        {
            "value": st.one_of(st.integers(), st.integers(-(10**16), 10**16), st.floats(allow_nan=False)),
            "max": st.one_of(st.integers(0, 10**4), st.integers(), _PROGRESS_VALUES),
            "prompt_id": st.one_of(st.none(), st.text(max_size=40), _PROGRESS_VALUES),
            "node": st.one_of(st.none(), st.text(max_size=6), _PROGRESS_VALUES),
        }
    ),
    ensure_ascii=st.booleans(),
    separators=st.sampled_from([(", ", ": "), (",", ":"), (", ", ":")]),
)
def test_progress_fast_path_gives_the_general_paths_event(
    data: dict[str, Any], canonical: dict[str, Any], ensure_ascii: bool, separators: tuple[str, str]
) -> None:
    """Whatever a progress message holds (any values, keys missing, extra or in another order, any spacing, escapes
    or raw UTF-8), parse_comfy_message gives what the general path gives, event or error. ``canonical`` is ComfyUI's
    own key order, the shape the fast path takes."""
    from actors.comfy._protocol import _parse_text_general

    for body in (data, canonical):
        msg = json.dumps({"type": "progress", "data": body}, ensure_ascii=ensure_ascii, separators=separators)
        try:
            expected: Any = _parse_text_general(msg)
        except ComfyProtocolError as exc:
            expected = ("error", exc.reason)
        try:
            got: Any = parse_comfy_message(msg)
        except ComfyProtocolError as exc:
            got = ("error", exc.reason)
        assert got == expected
        assert type(got) is type(expected)
        fast = parse_progress(msg)  # what the comfy actor tries first, before is_noise
        assert fast is None or (fast == expected and not is_noise(msg))
        if isinstance(got, Progress):
            assert (type(got.value), type(got.max)) == (type(expected.value), type(expected.max))


def test_progress_fast_path_takes_comfyuis_own_messages() -> None:
    """What the fast path is for: ComfyUI's progress frames as it writes them (every one in the transcripts)."""
    from actors.comfy._protocol import _PROGRESS

    recorded = [frame for frame in _recv("text") if frame["type"] == "progress"]
    assert len(recorded) > 20
    for frame in recorded:
        msg = json.dumps(frame)
        assert _PROGRESS.fullmatch(msg) is not None, msg
        assert parse_comfy_message(msg) == Progress(
            frame["data"]["prompt_id"], frame["data"]["node"], frame["data"]["value"], frame["data"]["max"]
        )
