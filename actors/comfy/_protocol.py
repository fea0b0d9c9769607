"""ComfyUI WebSocket messages -> typed events, and ComfyUI's 400 bodies -> readable text. Sans-IO: no trio here.

Text messages are JSON ``{"type": T, "data": D}`` (docs/comfyui-protocol.md section 2.5). Binary messages start
with a big-endian u32 event type (section 2.6, ComfyUI ``server.py`` ``encode_bytes`` / ``send_image``):

    1  PREVIEW_IMAGE                u32 format (1 JPEG, 2 PNG), image bytes            -> PreviewImage, no ids
    3  TEXT                         u32 len L, L bytes node id, UTF-8 text             -> BinaryText
    4  PREVIEW_IMAGE_WITH_METADATA  u32 len M, M bytes JSON metadata, image bytes      -> PreviewImage with ids

Policy: a message we cannot make sense of (bad JSON, not an object, no ``type``, a known type missing a required
field, a truncated binary header) raises ``ComfyProtocolError``; the caller logs it and skips the frame. A
well-formed message of a type we do not model (``logs``, ``display_component``, future types) becomes
``UnknownComfyEvent`` so the caller can count it. Optional keys may be missing: ComfyUI omits several of them
(``executing`` after a reconnect has no ``prompt_id``, the ExecutionBlocked ``execution_error`` no timestamp).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any, Final

from ._events import (
    BinaryText,
    ComfyEvent,
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
)

__all__ = ["ComfyProtocolError", "format_rejection", "parse_comfy_message", "parse_progress"]

SNIPPET_CHARS: Final = 200  # how much of a bad message an error shows
REJECTION_MAX_CHARS: Final = 2000  # format_rejection output is capped: it ends up in user-facing errors

_U32: Final = struct.Struct(">I")

BINARY_PREVIEW_IMAGE: Final = 1
BINARY_TEXT: Final = 3
BINARY_PREVIEW_WITH_METADATA: Final = 4
IMAGE_FORMATS: Final[Mapping[int, str]] = {1: "image/jpeg", 2: "image/png"}
EXECUTION_BLOCKED: Final = "ExecutionBlocked"  # exception_type of the non-terminal execution_error


class ComfyProtocolError(ValueError):
    """ComfyUI (or something pretending to be it) sent a message we cannot parse.

    ``reason`` says what is wrong; ``snippet`` is ``repr()`` of the start of the message (at most 200 characters).
    """

    def __init__(self, reason: str, snippet: str) -> None:
        super().__init__(f"{reason}: {snippet}")
        self.reason = reason
        self.snippet = snippet


def _snippet(msg: str | bytes) -> str:
    # Slice before repr(): a 2.6 MB preview frame must not be turned into a 10 MB string to show 200 characters.
    return repr(msg[:SNIPPET_CHARS])[:SNIPPET_CHARS]


class _Missing(Exception):
    """A required field is absent or has the wrong type (turned into ComfyProtocolError by the caller)."""


# ---- field readers: each returns the value or raises _Missing --------------------------------------------------


def _req_str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # node ids are strings, but be lenient
        return str(value)
    raise _Missing(f"{key!r} must be a string, got {value!r}"[:SNIPPET_CHARS])


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    return None if data.get(key) is None else _req_str(data, key)


def _number(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Missing(f"{key!r} must be a number, got {value!r}"[:SNIPPET_CHARS])
    # ComfyUI sends ints here; keep them ints (they go to browsers as JSON), keep a real fraction as it is.
    return int(value) if float(value).is_integer() else value  # type: ignore[return-value]


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None or isinstance(value, Mapping):
        return value
    raise _Missing(f"{key!r} must be an object or null, got {type(value).__name__}")


def _str_tuple(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Missing(f"{key!r} must be a list, got {type(value).__name__}")
    return tuple(str(item) for item in value)


# ---- text events -------------------------------------------------------------------------------------------------


def _status(d: Mapping[str, Any]) -> Status:
    status = d.get("status")
    exec_info = status.get("exec_info") if isinstance(status, Mapping) else None
    if not isinstance(exec_info, Mapping):
        raise _Missing("'status.exec_info' missing")
    return Status(queue_remaining=_number(exec_info, "queue_remaining"), sid=_opt_str(d, "sid"))


def _execution_error(d: Mapping[str, Any]) -> ExecutionError:
    exception_type = d.get("exception_type")
    exception_type = exception_type if isinstance(exception_type, str) else ""
    message = d.get("exception_message")
    return ExecutionError(
        prompt_id=_req_str(d, "prompt_id"),
        node_id=_opt_str(d, "node_id"),
        node_type=_opt_str(d, "node_type"),
        exception_message=message if isinstance(message, str) else "",
        exception_type=exception_type,
        traceback=_str_tuple(d, "traceback"),
        blocked=exception_type == EXECUTION_BLOCKED,
    )


_TEXT_PARSERS: Final[Mapping[str, Callable[[Mapping[str, Any]], ComfyEvent]]] = {
    "status": _status,
    "feature_flags": lambda d: FeatureFlags(flags=d),
    "execution_start": lambda d: ExecutionStart(_req_str(d, "prompt_id"), _opt_int(d, "timestamp")),
    "execution_cached": lambda d: ExecutionCached(_req_str(d, "prompt_id"), _str_tuple(d, "nodes")),
    "executing": lambda d: Executing(_opt_str(d, "prompt_id"), _opt_str(d, "node"), _opt_str(d, "display_node")),
    "progress": lambda d: Progress(
        _opt_str(d, "prompt_id"), _opt_str(d, "node"), _number(d, "value"), _number(d, "max")
    ),
    "progress_state": lambda d: ProgressState(_opt_str(d, "prompt_id"), _opt_mapping(d, "nodes") or {}),
    "executed": lambda d: Executed(
        _req_str(d, "prompt_id"), _req_str(d, "node"), _opt_mapping(d, "output"), _opt_str(d, "display_node")
    ),
    "execution_success": lambda d: ExecutionSuccess(_req_str(d, "prompt_id"), _opt_int(d, "timestamp")),
    "execution_error": _execution_error,
    "execution_interrupted": lambda d: ExecutionInterrupted(
        _req_str(d, "prompt_id"), _opt_str(d, "node_id"), _opt_str(d, "node_type")
    ),
}


# ComfyUI's progress message exactly as it writes it (json.dumps, default separators, its key order), with
# integer numbers and strings without escapes: two per sampler step, so it is recognised and parsed by one match.
# Anything else (floats, escapes, another order or spacing, extra keys) takes the general path, which gives the
# same event (tests/test_comfy_protocol.py checks that, a Hypothesis property).
_INT = r"(-?(?:0|[1-9][0-9]{0,14}))"  # at most 15 digits: the general path's float() check keeps such ints exact
_STR_OR_NULL = r'(?:"([^"\\\x00-\x1f]*)"|null)'  # JSON forbids raw control characters in strings
_PROGRESS_TYPE: Final = "progress"  # ComfyUI's type name (not the gateway's wire message of that name)
_PROGRESS = re.compile(
    rf'\{{"type": "{_PROGRESS_TYPE}", "data": \{{"value": {_INT}, "max": {_INT}, "prompt_id": {_STR_OR_NULL}, '
    rf'"node": {_STR_OR_NULL}\}}\}}'
)


def parse_progress(msg: str) -> Progress | None:
    """The event of a progress message in ComfyUI's own form (as ``parse_comfy_message`` would give it), or None
    when ``msg`` is anything else (then ``parse_comfy_message`` tells what it is)."""
    if (fast := _PROGRESS.fullmatch(msg)) is None:
        return None
    value, maximum, prompt_id, node = fast.groups()
    return Progress(prompt_id, node, int(value), int(maximum))


def _parse_text(msg: str) -> ComfyEvent:
    return parse_progress(msg) or _parse_text_general(msg)


def _parse_text_general(msg: str) -> ComfyEvent:
    try:
        obj = json.loads(msg)
    except (ValueError, RecursionError):  # JSONDecodeError; RecursionError for absurdly deep nesting
        raise ComfyProtocolError("not JSON", _snippet(msg)) from None
    if not isinstance(obj, dict):
        raise ComfyProtocolError(f"expected a JSON object, got {type(obj).__name__}", _snippet(msg))
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ComfyProtocolError("no string 'type'", _snippet(msg))
    data = obj.get("data")
    parser = _TEXT_PARSERS.get(kind)
    if parser is None:
        return UnknownComfyEvent(kind, data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ComfyProtocolError(f"{kind}: 'data' must be an object, got {type(data).__name__}", _snippet(msg))
    try:
        return parser(data)
    except _Missing as exc:
        raise ComfyProtocolError(f"{kind}: {exc}", _snippet(msg)) from None


# ---- binary events -----------------------------------------------------------------------------------------------


def _u32(msg: bytes, offset: int, what: str) -> int:
    if len(msg) < offset + 4:
        raise ComfyProtocolError(f"binary frame truncated: no {what} at byte {offset}", _snippet(msg))
    value: int = _U32.unpack_from(msg, offset)[0]
    return value


def _sniff_mime(image: bytes) -> str:
    return "image/jpeg" if image.startswith(b"\xff\xd8") else "image/png"


def _parse_binary(msg: bytes) -> ComfyEvent:
    kind = _u32(msg, 0, "event type")
    if kind == BINARY_PREVIEW_IMAGE:
        fmt = _u32(msg, 4, "image format")
        mime = IMAGE_FORMATS.get(fmt)
        if mime is None:
            raise ComfyProtocolError(f"preview image: unknown image format {fmt}", _snippet(msg))
        return PreviewImage(mime=mime, image=msg[8:])
    if kind == BINARY_PREVIEW_WITH_METADATA:
        size = _u32(msg, 4, "metadata length")
        if len(msg) < 8 + size:
            raise ComfyProtocolError(f"preview metadata truncated: {size} bytes announced", _snippet(msg))
        try:
            meta = json.loads(msg[8 : 8 + size])
        except (ValueError, RecursionError):  # also UnicodeDecodeError
            raise ComfyProtocolError("preview metadata is not JSON", _snippet(msg)) from None
        if not isinstance(meta, dict):
            raise ComfyProtocolError("preview metadata is not a JSON object", _snippet(msg))
        image = msg[8 + size :]
        mime = meta.get("image_type")
        try:
            return PreviewImage(
                mime=mime if isinstance(mime, str) and mime else _sniff_mime(image),
                image=image,
                prompt_id=_opt_str(meta, "prompt_id"),
                node_id=_opt_str(meta, "node_id"),
            )
        except _Missing as exc:
            raise ComfyProtocolError(f"preview metadata: {exc}", _snippet(msg)) from None
    if kind == BINARY_TEXT:
        size = _u32(msg, 4, "node id length")
        if len(msg) < 8 + size:
            raise ComfyProtocolError(f"text frame truncated: node id of {size} bytes announced", _snippet(msg))
        try:
            return BinaryText(node_id=msg[8 : 8 + size].decode(), text=msg[8 + size :].decode())
        except UnicodeDecodeError:
            raise ComfyProtocolError("text frame is not UTF-8", _snippet(msg)) from None
    return UnknownComfyEvent(kind, msg[4:])


_NOISE_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"(progress_state|executing)"')
_IDLE_NODE = re.compile(r'"node"\s*:\s*null')


def is_noise(msg: str) -> bool:
    """True for a text message no user and no gateway decision needs, told by its head, before any JSON parse:
    ``progress_state`` (about 1 KB per sampler step, cumulative node states) and ``executing`` for a node (only
    ``executing`` with ``"node": null``, the end of a prompt, matters). ComfyUI writes ``"type"`` first
    (``json.dumps({"type": ..., "data": ...})``); a message in another shape is parsed as usual."""
    head = _NOISE_HEAD.match(msg, 0, 64)
    if head is None:
        return False
    return head.group(1) == "progress_state" or _IDLE_NODE.search(msg) is None


def parse_comfy_message(msg: str | bytes) -> ComfyEvent:
    """Turn one ComfyUI WebSocket message into a typed event. Raises ``ComfyProtocolError`` for garbage."""
    if isinstance(msg, str):
        return _parse_text(msg)
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return _parse_binary(bytes(msg))
    raise TypeError(f"msg must be str or bytes, not {type(msg).__name__}")


# ---- rejections ----------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A short one-line string for anything found in an error body ('' for nothing)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return " ".join(text.split())


def _node_error_lines(node_errors: Any) -> list[str]:
    if not isinstance(node_errors, Mapping):
        return []
    lines = []
    for node_id, info in node_errors.items():
        if not isinstance(info, Mapping):
            lines.append(f"node {node_id}: {_text(info) or 'invalid'}")
            continue
        class_type = _text(info.get("class_type"))
        where = f"node {node_id} ({class_type})" if class_type else f"node {node_id}"
        errors = info.get("errors")
        errors = errors if isinstance(errors, list) and errors else [None]
        for error in errors:
            if not isinstance(error, Mapping):
                lines.append(f"{where}: {_text(error)}" if error is not None else f"{where}: invalid")
                continue
            parts = [p for p in (_text(error.get("type")), _text(error.get("message"))) if p]
            line = f"{where}: {': '.join(parts) or 'invalid'}"
            details = _text(error.get("details"))
            lines.append(f"{line} ({details})" if details else line)
    return lines


def format_rejection(status: int, body: Any) -> str:
    """Readable one-line text for a ComfyUI error answer to POST /prompt, whatever the body's shape.

    ``body`` is the parsed JSON (usually ``{"error": {...}, "node_errors": {...}}``), or the raw text/bytes when it
    was not JSON (ComfyUI answers unhandled errors with a 500 ``text/plain``). Example:
    ``Prompt outputs failed validation; node 3 (KSampler): value_smaller_than_min: Value -1 smaller than min of 1 (steps)``
    """
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    lines: list[str] = []
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            message = _text(error.get("message")) or _text(error.get("type"))
            details = _text(error.get("details"))
            if message and details and details != message:
                lines.append(f"{message} ({details})")
            elif message or details:
                lines.append(message or details)
        elif error is not None:
            lines.append(_text(error))
        lines += _node_error_lines(body.get("node_errors"))
        if not lines and body:
            lines.append(_text(body))
    elif body is not None:
        text = _text(body)
        if text:
            lines.append(text)
    text = "; ".join(lines) or f"HTTP {status} with an empty body"
    return text if len(text) <= REJECTION_MAX_CHARS else text[: REJECTION_MAX_CHARS - 3] + "..."
