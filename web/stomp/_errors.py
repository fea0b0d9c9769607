"""Errors raised by the sans-IO STOMP codec.

The tree (as in httpx/_exceptions.py)::

    StompProtocolError            base class, never raised itself
    ├── LocalProtocolError        we misused the API: sent a frame the state does not allow, a client-only
    │                             command, a header that cannot be encoded, ...
    └── RemoteProtocolError       the client sent something invalid; ``error_frame`` is the ERROR frame to
                                  send back before closing (the reply hint, like wsproto's ``event_hint``)

Both are ``Exception`` subclasses, so ``except StompProtocolError`` catches every codec error and nothing
else. After a ``RemoteProtocolError`` the connection stays in ``ConnState.ERROR`` (h11's sticky ERROR).
"""

from __future__ import annotations

from ._events import Frame, make_error_frame

__all__ = ["LocalProtocolError", "RemoteProtocolError", "StompProtocolError"]


class StompProtocolError(Exception):
    """Base class of the codec's errors. Never raised itself (h11/_util.py ProtocolError)."""

    def __init__(self, msg: str) -> None:
        if type(self) is StompProtocolError:
            raise TypeError("StompProtocolError is abstract: raise LocalProtocolError or RemoteProtocolError")
        super().__init__(msg)


class LocalProtocolError(StompProtocolError):
    """We used the codec wrongly (a programming error in the caller, not the peer's fault)."""


class RemoteProtocolError(StompProtocolError):
    """The client broke the protocol.

    ``error_frame`` is a ready-to-send ERROR frame: header ``message`` (the short reason, also ``str(exc)``),
    ``content-type: text/plain``, the detail as body and ``receipt-id`` when the offending frame carried a
    ``receipt`` header. Without an explicit ``error_frame`` one is built from ``msg`` alone.
    """

    error_frame: Frame

    def __init__(self, msg: str, *, error_frame: Frame | None = None) -> None:
        super().__init__(msg)
        if error_frame is None:
            error_frame = make_error_frame(msg)
        self.error_frame = error_frame
