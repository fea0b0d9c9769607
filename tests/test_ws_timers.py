"""The shared deadline heap of the STOMP endpoint (web/_timers.py): one task fires every connection at its deadline,
and deadlines with a slack (heart-beats) that fall due close together share one wake-up. Under MockClock."""

from __future__ import annotations

import math

import trio
import trio.testing

from web._timers import Timers


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.armed = math.inf


async def test_deadlines_within_their_slack_share_one_wake_up(autojump_clock: trio.testing.MockClock) -> None:
    timers = Timers()
    fired: list[tuple[str, float]] = []

    def fire(conn: Conn) -> None:
        fired.append((conn.name, trio.current_time()))

    a, b, c, exact, late = Conn("a"), Conn("b"), Conn("c"), Conn("exact"), Conn("late")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run, fire)
        timers.arm(a, start + 10.0, 1.0)  # the earliest: the service wakes at its deadline ...
        timers.arm(b, start + 10.5, 1.0)  # ... and fires these two with it, a little early
        timers.arm(c, start + 10.9, 1.0)
        timers.arm(exact, start + 10.6)  # no slack: never early, even with the service awake anyway
        timers.arm(late, start + 11.5, 1.0)  # beyond 10 + 1: its own wake-up (which takes exact's time)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    woke = {name: round(at - start, 3) for name, at in fired}
    assert woke == {"a": 10.0, "b": 10.0, "c": 10.0, "exact": 10.6, "late": 10.6}, woke


async def test_an_earlier_arm_supersedes_and_disarm_silences(autojump_clock: trio.testing.MockClock) -> None:
    timers = Timers()
    fired: list[tuple[str, float]] = []
    a, b = Conn("a"), Conn("b")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run, lambda conn: fired.append((conn.name, trio.current_time() - start)))
        timers.arm(a, start + 5.0)
        timers.arm(a, start + 2.0)  # earlier wins; the stale entry at 5 is skipped
        timers.arm(a, start + 3.0)  # later: ignored (the fire recomputes)
        timers.arm(b, start + 4.0)
        timers.disarm(b)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert fired == [("a", 2.0)]
