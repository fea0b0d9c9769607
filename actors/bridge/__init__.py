"""Bridges between the actors' memory channels and Redis, so that the same actors run in one process or as the
core of several (``--store redis://``): requests from edges to the core (``_requests``), session messages from
the core to every process's hub (``_sessions``), and their wire format (``_wire``). The actors do not know which
mode they run in; ``actors/gateway.py`` wires the bridges in when the store is Redis."""

from ._presence import announce, processes
from ._requests import Handover, ask_core, serve_edges
from ._sessions import Live, feed_hub, publish_to_redis, resync_sessions
from ._wire import WireError, decode_answer, decode_request, encode_answer, encode_request

__all__ = [
    "Handover",
    "Live",
    "WireError",
    "announce",
    "ask_core",
    "decode_answer",
    "decode_request",
    "encode_answer",
    "encode_request",
    "feed_hub",
    "processes",
    "publish_to_redis",
    "resync_sessions",
    "serve_edges",
]
