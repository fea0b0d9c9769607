"""The comfy actor: one per ComfyUI backend (see docs/DESIGN.md, "comfy").

Modules: ``_events`` (typed ComfyUI events), ``_messages`` (commands in, reports out), ``_protocol`` (sans-IO
parsing of WebSocket messages and 400 bodies), ``_supervisor`` (restart with backoff), ``_config`` (BackendSpec,
ComfyTimeouts, ComfyCounters), ``_connection`` (the WebSocket half), ``_wsclient`` (its WebSocket client,
wsproto read in the connection's own task), ``_commands`` (the HTTP half), ``_actor``
(``run``, which wires the two halves).

Exceptions::

    ComfyProtocolError(ValueError)   a WebSocket message that does not parse (the actor skips it)
    ComfyDisconnected(Exception)     one connection attempt ended (what the supervisor restarts)
    SupervisorGaveUp(Exception)      too many crashes within the window; __cause__ is the last one
"""

from ._actor import run
from ._config import BackendSpec, ComfyCounters, ComfyStats, ComfyTimeouts
from ._connection import ComfyDisconnected
from ._events import (
    TERMINAL_EVENTS,
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
from ._messages import (
    BackendEvent,
    BackendEvents,
    BackendLost,
    BackendUp,
    CancelPrompt,
    CheckPrompts,
    ComfyCommand,
    ComfyReport,
    PromptAccepted,
    PromptFailed,
    PromptLocated,
    PromptRejected,
    PromptSubmitUnknown,
    SubmitPrompt,
)
from ._protocol import ComfyProtocolError, format_rejection, is_noise, parse_comfy_message
from ._supervisor import RestartPolicy, SupervisorGaveUp, full_jitter, supervise

__all__ = [
    "TERMINAL_EVENTS",
    "BackendEvent",
    "BackendEvents",
    "BackendLost",
    "BackendSpec",
    "BackendUp",
    "BinaryText",
    "CancelPrompt",
    "CheckPrompts",
    "ComfyCommand",
    "ComfyCounters",
    "ComfyDisconnected",
    "ComfyEvent",
    "ComfyProtocolError",
    "ComfyReport",
    "ComfyStats",
    "ComfyTimeouts",
    "Executed",
    "Executing",
    "ExecutionCached",
    "ExecutionError",
    "ExecutionInterrupted",
    "ExecutionStart",
    "ExecutionSuccess",
    "FeatureFlags",
    "PreviewImage",
    "Progress",
    "ProgressState",
    "PromptAccepted",
    "PromptFailed",
    "PromptLocated",
    "PromptRejected",
    "PromptSubmitUnknown",
    "RestartPolicy",
    "Status",
    "SubmitPrompt",
    "SupervisorGaveUp",
    "UnknownComfyEvent",
    "format_rejection",
    "full_jitter",
    "is_noise",
    "parse_comfy_message",
    "run",
    "supervise",
]
