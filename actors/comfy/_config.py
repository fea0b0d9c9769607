"""What a comfy actor is given (BackendSpec, ComfyTimeouts) and what it shows (ComfyCounters -> ComfyStats)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

__all__ = ["BackendSpec", "ComfyCounters", "ComfyStats", "ComfyTimeouts"]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str  # e.g. "b0"; first in every log line and report
    url: str  # http base URL, e.g. "http://127.0.0.1:8188" (a path prefix is kept)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend {self.name!r}: url must be http(s)://host[:port][/prefix], got {self.url!r}")


@dataclass(frozen=True, slots=True)
class ComfyTimeouts:
    http: float = 30.0  # seconds per HTTP request to ComfyUI (whole request, body included)
    first_status: float = 10.0  # after the WS opens, ComfyUI's first `status` must come within this
    ping_interval: float = 10.0  # WS ping every this many seconds ...
    ping_timeout: float = 10.0  # ... and a missing pong within this forces a reconnect (zombie socket watchdog)
    slow_retry: float = 30.0  # once the supervisor gave up: retry this often (backend marked down)
    # ComfyUI broadcasts `status` on every enqueue, so an accepted submit followed by no frame at all within this is
    # the same-clientId trap (our socket silently unregistered, docs/comfyui-protocol.md 2.2): reconnect.
    status_after_submit: float = 10.0
    # While ComfyUI has work queued (last queue_remaining > 0), a socket silent this long is reconnected (then
    # reconciled). Long: a node without progress updates (model load, big VAE decode) sends nothing meanwhile.
    silence: float = 120.0


@dataclass(frozen=True, slots=True)
class ComfyStats:
    connected: bool  # a socket is open and its first status arrived
    down: bool  # the supervisor gave up; slow retries until the next successful connect
    reconnects: int  # connection attempts after the first one (failed or not)
    frames: int  # WebSocket messages received, all sockets
    malformed: int  # messages skipped because they did not parse
    unknown: int  # well-formed messages of a type we do not model (ignored)


class ComfyCounters:
    """Live counters of one comfy actor. Only the actor writes them; anyone may call ``statistics()`` (e.g. /metrics)."""

    __slots__ = ("attempts", "connected", "down", "frames", "malformed", "noise", "unknown")

    def __init__(self) -> None:
        self.connected = False
        self.down = False
        self.attempts = 0
        self.frames = 0
        self.malformed = 0
        self.unknown = 0
        self.noise = 0  # progress_state / executing-a-node frames dropped unparsed (``_protocol.is_noise``)

    def statistics(self) -> ComfyStats:
        return ComfyStats(
            connected=self.connected,
            down=self.down,
            reconnects=max(self.attempts - 1, 0),
            frames=self.frames,
            malformed=self.malformed,
            unknown=self.unknown,
        )

    def __repr__(self) -> str:
        return f"<ComfyCounters {self.statistics()}>"
