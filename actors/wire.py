"""The wire contract: every message the gateway sends to a browser, one frozen class each (docs/CONTRACT.md,
"Message bodies"). ``to_wire()`` returns the JSON dict that goes out; this module is the only place a message's
shape is written. Per-user messages go on ``/user/topic/messages``; ``Status`` on ``/topic/messages``.

Domain errors carry a machine-readable ``code`` (``DomainError``); the web layer maps codes to HTTP statuses and
STOMP ERROR frames (``web/errors.py``): no actor chooses an HTTP status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "MESSAGE_TYPES",
    "Balance",
    "Cancelled",
    "Completed",
    "DomainError",
    "ExecutionErrorMsg",
    "ImageResult",
    "Preview",
    "ProgressMsg",
    "Queued",
    "Rejected",
    "Resync",
    "Started",
    "Status",
    "WireMessage",
]


@dataclass(frozen=True, slots=True)
class DomainError:
    """A refusal in the domain's words: ``code`` (e.g. ``insufficient_credits``) and a readable ``detail``."""

    code: str
    detail: str


class WireMessage:
    """Base of the outbound messages: ``type`` is the wire name, ``to_wire()`` the JSON body."""

    __slots__ = ()
    type: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Queued(WireMessage):
    type: ClassVar[str] = "queued"
    task_id: str
    position: int
    cost: int
    template: str | None = None
    params: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "taskId": self.task_id, "position": self.position, "cost": self.cost}
        if self.template is not None:
            body |= {"template": self.template, "params": self.params}
        return body


@dataclass(frozen=True, slots=True)
class Started(WireMessage):
    type: ClassVar[str] = "started"
    task_id: str
    prompt_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "taskId": self.task_id, "prompt_id": self.prompt_id}


@dataclass(frozen=True, slots=True)
class ProgressMsg(WireMessage):
    type: ClassVar[str] = "progress"
    task_id: str
    prompt_id: str
    value: int
    max: int
    node: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "taskId": self.task_id,
            "prompt_id": self.prompt_id,
            "value": self.value,
            "max": self.max,
            "node": self.node,
        }


@dataclass(frozen=True, slots=True)
class Preview(WireMessage):
    type: ClassVar[str] = "preview"
    task_id: str
    prompt_id: str
    mime: str
    data: str  # base64

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "taskId": self.task_id,
            "prompt_id": self.prompt_id,
            "mime": self.mime,
            "data": self.data,
        }


@dataclass(frozen=True, slots=True)
class _TaskUrls(WireMessage):
    task_id: str
    prompt_id: str
    urls: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "taskId": self.task_id, "prompt_id": self.prompt_id, "urls": list(self.urls)}


@dataclass(frozen=True, slots=True)
class ImageResult(_TaskUrls):
    """New images of the task (only those: ``urls`` of this output node)."""

    type: ClassVar[str] = "imageResult"


@dataclass(frozen=True, slots=True)
class Completed(_TaskUrls):
    """The task succeeded: ``urls`` of all its images."""

    type: ClassVar[str] = "completed"


@dataclass(frozen=True, slots=True)
class ExecutionErrorMsg(WireMessage):
    type: ClassVar[str] = "execution_error"
    task_id: str
    prompt_id: str
    error: str
    reason: str
    refunded: bool
    node_id: str | None = None
    node_type: str | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "taskId": self.task_id,
            "prompt_id": self.prompt_id,
            "error": self.error,
            "reason": self.reason,
            "refunded": self.refunded,
        }
        if self.node_id is not None:
            body["node_id"] = self.node_id
        if self.node_type is not None:
            body["node_type"] = self.node_type
        return body


@dataclass(frozen=True, slots=True)
class Cancelled(WireMessage):
    type: ClassVar[str] = "cancelled"
    task_id: str
    refunded: bool

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "taskId": self.task_id, "refunded": self.refunded}


@dataclass(frozen=True, slots=True)
class Balance(WireMessage):
    type: ClassVar[str] = "balance"
    balance: int
    frozen: int
    available: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "balance": self.balance, "frozen": self.frozen, "available": self.available}


@dataclass(frozen=True, slots=True)
class Rejected(WireMessage):
    type: ClassVar[str] = "rejected"
    error: str
    detail: str
    task_id: str | None = None  # the task a refused cancel was about (only ever the user's own)

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "error": self.error, "detail": self.detail}
        if self.task_id is not None:
            body["taskId"] = self.task_id
        return body


@dataclass(frozen=True, slots=True)
class Resync(WireMessage):
    type: ClassVar[str] = "resync"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type}


@dataclass(frozen=True, slots=True)
class Status(WireMessage):
    """The broadcast on ``/topic/messages``."""

    type: ClassVar[str] = "status"
    queued: int
    running: int
    backends_up: int
    backends_total: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "queued": self.queued,
            "running": self.running,
            "backends": {"up": self.backends_up, "total": self.backends_total},
        }


MESSAGE_TYPES: Mapping[str, type[WireMessage]] = {
    cls.type: cls
    for cls in (
        Queued,
        Started,
        ProgressMsg,
        Preview,
        ImageResult,
        Completed,
        ExecutionErrorMsg,
        Cancelled,
        Balance,
        Rejected,
        Resync,
        Status,
    )
}
