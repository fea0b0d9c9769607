"""Signed image URLs: ``{base}/api/images/{taskId}/{n}?exp=<unix s>&sig=<base64url HMAC-SHA256>``.

An ``<img src>`` never sends an ``Authorization`` header, so the URLs the gateway hands out (in ``imageResult``,
``completed``, results and task lists) carry their own proof: an HMAC over the task, the image index and the
expiry, keyed with a key derived from the gateway's secret (never the token key itself). A URL is signed again
each time it is handed out (results re-sign on read), so a page reloaded next week gets fresh URLs.
Pure code, no I/O; the wall clock is injected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_TTL = 7 * 24 * 3600.0  # seconds a signed image URL stays valid
Verdict = Literal["ok", "expired", "bad"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class ImageUrls:
    base: str  # e.g. "http://127.0.0.1:8080" (the public URL)
    secret: bytes = field(repr=False)
    ttl: float = DEFAULT_TTL
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.ttl <= 0:
            raise ValueError(f"the image URL ttl must be > 0 seconds, not {self.ttl!r}")

    def _key(self) -> bytes:
        return hmac.new(self.secret, b"comfy-gateway image url v1", hashlib.sha256).digest()

    def signature(self, task_id: str, n: int, exp: int) -> str:
        return _b64(hmac.new(self._key(), f"{task_id}\n{n}\n{exp}".encode(), hashlib.sha256).digest())

    @property
    def step(self) -> int:
        """Expiries are rounded up to a multiple of this (a tenth of the ttl, at most an hour), so the URL of an
        image stays the same for a while: a page that reloads its tasks gets the URLs it has, and the browser's
        cache serves them."""
        return max(1, min(3600, int(self.ttl // 10)))

    def url(self, task_id: str, n: int) -> str:
        step = self.step
        exp = -(-int(self.clock() + self.ttl) // step) * step
        return f"{self.base}/api/images/{task_id}/{n}?exp={exp}&sig={self.signature(task_id, n, exp)}"

    def check(self, task_id: str, n: int, exp: str | None, sig: str | None) -> Verdict:
        """ "ok", "expired" (a genuine URL past its time) or "bad" (missing, malformed or not ours)."""
        if not exp or not sig or not exp.isdigit() or len(exp) > 12:
            return "bad"
        if not hmac.compare_digest(self.signature(task_id, n, int(exp)), sig):
            return "bad"
        return "ok" if self.clock() < int(exp) else "expired"
