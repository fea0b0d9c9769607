"""SockJS at ``/ws`` (Spring's ``.withSockJS()``): sans-IO framing and sessions, and the trio/Quart glue."""

from ._protocol import (
    PayloadError,
    SessionState,
    SockJSConfig,
    close_frame,
    decode_payload,
    message_frame,
)
from ._server import SockJSService, install

__all__ = [
    "PayloadError",
    "SessionState",
    "SockJSConfig",
    "SockJSService",
    "close_frame",
    "decode_payload",
    "install",
    "message_frame",
]
