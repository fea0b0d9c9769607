"""The ledger and its store: two-phase holds resolved exactly once, idempotent by task id, never overdrawn."""

from __future__ import annotations


import pytest
import trio
import trio.testing

from actors import ledger
from actors.sessions import Publish
from actors.store import HoldConflict, InsufficientCredits, Store, UnknownHold, open_store

pytestmark = pytest.mark.usefixtures("store_kind")  # every test on SQLite and on Redis


@pytest.fixture
async def store(store_spec: str) -> Store:
    async with open_store(store_spec) as s:
        yield s


async def test_freeze_settle_release_exactly_once(store: Store) -> None:
    acc, changed = await store.freeze("u", "t1", 30, 100, ttl=60)
    assert (acc.balance, acc.frozen, acc.available, changed) == (100, 30, 70, True)
    acc, changed = await store.freeze("u", "t1", 30, 100, ttl=60)  # retry: no-op success
    assert (acc.frozen, changed) == (30, False)
    with pytest.raises(HoldConflict):
        await store.freeze("u", "t1", 31, 100, ttl=60)  # same id, other amount
    acc, changed = await store.resolve("t1", "settled", 30)
    assert (acc.balance, acc.frozen, changed) == (70, 0, True)
    acc, changed = await store.resolve("t1", "settled", 30)  # double settle: no-op
    assert (acc.balance, acc.frozen, changed) == (70, 0, False)
    with pytest.raises(HoldConflict):
        await store.resolve("t1", "released")  # release after settle: refused
    with pytest.raises(HoldConflict):
        await store.resolve("t1", "settled", 5)  # conflicting amount
    with pytest.raises(UnknownHold):
        await store.resolve("nope", "released")
    await store.freeze("u", "t2", 20, 100, ttl=60)
    acc, _ = await store.resolve("t2", "released")
    assert (acc.balance, acc.frozen) == (70, 0)
    with pytest.raises(HoldConflict):
        await store.resolve("t2", "settled")  # settle after release: refused, nothing changes
    assert (await store.account("u", 100)).balance == 70
    assert await store.audit() == []


async def test_freeze_refused_when_available_would_go_negative(store: Store) -> None:
    await store.freeze("u", "a", 60, 100, ttl=60)
    with pytest.raises(InsufficientCredits):
        await store.freeze("u", "b", 41, 100, ttl=60)
    acc = await store.account("u", 100)
    assert (acc.balance, acc.frozen) == (100, 60)


async def test_concurrent_freezes_never_overdraw(store: Store) -> None:
    hub_tx, hub_rx = trio.open_memory_channel[Publish](1000)
    tx, rx = trio.open_memory_channel[ledger.LedgerMsg](64)
    ok: list[str] = []
    refused: list[str] = []

    async def one(i: int) -> None:
        try:
            await ledger.freeze(tx, "u", f"t{i}", 7)
            ok.append(f"t{i}")
        except InsufficientCredits:
            refused.append(f"t{i}")

    async with trio.open_nursery() as n:
        await n.start(lambda task_status: ledger.run(rx, store=store, sessions=hub_tx, initial_credits=50,
                                                     hold_ttl=60, task_status=task_status))
        async with trio.open_nursery() as burst:
            for i in range(40):
                burst.start_soon(one, i)
        acc = await ledger.get_account(tx, "u")
        n.cancel_scope.cancel()
    assert len(ok) == 7 and len(refused) == 33  # 7 * 7 = 49 <= 50 < 56
    assert (acc.balance, acc.frozen, acc.available) == (50, 49, 1)
    assert await store.audit() == []


async def test_expired_hold_is_released_once_and_pushed(store_spec: str) -> None:
    wall = [1000.0]  # an injected wall clock the test moves by hand
    async with open_store(store_spec, wall_clock=lambda: wall[0]) as store:
        hub_tx, hub_rx = trio.open_memory_channel[Publish](100)
        tx, rx = trio.open_memory_channel[ledger.LedgerMsg](8)
        async with trio.open_nursery() as n:
            await n.start(lambda task_status: ledger.run(rx, store=store, sessions=hub_tx, initial_credits=10,
                                                         hold_ttl=100, wall_clock=lambda: wall[0],
                                                         expiry_interval=0.01, task_status=task_status))
            await ledger.freeze(tx, "u", "t", 4)
            assert (await hub_rx.receive()).body["frozen"] == 4
            wall[0] += 99
            assert (await ledger.get_account(tx, "u")).frozen == 4  # not yet
            wall[0] += 2
            with trio.fail_after(5):
                released = await hub_rx.receive()  # pushed by the ledger's own expiry scan
            assert (released.body["balance"], released.body["frozen"]) == (10, 0)
            with pytest.raises(HoldConflict):
                await ledger.settle(tx, "t", 4)  # too late: it was released
            acc = await ledger.get_account(tx, "u")
            n.cancel_scope.cancel()
        assert (acc.balance, acc.frozen) == (10, 0)
        with pytest.raises(trio.WouldBlock):
            hub_rx.receive_nowait()  # released exactly once: no second balance change
        assert await store.audit() == []


async def test_grant_is_journaled(store: Store) -> None:
    await store.grant("u", 25, 100, "admin")
    await store.grant("u", -5, 100, "admin")
    acc = await store.account("u", 100)
    assert acc.balance == 120
    assert await store.audit() == []
