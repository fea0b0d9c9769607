"""Typed ComfyUI WebSocket events (see docs/comfyui-protocol.md section 2). Pure data, no I/O.

``parse_comfy_message`` in ``_protocol.py`` turns one WebSocket message (text or binary) into one of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Status:
    queue_remaining: int
    sid: str | None = None  # only in the copy sent right after connect


@dataclass(frozen=True, slots=True)
class FeatureFlags:
    flags: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    prompt_id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Executing:
    """A node started; ``node is None`` means the prompt is fully done (history written).

    After a reconnect ComfyUI sends ``executing`` with a node but *no* prompt_id: prompt_id is then None.
    """

    prompt_id: str | None
    node: str | None
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    prompt_id: str | None
    node: str | None
    value: int
    max: int


@dataclass(frozen=True, slots=True)
class ProgressState:
    prompt_id: str | None
    nodes: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Executed:
    prompt_id: str
    node: str
    output: Mapping[str, Any] | None
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionError:
    """A node raised. ``blocked`` marks ComfyUI's non-terminal ExecutionBlocked variant (the prompt goes on)."""

    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_message: str
    exception_type: str
    traceback: tuple[str, ...] = ()
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None


@dataclass(frozen=True, slots=True)
class PreviewImage:
    """Binary type 1 (no ids: prompt_id None until attributed) or type 4 (with metadata)."""

    mime: str  # "image/jpeg" | "image/png"
    image: bytes
    prompt_id: str | None = None
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class BinaryText:
    """Binary type 3: text from a node (often broadcast to every socket)."""

    node_id: str
    text: str


@dataclass(frozen=True, slots=True)
class UnknownComfyEvent:
    type: str | int
    data: Any = None


ComfyEvent = (
    Status
    | FeatureFlags
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | ProgressState
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
    | PreviewImage
    | BinaryText
    | UnknownComfyEvent
)

TERMINAL_EVENTS = (ExecutionSuccess, ExecutionError, ExecutionInterrupted)
