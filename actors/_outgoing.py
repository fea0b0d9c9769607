"""What a session hands a connection: ``Outgoing``, one encoded message (split out of ``sessions``, re-exported
there)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

# message types a full outbox may coalesce or drop (latest per task wins); all others are never dropped
DROPPABLE_TYPES = frozenset({"progress", "preview", "status"})


def encode_body(body: Mapping[str, Any]) -> bytes:
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
