"""The endpoint's gc.freeze policy (web._gc): bursts of connections are frozen out of full collections, and what
closed frozen connections leave behind (their reference cycles) is collected once as many have closed as are
alive, so memory does not grow with reconnects."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from web._gc import FreezePolicy


class FakeConn:
    """Like a connection's objects: a reference cycle, so only the GC can free it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # leave the test process as it was


def open_conns(policy: FreezePolicy, live: dict[int, FakeConn], ids: range) -> None:
    for i in ids:
        live[i] = FakeConn()
        policy.opened(live)


def test_closed_frozen_connections_are_collected_once_as_many_have_closed_as_are_alive() -> None:
    policy = FreezePolicy(every=4)
    live: dict[int, FakeConn] = {}
    open_conns(policy, live, range(8))  # two freezes: all 8 are frozen
    assert policy.frozen == set(range(8)) and gc.get_freeze_count() > 0
    gone = {i: weakref.ref(live[i]) for i in range(8)}
    for i in range(3):  # 3 close: kept (frozen cycles are never collected), fewer than the 5 still alive
        del live[i]
        policy.closed(i, live)
    gc.collect()
    assert policy.thaws == 0
    assert all(gone[i]() is not None for i in range(3)), "frozen garbage is kept until the thaw"
    # a fourth closes: 4 closed frozen connections >= 4 alive (and >= every): thaw, collect, freeze again
    del live[3]
    policy.closed(3, live)
    assert policy.thaws == 1
    assert all(gone[i]() is None for i in range(4)), "the closed connections' cycles were collected"
    assert all(gone[i]() is not None for i in range(4, 8)), "the live ones are untouched"
    assert policy.frozen == {4, 5, 6, 7} and policy.closed_frozen == 0


def test_connections_that_were_never_frozen_need_no_thaw() -> None:
    policy = FreezePolicy(every=100)
    live: dict[int, FakeConn] = {}
    open_conns(policy, live, range(10))  # under the burst size: nothing frozen
    ref = weakref.ref(live[0])
    del live[0]
    policy.closed(0, live)
    gc.collect()
    assert ref() is None and policy.thaws == 0 and policy.frozen == set()
