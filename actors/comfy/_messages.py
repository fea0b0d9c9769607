"""Messages in and out of a comfy actor (one per ComfyUI backend).

Commands go into the actor's inbox; reports come out on the channel it was given (the registry's inbox).
The actor never waits on the registry from its command loop: each HTTP call runs in its own task, so a
full registry inbox slows reports, never commands (no deadlock in the registry -> comfy -> registry cycle).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._events import ComfyEvent

# ---- commands (registry / scheduler -> comfy actor) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitPrompt:
    """POST /prompt with the gateway's own prompt_id and the actor's clientId."""

    task_id: str
    prompt_id: str
    workflow: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CancelPrompt:
    """Remove from ComfyUI's pending queue, then interrupt if it is the running one (owner-checked upstream)."""

    prompt_id: str


@dataclass(frozen=True, slots=True)
class CheckPrompts:
    """Reconcile: where is each prompt? Answered with one PromptLocated per prompt_id."""

    prompt_ids: tuple[str, ...]


ComfyCommand = SubmitPrompt | CancelPrompt | CheckPrompts

# ---- reports (comfy actor -> registry) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendUp:
    """The socket is open and ComfyUI's first ``status`` arrived: events for our clientId flow again."""

    backend: str
    queue_remaining: int


@dataclass(frozen=True, slots=True)
class BackendLost:
    """The socket closed or could not be opened; ``down`` is True once the supervisor gave up (slow retry)."""

    backend: str
    reason: str
    down: bool = False


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """A parsed ComfyUI event that arrived on this backend's socket."""

    backend: str
    event: ComfyEvent


@dataclass(frozen=True, slots=True)
class BackendEvents:
    """The events of one read of this backend's socket, in order (at least one): one hop to the registry for a
    burst of progress instead of one per event. The registry handles each as a ``BackendEvent``."""

    backend: str
    events: tuple[ComfyEvent, ...]


@dataclass(frozen=True, slots=True)
class PromptAccepted:
    backend: str
    task_id: str
    prompt_id: str
    number: float
    node_errors: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PromptRejected:
    """ComfyUI answered 4xx/5xx: the prompt is definitely not queued. ``detail`` is readable text."""

    backend: str
    task_id: str
    prompt_id: str
    status: int
    detail: str
    body: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PromptSubmitUnknown:
    """The POST failed in transit (timeout, connection reset): it may or may not be queued. Reconcile."""

    backend: str
    task_id: str
    prompt_id: str
    error: str


@dataclass(frozen=True, slots=True)
class PromptLocated:
    """Answer to CheckPrompts. where: 'pending' | 'running' | 'done' | 'missing' | 'unknown' (HTTP failed).

    For 'done', ``history`` is ComfyUI's /history/{id} entry (outputs, status.messages with the terminal event).
    """

    backend: str
    prompt_id: str
    where: str
    history: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PromptFailed:
    """Submitting the prompt failed inside the gateway (a bug, or input that cannot be encoded): crash isolation
    turns the exception into this report, so the task fails (``internal``, refunded) and the actor goes on."""

    backend: str
    task_id: str
    prompt_id: str
    error: str


ComfyReport = (
    BackendUp
    | BackendLost
    | BackendEvent
    | BackendEvents
    | PromptAccepted
    | PromptRejected
    | PromptSubmitUnknown
    | PromptLocated
    | PromptFailed
)
