"""The endpoint's gc.freeze policy (web._gc): bursts of connections are frozen out of full collections; a closed
frozen connection without reference cycles is freed by reference counting and costs no collection; what cycles
keep of closed frozen connections is collected once as many are kept as are alive, so memory does not grow with
reconnects. And the real endpoint's closed connections hold no cycle (so its thaws stay rare)."""

from __future__ import annotations

import gc
import weakref

import pytest

from web._gc import FreezePolicy


class FakeConn:
    """A connection whose objects form a reference cycle, so only the GC can free it."""

    def __init__(self) -> None:
        self.me = self


class PlainConn:
    """A connection whose objects hold no cycle: reference counting frees it, frozen or not."""


pytestmark = pytest.mark.usefixtures("thawed")  # these tests freeze: the process is thawed after each


def open_conns(policy: FreezePolicy, live: dict[int, object], ids: range, kind: type = FakeConn) -> None:
    for i in ids:
        live[i] = kind()
        policy.opened(live)


def close(policy: FreezePolicy, live: dict[int, object], i: int) -> None:
    """As the endpoint does: out of ``live``, then told to the policy; the caller drops it after."""
    conn = live.pop(i)
    policy.closed(i, conn, live)


def test_closed_frozen_connections_are_collected_once_as_many_have_closed_as_are_alive() -> None:
    policy = FreezePolicy(every=4)
    live: dict[int, object] = {}
    open_conns(policy, live, range(8))  # two freezes: all 8 are frozen
    assert policy.frozen == set(range(8)) and gc.get_freeze_count() > 0
    gone = {i: weakref.ref(live[i]) for i in range(8)}
    for i in range(3):  # 3 close: kept (frozen cycles are never collected), fewer than the 5 still alive
        close(policy, live, i)
    gc.collect()
    assert policy.thaws == 0
    assert all(gone[i]() is not None for i in range(3)), "frozen garbage is kept until the thaw"
    # a fourth closes: 4 kept closed frozen connections >= 4 alive (and >= every): thaw, collect, freeze again
    close(policy, live, 3)
    assert policy.thaws == 1
    # (the one closing now is still its caller's while the thaw runs: the next thaw collects it)
    assert all(gone[i]() is None for i in range(3)), "the closed connections' cycles were collected"
    assert all(gone[i]() is not None for i in range(4, 8)), "the live ones are untouched"
    assert policy.frozen == {4, 5, 6, 7} and not policy.kept


def test_closed_frozen_connections_without_cycles_are_freed_and_cost_no_thaw() -> None:
    """The full collection a thaw makes (≈ 1.7 s at 10,000 connections) is spent only on cycles: connections freed
    by reference counting do not count, however many close, and a few cyclic ones among them are kept until as many
    are kept as are alive."""
    policy = FreezePolicy(every=4)
    live: dict[int, object] = {}
    open_conns(policy, live, range(40), PlainConn)
    open_conns(policy, live, range(40, 44))  # 4 with cycles
    assert policy.frozen == set(range(44))
    gone = {i: weakref.ref(live[i]) for i in range(44)}
    gc.disable()  # what frees them here is reference counting alone
    try:
        for i in range(40):
            close(policy, live, i)
            assert gone[i]() is None, "freed as it closed, though frozen"
    finally:
        gc.enable()
    assert policy.thaws == 0, "no collection for connections that left no garbage"
    for i in (40, 41, 42):
        close(policy, live, i)
    assert policy.thaws == 0 and all(gone[i]() is not None for i in (40, 41, 42)), "3 kept: fewer than 'every'"
    close(policy, live, 43)  # 4 kept >= every (and >= the 0 alive): thaw
    assert policy.thaws == 1 and all(gone[i]() is None for i in range(40, 43)), "the cycles were collected"


def test_connections_that_were_never_frozen_need_no_thaw() -> None:
    policy = FreezePolicy(every=100)
    live: dict[int, object] = {}
    open_conns(policy, live, range(10))  # under the burst size: nothing frozen
    ref = weakref.ref(live[0])
    close(policy, live, 0)
    gc.collect()
    assert ref() is None and policy.thaws == 0 and policy.frozen == set()
