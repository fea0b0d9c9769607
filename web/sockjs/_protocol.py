"""SockJS framing and session state, sans-IO (no trio): what Spring's ``.withSockJS()`` speaks at ``/ws``.

The protocol (sockjs-protocol 0.3.3): the server sends frames, the client sends bare JSON.

* ``o`` opens a session, ``h`` is a heart-beat, ``a["m1","m2"]`` carries messages, ``c[code,"reason"]`` closes.
* Client messages arrive as a JSON array of strings (``xhr_send``, or one WebSocket message).
* A session is named by ``/{server}/{session}`` (server ignored). HTTP sessions outlive each request: at most one
  *receiving* request at a time (another gets ``c[2010,...]``); a session with no receiving request for
  ``disconnect_delay`` seconds is gone; once closed, every receiving request gets the close frame until it is.

``SessionState`` is the per-session bookkeeping: pending outbound messages (bounded by the caller through
``room()``), who is receiving, and when heart-beats and expiry are due. Times are plain floats passed in, so
the glue can use ``trio.current_time()`` and tests can pass numbers.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

OPEN_FRAME = "o"
HEARTBEAT_FRAME = "h"
STREAMING_PRELUDE = "h" * 2048 + "\n"  # xhr-streaming: some browsers show nothing before 2 KiB arrived
EVENTSOURCE_PRELUDE = "\r\n"
ANOTHER_CONNECTION = (2010, "Another connection still open")
GO_AWAY = (3000, "Go away!")
DEFAULT_HEARTBEAT = 25.0  # seconds (SockJS and Spring default)
DEFAULT_DISCONNECT_DELAY = 5.0  # seconds a session lives with no receiving request (Spring default)
DEFAULT_STREAM_LIMIT = 128 * 1024  # bytes sent on one streaming response before it is ended (client reopens)
NO_CACHE = "no-store, no-cache, no-transform, must-revalidate, max-age=0"
TRANSPORTS = ("xhr", "xhr_send", "xhr_streaming", "eventsource", "websocket")

# characters a browser's JSON.parse or its transport may mangle: always sent as \uXXXX (sockjs-protocol
# "escapable_by_server"); json.dumps already escapes quotes, backslashes and C0 controls
_ESCAPE = re.compile(
    "[\x7f-\x9f\u00ad\u0600-\u0604\u070f\u17b4\u17b5\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufeff\ufff0-\uffff]"
)


class PayloadError(ValueError):
    """A client payload that is not a JSON array of strings; ``str(exc)`` is the text SockJS answers with."""


def _escape(text: str) -> str:
    return _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def message_frame(messages: list[str]) -> str:
    """``a[...]``: the messages as a JSON array."""
    return "a" + _escape(json.dumps(messages, ensure_ascii=False, separators=(",", ":")))


def close_frame(code: int, reason: str) -> str:
    return "c" + _escape(json.dumps([code, reason], ensure_ascii=False, separators=(",", ":")))


def decode_payload(body: str) -> list[str]:
    """The messages of one ``xhr_send`` body or SockJS WebSocket message (a lone JSON string is one message)."""
    if not body:
        raise PayloadError("Payload expected.")
    try:
        value = json.loads(body)
    except ValueError:
        raise PayloadError("Broken JSON encoding.") from None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise PayloadError("Broken JSON encoding.")  # valid JSON, but not the array of strings SockJS sends
    return value


def valid_session_part(part: str) -> bool:
    """``{server}`` and ``{session}`` path segments: not empty, no dots (sockjs-protocol SessionURLs)."""
    return bool(part) and "." not in part and "/" not in part


def frame_for(transport: str, frame: str) -> str:
    """How one frame travels on each receiving transport."""
    if transport == "eventsource":
        return f"data: {frame}\r\n\r\n"
    if transport == "websocket":
        return frame
    return frame + "\n"


def info(entropy: int, *, websocket: bool = True) -> dict[str, object]:
    """The ``GET {base}/info`` body: capabilities, and entropy for the browser's random numbers."""
    return {"websocket": websocket, "origins": ["*:*"], "cookie_needed": False, "entropy": entropy}


@dataclass(frozen=True, slots=True)
class SockJSConfig:
    heartbeat: float = DEFAULT_HEARTBEAT  # seconds between "h" frames on an idle receiving transport
    disconnect_delay: float = DEFAULT_DISCONNECT_DELAY  # seconds an HTTP session lives with nobody receiving
    stream_limit: int = DEFAULT_STREAM_LIMIT  # bytes per streaming response before the client must reopen it
    max_sessions: int = 10_000  # live HTTP-transport sessions in this process
    max_pending: int = 1 << 20  # bytes of outbound messages an HTTP session holds for its client


class State(enum.Enum):
    NEW = "new"  # created by a receiving request that has not had its "o" yet
    OPEN = "open"
    CLOSED = "closed"  # the close frame is what every later receiving request gets


@dataclass(frozen=True, slots=True)
class Attached:
    """A receiving request was let in; ``first`` is a frame to write at once ("o" for a new session), or None."""

    first: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    """A receiving request that must get ``frame`` and end (another is receiving, or the session is closed)."""

    frame: str


class SessionState:
    """One SockJS session: pending outbound messages, its receiver, its timers. Not thread-safe; one owner."""

    def __init__(
        self, *, now: float, heartbeat: float = DEFAULT_HEARTBEAT, disconnect_delay: float = DEFAULT_DISCONNECT_DELAY
    ) -> None:
        if heartbeat <= 0 or disconnect_delay <= 0:
            raise ValueError(f"heartbeat and disconnect_delay must be > 0, not {heartbeat!r}, {disconnect_delay!r}")
        self.heartbeat = heartbeat
        self.disconnect_delay = disconnect_delay
        self.state = State.NEW
        self.receiving = False
        self.left_at = now  # when the last receiver left (or the session was made)
        self.last_write = now
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.close_reason: tuple[int, str] | None = None

    def __repr__(self) -> str:
        return (
            f"<SessionState {self.state.value} receiving={self.receiving} pending={len(self.pending)} "
            f"({self.pending_bytes} B)>"
        )

    # -- the application side

    def push(self, message: str) -> None:
        """Queue one outbound message (the caller keeps ``pending_bytes`` bounded)."""
        if self.state is State.CLOSED:
            return  # what is queued after the close is never sent
        self.pending.append(message)
        self.pending_bytes += len(message)

    def close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Close after the pending messages, or (``discard``) at once, dropping them (a client that cannot keep up)."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = (code, reason)
        if discard:
            self.pending, self.pending_bytes = [], 0

    # -- the receiving requests

    def attach(self, now: float) -> Attached | Refused:
        if self.receiving:
            return Refused(close_frame(*ANOTHER_CONNECTION))
        if self.state is State.CLOSED and not self.pending:
            assert self.close_reason is not None
            self.left_at = now  # it stays (serving the close frame) until nobody asked for disconnect_delay
            return Refused(close_frame(*self.close_reason))
        self.receiving = True
        self.last_write = now
        if self.state is State.NEW:
            self.state = State.OPEN
            return Attached(OPEN_FRAME)
        return Attached(None)

    def take(self, now: float) -> str | None:
        """The next frame for the attached receiver, or None while there is nothing to say yet."""
        assert self.receiving, "take() without an attached receiver"
        frame: str | None = None
        if self.pending:
            frame = message_frame(self.pending)
            self.pending, self.pending_bytes = [], 0
        elif self.state is State.CLOSED:
            assert self.close_reason is not None
            frame = close_frame(*self.close_reason)
        elif now - self.last_write >= self.heartbeat:
            frame = HEARTBEAT_FRAME
        if frame is not None:
            self.last_write = now
        return frame

    def detach(self, now: float) -> None:
        self.receiving = False
        self.left_at = now

    # -- timers

    def heartbeat_at(self) -> float:
        return self.last_write + self.heartbeat

    def expires_at(self) -> float:
        """When the session is gone if no receiving request comes (inf while one is attached)."""
        return float("inf") if self.receiving else self.left_at + self.disconnect_delay

    def expired(self, now: float) -> bool:
        return now >= self.expires_at()
