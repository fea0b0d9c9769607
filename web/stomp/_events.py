"""STOMP events: the ``Frame`` dataclass, the ``HEARTBEAT``/``NEED_DATA`` sentinels and the command sets.

The leaf of the codec: it imports nothing from the package, so ``_errors`` (whose ``RemoteProtocolError``
carries an ERROR ``Frame``) and ``_frames`` (the wire format) both build on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ALL_COMMANDS",
    "CLIENT_COMMANDS",
    "HEARTBEAT",
    "NEED_DATA",
    "SERVER_COMMANDS",
    "SUPPORTED_VERSIONS",
    "UNESCAPED_COMMANDS",
    "Frame",
    "make_error_frame",
    "trusted_frame",
]

CLIENT_COMMANDS: Final = frozenset(
    {"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT", "DISCONNECT"}
)
SERVER_COMMANDS: Final = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
ALL_COMMANDS: Final = CLIENT_COMMANDS | SERVER_COMMANDS
# Frames whose headers are never escaped, in any version (spec 1.2, "Value Encoding").
UNESCAPED_COMMANDS: Final = frozenset({"CONNECT", "STOMP", "CONNECTED"})
SUPPORTED_VERSIONS: Final = ("1.2", "1.1", "1.0")  # best first


class _Sentinel(type):
    """A class that is its own type (h11/_util.py ``Sentinel``).

    ``NEED_DATA`` and ``HEARTBEAT`` can then be compared with ``is`` *and* used as keys of a dispatch
    dict keyed by ``type(event)``: ``type(HEARTBEAT) is HEARTBEAT``.
    """

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> _Sentinel:
        assert bases == (_Sentinel,)
        cls = super().__new__(mcs, name, bases, namespace)
        cls.__class__ = cls  # type: ignore[assignment]
        return cls

    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(_Sentinel, metaclass=_Sentinel):  # noqa: N801 - a sentinel, named like h11's
    """Returned by ``next_event()`` when the buffered bytes hold no complete event."""


class HEARTBEAT(_Sentinel, metaclass=_Sentinel):
    """Event: the client sent a bare EOL (a heart-beat) while connected."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One STOMP frame, client or server. Headers are decoded (unescaped), in wire order, repeats kept."""

    command: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        if self.command not in ALL_COMMANDS:
            raise ValueError(f"unknown STOMP command {self.command!r}")
        headers: object = self.headers  # checked at run time: callers need not be type-checked
        if isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
            raise TypeError(f"headers must be an iterable of (name, value) pairs, not {headers!r:.80}")
        pairs: list[tuple[str, str]] = []
        changed = type(headers) is not tuple
        for item in headers:
            pair: object = item
            if type(pair) is not tuple:
                if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable):
                    raise TypeError(f"header must be a (name, value) pair, not {pair!r:.80}")
                pair = tuple(pair)
                changed = True
            if not isinstance(pair, tuple) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
                raise TypeError(f"header must be a (str, str) pair, not {pair!r:.80}")
            pairs.append((pair[0], pair[1]))
        if changed:
            object.__setattr__(self, "headers", tuple(pairs))
        body: object = self.body
        if type(body) is not bytes:
            if not isinstance(body, (bytearray, memoryview)):
                raise TypeError(f"body must be bytes, not {type(body).__name__} {body!r:.60}")
            object.__setattr__(self, "body", bytes(body))

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the first header called ``name`` (STOMP: the first repeat wins)."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 64 else self.body[:64] + b"..."
        return f"Frame({self.command!r}, {self.headers!r}, {body!r})"


_new_frame = object.__new__
_set = object.__setattr__


def trusted_frame(command: str, headers: tuple[tuple[str, str], ...], body: bytes) -> Frame:
    """Build a Frame without ``__post_init__`` checks: for the parser, whose output is valid by construction."""
    frame = _new_frame(Frame)
    _set(frame, "command", command)
    _set(frame, "headers", headers)
    _set(frame, "body", body)
    return frame


def make_error_frame(message: str, detail: str = "", *, receipt_id: str | None = None) -> Frame:
    """The ERROR frame we send: ``message`` header, optional ``receipt-id``, plain-text detail as body."""
    headers: list[tuple[str, str]] = [("message", message)]
    if receipt_id is not None:
        headers.append(("receipt-id", receipt_id))
    headers.append(("content-type", "text/plain"))
    return Frame("ERROR", tuple(headers), detail.encode("utf-8", "backslashreplace"))
