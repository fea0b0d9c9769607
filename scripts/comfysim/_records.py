"""What the simulator records: finished runs, queue items (ComfyUI's 5-element form) and cache entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One prompt the worker ran to a terminal event (times are ``trio.current_time()``)."""

    prompt_id: str
    client_id: str | None
    started: float
    ended: float
    outcome: Literal["success", "error", "interrupted"]


@dataclass(slots=True)
class _QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]

    @property
    def client_id(self) -> Any:
        return self.extra_data.get("client_id")

    def as_list(self) -> list[Any]:
        """The 5-element form of /queue and history entries."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None
