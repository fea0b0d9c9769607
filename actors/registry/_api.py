"""The registry's vocabulary: its configuration, timing constants, and the requests it answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from ..comfy import ComfyReport
from ..image_urls import ImageUrls
from ..store import ImageRef
from ..wire import DomainError

__all__ = [
    "CANCEL_CHECK_DELAY",
    "CROSS_CHECK_INTERVAL",
    "CROSS_CHECK_SETTLE",
    "HISTORY_RETRY_DELAY",
    "INTERNAL_ERROR",
    "MAX_ABANDONED",
    "MAX_BUCKETS",
    "RECHECK_DELAY",
    "TIMEOUT_ERROR",
    "TIMEOUT_GRACE",
    "Accepted",
    "Cancel",
    "GetStats",
    "GetTask",
    "ImageLocation",
    "ListResults",
    "ListTasks",
    "Refused",
    "RegistryConfig",
    "RegistryMsg",
    "RegistryStats",
    "Submit",
    "image_url",
]

CANCEL_CHECK_DELAY = 2.0  # seconds after a cancel before asking ComfyUI where the prompt went
RECHECK_DELAY = 5.0  # seconds between reconciliation retries while a prompt's fate is unknown
HISTORY_RETRY_DELAY = 0.5  # seconds: ComfyUI writes the history entry just after the terminal event
TIMEOUT_GRACE = 60.0  # seconds a timed-out prompt has to obey the interrupt before it is given up on
CROSS_CHECK_INTERVAL = 1.0  # seconds: at most one queue_remaining-triggered reconciliation per backend this often
# seconds after its submit was accepted before a prompt not yet seen on the socket counts in that cross-check: our
# socket's events lag behind HTTP answers, so a `status` read just after the answer may predate the prompt
CROSS_CHECK_SETTLE = 2.0
MAX_ABANDONED = 1000  # prompt ids per backend to delete/interrupt when it returns (bounded memory)
TIMEOUT_ERROR = "the task exceeded its time limit and was interrupted"
INTERNAL_ERROR = "the gateway failed while handling this task (internal error); credits returned"
MAX_BUCKETS = 10_000  # per-user submit buckets kept before full ones are forgotten


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    price: int = 1  # credits per unit of ``size``
    max_queued_per_user: int = 32
    task_timeout: float = 30 * 60.0  # seconds a task may run inside ComfyUI before it is interrupted
    backend_lost_after: float = 5 * 60.0  # seconds a backend may stay unreachable before its tasks are backend_lost
    public_url: str = ""  # prefix of image URLs, e.g. "http://127.0.0.1:8080"
    backend_urls: Mapping[str, str] = field(default_factory=dict)
    submit_rate: float = 5.0  # submits per user per second (token bucket) ...
    submit_burst: int = 20  # ... with this many at once; beyond: 429 too_many_submits
    quarantine_after: int = 2  # unclean restarts a task may stay active across without progress
    unclean_start: bool = False  # the previous run on this store did not stop cleanly (set by run_gateway)
    boot: int = 1  # this run's boot number on the store (the crashed run, if unclean, is boot - 1)
    image_urls: ImageUrls | None = None  # signs image URLs (re-signed each time a view is made)


def image_url(cfg: RegistryConfig, task_id: str, n: int) -> str:
    """The URL of image ``n`` of a task, signed when the gateway signs them (re-signed each time a view is made)."""
    if cfg.image_urls is not None:
        return cfg.image_urls.url(task_id, n)
    return f"{cfg.public_url}/api/images/{task_id}/{n}"


# ---- requests from the web layer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    task_id: str
    position: int
    cost: int


@dataclass(frozen=True, slots=True)
class Refused(DomainError):
    """The registry (or the web layer's own checks) refused a submit: ``error`` is the code, which the web layer
    maps to an HTTP status and a STOMP answer (``web/errors.py``); no actor chooses a status."""

    @property
    def error(self) -> str:
        return self.code


@dataclass(frozen=True, slots=True)
class Submit:
    """A new task. A raw workflow costs ``size × price``; one built from a template comes with its ``cost`` (the
    template's rule, already evaluated), the template's name and the resolved parameters, all kept with the task."""

    user_id: str
    client_id: str
    workflow: Mapping[str, Any]
    size: int
    reply: trio.MemorySendChannel[Accepted | Refused]
    cost: int | None = None
    template: str | None = None
    params: Mapping[str, Any] | None = None
    task_id: str | None = None  # chosen by the asker (an edge's request id): repeating it returns that task


@dataclass(frozen=True, slots=True)
class GetTask:
    user_id: str
    task_id: str
    reply: trio.MemorySendChannel[dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class Cancel:
    """Owner-only cancel. Replies 'cancelled', 'cancelling', 'not_found' or 'finished'."""

    user_id: str
    task_id: str
    reply: trio.MemorySendChannel[str]


@dataclass(frozen=True, slots=True)
class ListResults:
    user_id: str
    limit: int
    before: int | None
    reply: trio.MemorySendChannel[tuple[list[dict[str, Any]], int | None]]


@dataclass(frozen=True, slots=True)
class ListTasks:
    """The user's tasks, newest first: ``which`` is "active" (queued, submitted, running), "finished" or "all"."""

    user_id: str
    which: str
    limit: int
    before: int | None
    reply: trio.MemorySendChannel[tuple[list[dict[str, Any]], int | None]]


@dataclass(frozen=True, slots=True)
class ImageLocation:
    """Where image ``n`` of the user's task lives: (backend base URL, ImageRef), or None. ``user_id`` None: any
    owner (the request carried a signed URL, which is the gateway's own word that it may see this image)."""

    user_id: str | None
    task_id: str
    n: int
    reply: trio.MemorySendChannel[tuple[str, ImageRef] | None]


@dataclass(frozen=True, slots=True)
class RegistryStats:
    by_state: Mapping[str, int]
    backends_up: int
    backends_total: int


@dataclass(frozen=True, slots=True)
class GetStats:
    reply: trio.MemorySendChannel[RegistryStats]


RegistryMsg = Submit | GetTask | Cancel | ListResults | ListTasks | ImageLocation | GetStats | ComfyReport
