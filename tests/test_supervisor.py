"""supervise(): backoff schedule, reset after a healthy run, intensity limit, cancellation (exact virtual seconds)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from actors.comfy import RestartPolicy, SupervisorGaveUp, full_jitter, supervise


class Boom(Exception):
    pass


def no_jitter(delay: float) -> float:
    return delay


async def test_backoff_then_give_up(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []

    async def refuse() -> None:
        attempts.append(trio.current_time())
        raise Boom(f"refused #{len(attempts)}")

    with pytest.raises(SupervisorGaveUp) as info:
        await supervise("comfy", refuse, RestartPolicy(initial_delay=0.5, max_restarts=3), jitter=no_jitter)
    assert attempts == [0, 0.5, 1.5, 3.5]  # exact virtual seconds, zero real waiting
    assert isinstance(info.value.__cause__, Boom) and str(info.value.__cause__) == "refused #4"
    assert info.value.crashes == 4 and "comfy: 4 crashes within 60.0s" in str(info.value)


async def test_delay_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []

    async def refuse() -> None:
        attempts.append(trio.current_time())
        raise Boom

    policy = RestartPolicy(initial_delay=1.0, max_delay=4.0, max_restarts=6, window=1000.0)
    with pytest.raises(SupervisorGaveUp):
        await supervise("c", refuse, policy, jitter=no_jitter)
    assert [b - a for a, b in itertools.pairwise(attempts)] == [1, 2, 4, 4, 4, 4]


async def test_jitter_gets_the_capped_delay(autojump_clock: trio.testing.MockClock) -> None:
    asked: list[float] = []
    pauses: list[tuple[str, float]] = []

    def half(delay: float) -> float:
        asked.append(delay)
        return delay / 2

    async def refuse() -> None:
        raise Boom("x")

    policy = RestartPolicy(initial_delay=2.0, max_delay=5.0, max_restarts=3)
    with pytest.raises(SupervisorGaveUp):
        await supervise("c", refuse, policy, jitter=half, on_crash=lambda exc, pause: pauses.append((str(exc), pause)))
    assert asked == [2.0, 4.0, 5.0]
    assert pauses == [("x", 1.0), ("x", 2.0), ("x", 2.5)]  # on_crash: every restart, not the final give-up
    assert trio.current_time() == 5.5


async def test_healthy_run_resets_backoff(autojump_clock: trio.testing.MockClock) -> None:
    # run lengths per attempt: crash at once, at once, then a healthy 30 s, then at once again
    run_for = iter([0, 0, 30, 0, 0])
    attempts: list[float] = []

    async def child() -> None:
        attempts.append(trio.current_time())
        await trio.sleep(next(run_for))
        raise Boom

    policy = RestartPolicy(initial_delay=0.5, max_restarts=4, window=60.0, healthy_after=30.0)
    with pytest.raises(SupervisorGaveUp):
        await supervise("c", child, policy, jitter=no_jitter)
    # 0 crash -> 0.5; 0.5 crash -> 1.5 (delay 1); 1.5 runs 30 s, crashes at 31.5 -> delay reset to 0.5 -> 32.0;
    # 32.0 crash -> 33.0 (delay 1); 33.0 crash: 5 crashes within 60 s > 4 -> give up
    assert attempts == [0, 0.5, 1.5, 32.0, 33.0]


async def test_crashes_outside_the_window_are_forgotten(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []

    async def child() -> None:
        attempts.append(trio.current_time())
        if len(attempts) == 8:
            return
        await trio.sleep(20)  # each run 20 s: never healthy (healthy_after 30), but crashes spread out
        raise Boom

    policy = RestartPolicy(initial_delay=1.0, max_delay=1.0, max_restarts=2, window=40.0, healthy_after=30.0)
    await supervise("c", child, policy, jitter=no_jitter)  # returns: never 3 crashes within 40 s
    assert attempts == [0, 21, 42, 63, 84, 105, 126, 147]


async def test_clean_return_is_not_restarted(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def child() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Boom
        await trio.sleep(1)

    await supervise("c", child, RestartPolicy(initial_delay=0.5), jitter=no_jitter)
    assert calls == 3 and trio.current_time() == 0.5 + 1.0 + 1


async def test_cancelled_is_not_caught(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []

    async def child() -> None:
        starts.append(trio.current_time())
        await trio.sleep_forever()

    with trio.move_on_after(7) as scope:
        await supervise("c", child, RestartPolicy(), jitter=no_jitter)
    assert scope.cancelled_caught and starts == [0]


async def test_cancelled_during_backoff(autojump_clock: trio.testing.MockClock) -> None:
    async def refuse() -> None:
        raise Boom

    with trio.move_on_after(1.0) as scope:
        await supervise("c", refuse, RestartPolicy(initial_delay=0.5, max_restarts=100), jitter=no_jitter)
    assert scope.cancelled_caught and trio.current_time() == 1.0


async def test_base_exceptions_pass_through(autojump_clock: trio.testing.MockClock) -> None:
    async def child() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await supervise("c", child, RestartPolicy(), jitter=no_jitter)


async def test_crash_in_a_nursery_is_restarted(autojump_clock: trio.testing.MockClock) -> None:
    attempts = 0

    async def child() -> None:
        nonlocal attempts
        attempts += 1
        async with trio.open_nursery() as nursery:  # strict groups: ExceptionGroup is an Exception
            nursery.start_soon(trio.sleep_forever)
            raise Boom

    with pytest.raises(SupervisorGaveUp) as info:
        await supervise("c", child, RestartPolicy(max_restarts=1), jitter=no_jitter)
    assert attempts == 2 and isinstance(info.value.__cause__, ExceptionGroup)


def test_full_jitter_stays_in_range() -> None:
    assert all(0 <= full_jitter(3.0) <= 3.0 for _ in range(1000))
    assert full_jitter(0) == 0


@pytest.mark.parametrize(
    "kwargs", [dict(initial_delay=-1), dict(initial_delay=5, max_delay=1), dict(max_restarts=-1), dict(window=-1)]
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"initial_delay|must be >= 0"):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]
