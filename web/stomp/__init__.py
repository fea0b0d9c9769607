"""Sans-IO STOMP 1.0-1.2 codec: the server side of a session, with no I/O and no trio.

The endpoint feeds WebSocket payloads to ``StompConnection.receive_data``, drains ``next_event()`` until
``NEED_DATA`` and writes whatever ``send``/``error`` return. ``encode_frame`` is the writer's stateless fast
path for MESSAGE frames. Errors: see ``_errors.py`` (Local = our misuse, Remote = the client's fault).
"""

from ._connection import MAX_FRAME_SIZE, ConnState, StompConnection, StompStatistics
from ._errors import LocalProtocolError, RemoteProtocolError, StompProtocolError
from ._events import (
    CLIENT_COMMANDS,
    HEARTBEAT,
    NEED_DATA,
    SERVER_COMMANDS,
    SUPPORTED_VERSIONS,
    Frame,
    make_error_frame,
)
from ._frames import encode_frame, negotiate_heartbeat

__all__ = [
    "CLIENT_COMMANDS",
    "HEARTBEAT",
    "MAX_FRAME_SIZE",
    "NEED_DATA",
    "SERVER_COMMANDS",
    "SUPPORTED_VERSIONS",
    "ConnState",
    "Frame",
    "LocalProtocolError",
    "RemoteProtocolError",
    "StompConnection",
    "StompProtocolError",
    "StompStatistics",
    "encode_frame",
    "make_error_frame",
    "negotiate_heartbeat",
]
