"""Restart a crashing child with capped exponential backoff and full jitter, within an intensity limit.

Why full jitter (``uniform(0, delay)``): after a ComfyUI restart every gateway process and backend reconnects at
once; spreading the retries over the whole backoff interval avoids a thundering herd (AWS architecture blog,
"Exponential Backoff And Jitter"). Why an intensity limit (Erlang/OTP ``max_restarts`` in ``window``): a child
that keeps crashing should be *reported* (the caller marks the backend down) rather than retried silently forever.

Only ``Exception`` is caught: ``trio.Cancelled`` (a ``BaseException``) and ``KeyboardInterrupt`` pass through, and
so does a ``BaseExceptionGroup`` that holds one of them.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

__all__ = ["RestartPolicy", "SupervisorGaveUp", "full_jitter", "supervise"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    initial_delay: float = 0.5  # seconds before the first restart
    max_delay: float = 30.0  # seconds: the doubling stops here
    max_restarts: int = 5  # intensity: at most this many crashes ...
    window: float = 60.0  # ... within this many seconds, else give up
    healthy_after: float = 30.0  # seconds: a run this long resets the backoff to initial_delay

    def __post_init__(self) -> None:
        if not 0 <= self.initial_delay <= self.max_delay:
            raise ValueError(f"need 0 <= initial_delay <= max_delay, got {self.initial_delay}, {self.max_delay}")
        if self.max_restarts < 0 or self.window < 0 or self.healthy_after < 0:
            raise ValueError(f"max_restarts, window and healthy_after must be >= 0: {self!r}")


class SupervisorGaveUp(Exception):
    """The child crashed more than ``max_restarts`` times within ``window`` seconds. ``__cause__`` is the last crash."""

    def __init__(self, name: str, crashes: int, window: float) -> None:
        super().__init__(f"{name}: {crashes} crashes within {window}s, giving up")
        self.name = name
        self.crashes = crashes
        self.window = window


def full_jitter(delay: float) -> float:
    """Full jitter: a uniformly random pause in [0, delay]."""
    return random.uniform(0, delay)


async def supervise(
    name: str,
    child: Callable[[], Awaitable[None]],
    policy: RestartPolicy,
    *,
    jitter: Callable[[float], float] = full_jitter,
    on_crash: Callable[[BaseException, float], None] | None = None,
) -> None:
    """Run ``child()``; restart it after each crash; return when it returns.

    The pause before restart n (n = 1, 2, ...) is ``jitter(min(initial_delay * 2**(n-1), max_delay))``; a run that
    lasted at least ``healthy_after`` seconds starts the doubling over. More than ``max_restarts`` crashes within
    ``window`` seconds raise ``SupervisorGaveUp`` from the last crash. ``on_crash(exc, pause)`` is called before
    each restart pause (not when giving up). Uses ``trio.current_time()`` throughout, so it runs under MockClock.
    """
    delay = policy.initial_delay
    recent: collections.deque[float] = collections.deque()  # crash times within the window, oldest first
    while True:
        started = trio.current_time()
        try:
            await child()
            return  # a clean exit is not a crash: do not restart
        except Exception as exc:
            failure = exc
        now = trio.current_time()
        if now - started >= policy.healthy_after:
            delay = policy.initial_delay
        recent.append(now)
        while now - recent[0] > policy.window:
            recent.popleft()
        if len(recent) > policy.max_restarts:
            raise SupervisorGaveUp(name, len(recent), policy.window) from failure
        pause = jitter(delay)
        log.warning(
            "%s crashed (%s): %d crash(es) within %.0fs; restarting in %.2fs",
            name,
            failure,
            len(recent),
            policy.window,
            pause,
        )
        if on_crash is not None:
            on_crash(failure, pause)
        await trio.sleep(pause)
        delay = min(delay * 2, policy.max_delay)
