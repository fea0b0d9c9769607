"""What a session hands a connection: ``Outgoing``, one encoded message (split out of ``sessions``, re-exported
there)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

# message types a full outbox may coalesce or drop (latest per task wins); all others are never dropped
DROPPABLE_TYPES = frozenset({"progress", "preview", "status"})


def encode_body(body: Mapping[str, Any]) -> bytes:
    """``body`` as compact UTF-8 JSON, once per message (every user message passes here). orjson and a copy:
    ~0.7 µs for a progress body against ~5–6 µs for ``json.dumps`` (BENCHMARKS, session 5). The same JSON as ``json.dumps``
    (compact, UTF-8 unescaped), byte for byte unless a float needs an exponent (``1e16``, not ``1e+16``). What
    orjson refuses (a non-dict mapping, an int past 64 bits, a lone surrogate) goes through ``json`` exactly as
    before, errors included. It differs only where ``json`` wrote invalid JSON: NaN and the infinities are
    ``null``."""
    try:
        # copied: orjson's own bytes keep its whole 4 KB write buffer allocated, and replay buffers keep bodies
        return memoryview(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)).tobytes()
    except orjson.JSONEncodeError:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class Outgoing(NamedTuple):
    """One message ready for a connection's writer. ``seq`` is the session's number (0 for broadcasts).

    A tuple of atoms (the body already encoded), so the GC stops tracking it after its first collection: the
    replay buffers (up to ``replay_max`` per session) add nothing to full-collection pauses."""

    destination: str
    seq: int
    body: bytes
    type: str
    coalesce_key: tuple[str, str] | None = None
    created: float = 0.0
