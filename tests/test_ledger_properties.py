"""The ledger against a model (hypothesis, stateful), its refusals, hold expiry and crash recovery, the journal
audit, schema migration, the admin paths, and concurrent submits that must never overdraw.

The stateful test drives the real ledger actor over its inbox, on a real SQLite file, from hypothesis's
(synchronous) rules through a trio loop running in a background thread. After every step it compares each
account, the ``balance`` pushes and the new journal lines with a plain-Python model, and runs the journal audit.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from actors import ledger
from actors.sessions import Publish
from actors.store import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    HoldConflict,
    InsufficientCredits,
    InvalidAmount,
    LedgerError,
    Store,
    TaskRecord,
    UnknownHold,
    open_store,
)
from conftest import GatewayUnderTest, wait_backends_up, workflow
from _redis_server import RedisServer

T = TypeVar("T")

INITIAL = 50
TTL = 100.0
USERS = ("u0", "u1", "u2")
TASKS = tuple(f"t{i}" for i in range(8))


class TrioThread:
    """A trio loop in a background thread, so synchronous hypothesis rules can call async code."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="trio-portal", daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def __enter__(self) -> TrioThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("trio thread did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)


@dataclass
class _Hold:
    user: str
    amount: int
    state: str
    expires: float
    order: int


class LedgerModel:
    """What the ledger should do, in a dozen lines: the oracle of the stateful test."""

    def __init__(self, now: float) -> None:
        self.balance = {u: INITIAL for u in USERS}
        self.frozen = {u: 0 for u in USERS}
        self.holds: dict[str, _Hold] = {}
        self.now = now
        self._order = 0

    def account(self, user: str) -> tuple[int, int]:
        return self.balance[user], self.frozen[user]

    def freeze(self, user: str, task: str, amount: int) -> type[LedgerError] | bool:
        hold = self.holds.get(task)
        if hold is not None:
            return False if (hold.user, hold.amount) == (user, amount) else HoldConflict
        if self.balance[user] - self.frozen[user] < amount:
            return InsufficientCredits
        self._order += 1
        self.holds[task] = _Hold(user, amount, "pending", self.now + TTL, self._order)
        self.frozen[user] += amount
        return True

    def resolve(self, task: str, outcome: str, amount: int | None) -> type[LedgerError] | bool:
        hold = self.holds.get(task)
        if hold is None:
            return UnknownHold
        if amount is not None and amount != hold.amount:
            return HoldConflict
        if hold.state == outcome:
            return False
        if hold.state != "pending":
            return HoldConflict
        self._apply(hold, outcome)
        return True

    def _apply(self, hold: _Hold, outcome: str) -> None:
        hold.state = outcome
        self.frozen[hold.user] -= hold.amount
        if outcome == "settled":
            self.balance[hold.user] -= hold.amount

    def sweep(self) -> list[tuple[str, _Hold, tuple[str, int, int]]]:
        """Release the due holds, oldest deadline first; returns (task, hold, the push it causes) for each."""
        due = sorted(((t, h) for t, h in self.holds.items() if h.state == "pending" and h.expires <= self.now),
                     key=lambda th: (th[1].expires, th[1].order))
        out = []
        for task, hold in due:
            self._apply(hold, "released")
            out.append((task, hold, (hold.user, *self.account(hold.user))))
        return out


class LedgerMachine(RuleBasedStateMachine):
    portal: TrioThread  # set by the test
    redis: RedisServer | None = None  # set by the test: run on this (flushed) Redis instead of a fresh SQLite file

    def __init__(self) -> None:
        super().__init__()
        self.wall = [1_000_000.0]
        self.model = LedgerModel(self.wall[0])
        self.tmp = tempfile.TemporaryDirectory(prefix="ledger-prop-")
        if self.redis is not None:
            self.redis.flush()
        spec = self.redis.url() if self.redis is not None else os.path.join(self.tmp.name, "g.db")
        self.hub_tx, self.hub_rx = trio.open_memory_channel[Publish](10_000)
        self.tx, rx = trio.open_memory_channel[ledger.LedgerMsg](8)
        self.journal_len = 0
        self.closed = trio.Event()

        async def keep_open(task_status: trio.TaskStatus[Store]) -> None:
            # one task opens and closes the store (a Redis client's connection pool is a nursery of its own)
            async with open_store(spec, wall_clock=lambda: self.wall[0]) as store:
                task_status.started(store)
                await self.closed.wait()

        async def start() -> None:
            assert self.portal.nursery is not None
            self.store = await self.portal.nursery.start(keep_open)
            await self.portal.nursery.start(partial(
                ledger.run, rx, store=self.store, sessions=self.hub_tx, initial_credits=INITIAL, hold_ttl=TTL,
                wall_clock=lambda: self.wall[0], expiry_interval=1e9,
            ))

        self.portal.run(start)

    def teardown(self) -> None:
        async def stop() -> None:
            await self.tx.aclose()  # the actor ends when its inbox closes
            self.closed.set()

        self.portal.run(stop)
        self.tmp.cleanup()

    # -- helpers

    def call(self, afn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T | LedgerError:
        async def go() -> T | LedgerError:
            try:
                with trio.fail_after(10):
                    return await afn(self.tx, *args, **kw)
            except LedgerError as exc:
                return exc

        return self.portal.run(go)

    def pushes(self) -> list[tuple[str, int, int]]:
        out = []
        while True:
            try:
                p = self.portal.run_sync(self.hub_rx.receive_nowait)
            except trio.WouldBlock:
                return sorted(out)
            assert p.client_id is None and p.body["type"] == "balance"
            assert p.body["available"] == p.body["balance"] - p.body["frozen"]
            out.append((p.user_id, p.body["balance"], p.body["frozen"]))

    def new_journal(self) -> list[tuple[str, str | None, int]]:
        lines = self.portal.run(self.store.journal)
        new, self.journal_len = lines[self.journal_len:], len(lines)
        return sorted((j.kind, j.task_id, j.amount) for j in new)

    def check(self, got: object, expected: type[LedgerError] | bool, push_users: list[str],
              lines: list[tuple[str, str | None, int]], pushed: list[tuple[str, int, int]] | None = None) -> None:
        """The outcome, then the balance pushes (by default one per user in ``push_users``, with the model's
        account after the step), then the journal lines the step added."""
        if isinstance(expected, bool):
            assert not isinstance(got, LedgerError), got
        else:
            assert type(got) is expected, (got, expected)
        if pushed is None:
            pushed = [(u, *self.model.account(u)) for u in push_users]
        assert self.pushes() == sorted(pushed)
        assert self.new_journal() == sorted(lines)

    # -- rules

    @initialize()
    def open_accounts(self) -> None:
        for u in USERS:
            acc = self.call(ledger.get_account, u)
            assert (acc.balance, acc.frozen) == (INITIAL, 0)
        assert self.new_journal() == sorted(("open", None, INITIAL) for _ in USERS)

    @rule(user=st.sampled_from(USERS), task=st.sampled_from(TASKS), amount=st.integers(0, 30))
    def freeze(self, user: str, task: str, amount: int) -> None:
        expected = self.model.freeze(user, task, amount)
        got = self.call(ledger.freeze, user, task, amount)
        did = expected is True
        self.check(got, expected, [user] if did else [], [("freeze", task, amount)] if did else [])

    @rule(task=st.sampled_from(TASKS), outcome=st.sampled_from(["settled", "released"]),
          amount=st.none() | st.integers(0, 30), data=st.data())
    def resolve(self, task: str, outcome: str, amount: int | None, data: st.DataObject) -> None:
        if amount is not None and task in self.model.holds and data.draw(st.booleans()):
            amount = self.model.holds[task].amount  # mostly the right amount, sometimes a conflicting one
        expected = self.model.resolve(task, outcome, amount)
        fn = ledger.settle if outcome == "settled" else ledger.release
        got = self.call(fn, task, amount)
        did = expected is True
        hold = self.model.holds.get(task)
        kind = "settle" if outcome == "settled" else "release"
        self.check(got, expected, [hold.user] if did and hold else [], [(kind, task, hold.amount)] if did and hold else [])

    @rule(user=st.sampled_from(USERS), amount=st.integers(-20, 40), allow_negative=st.booleans())
    def grant(self, user: str, amount: int, allow_negative: bool) -> None:
        if self.model.balance[user] - self.model.frozen[user] + amount < 0 and not allow_negative:
            got = self.call(ledger.grant, user, amount, "prop")  # would leave available below zero: refused
            self.check(got, ledger.NegativeBalance, [], [])
            return
        self.model.balance[user] += amount
        got = self.call(ledger.grant, user, amount, "prop", allow_negative=allow_negative)
        self.check(got, True, [user], [("grant", None, amount)])

    @rule(dt=st.floats(0, 150))
    def time_passes_and_sweep(self, dt: float) -> None:
        self.wall[0] += dt
        self.model.now = self.wall[0]
        due = self.model.sweep()
        swept = self.call(ledger.sweep)
        assert [s.hold.task_id for s in swept] == [t for t, _, _ in due]
        assert all(s.outcome == "released" and s.task_state is None for s in swept)
        self.check(swept, True, [], [("release", t, h.amount) for t, h, _ in due], pushed=[p for _, _, p in due])

    @precondition(lambda self: any(h.state != "pending" for h in self.model.holds.values()))
    @rule(data=st.data())
    def repeat_a_resolution(self, data: st.DataObject) -> None:
        """Settle or release again (same or other outcome) a resolved hold: a no-op or a conflict, never a change."""
        task = data.draw(st.sampled_from(sorted(t for t, h in self.model.holds.items() if h.state != "pending")))
        outcome = data.draw(st.sampled_from(["settled", "released"]))
        self.resolve(task, outcome, None, data)

    @invariant()
    def accounts_match_the_model_and_the_journal(self) -> None:
        for u in USERS:
            acc = self.call(ledger.get_account, u)
            assert (acc.balance, acc.frozen) == self.model.account(u), u
            assert acc.available == acc.balance - acc.frozen
        assert self.call(ledger.audit) == []
        assert self.pushes() == []


def test_ledger_matches_a_model(store_kind: str, request: pytest.FixtureRequest) -> None:
    with TrioThread() as portal:
        LedgerMachine.portal = portal
        LedgerMachine.redis = request.getfixturevalue("redis_server") if store_kind == "redis" else None
        run = LedgerMachine.TestCase
        run.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow], print_blob=True)
        run().runTest()


# ---- refusals, expiry, recovery, audit ---------------------------------------------------------------------


@pytest.fixture
async def store(store_spec: str) -> Iterator[Store]:
    async with open_store(store_spec) as s:
        yield s


async def test_refusals_change_nothing(store: Store, store_kind: str) -> None:
    """Double settle, settle after release, release after settle, conflicting amounts: refused or no-op, and
    neither the accounts nor the journal move."""
    await store.freeze("u", "a", 10, 100, ttl=60)
    await store.freeze("u", "b", 20, 100, ttl=60)
    await store.resolve("a", "settled", 10)
    await store.resolve("b", "released", 20)
    before = (await store.accounts(), await store.journal())
    assert (await store.resolve("a", "settled", 10))[1] is False  # double settle: no-op success
    assert (await store.resolve("b", "released"))[1] is False  # double release: no-op success
    for call in (
        lambda: store.resolve("b", "settled", 20),  # settle after release
        lambda: store.resolve("a", "released"),  # release after settle
        lambda: store.resolve("a", "settled", 11),  # conflicting amount
        lambda: store.freeze("u", "a", 11, 100, ttl=60),  # same id, other amount
        lambda: store.freeze("v", "a", 10, 100, ttl=60),  # same id, other user
    ):
        with pytest.raises(HoldConflict):
            await call()
    with pytest.raises(UnknownHold):
        await store.resolve("nope", "settled")
    with pytest.raises(InsufficientCredits):
        await store.freeze("u", "c", 91, 100, ttl=60)
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidAmount):
            await store.freeze("u", "d", bad, 100, ttl=60)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount):
        await store.grant("u", 2.5, 100, "bad")  # type: ignore[arg-type]
    assert (await store.accounts(), await store.journal()) == before
    assert await store.audit() == []


def _task(task_id: str, user: str, cost: int, state: str) -> TaskRecord:
    return TaskRecord(task_id=task_id, seq=abs(hash(task_id)) % 10_000, user_id=user, client_id="c",
                      prompt_id=f"p-{task_id}", state=state, size=cost, cost=cost, workflow={}, created_at=0.0,
                      updated_at=0.0)


async def test_expired_hold_sweep_follows_the_task(store_spec: str, store_kind: str) -> None:
    """Past its deadline a hold is released once if its task is gone or failed, settled if it succeeded, and
    only given a new deadline while its task is still active."""
    wall = [1000.0]
    async with open_store(store_spec, wall_clock=lambda: wall[0]) as store:
        hub_tx, hub_rx = trio.open_memory_channel[Publish](100)
        tx, rx = trio.open_memory_channel[ledger.LedgerMsg](8)
        async with trio.open_nursery() as n:
            await n.start(partial(ledger.run, rx, store=store, sessions=hub_tx, initial_credits=100, hold_ttl=10,
                                  wall_clock=lambda: wall[0], expiry_interval=1e9))
            for task_id, state in (("gone", None), ("ok", "succeeded"), ("bad", "failed"), ("busy", "running")):
                await store.freeze("u", task_id, 5, 100, ttl=10)  # straight to the store: no push
                if state is not None:
                    await store.save_task(_task(task_id, "u", 5, state))
            assert await ledger.sweep(tx) == []  # nothing is due yet
            wall[0] += 11
            swept = {s.hold.task_id: s.outcome for s in await ledger.sweep(tx)}
            assert swept == {"gone": "released", "ok": "settled", "bad": "released", "busy": "extended"}
            assert await ledger.sweep(tx) == []  # once: nothing left due
            wall[0] += 11
            again = await ledger.sweep(tx)
            assert [(s.hold.task_id, s.outcome) for s in again] == [("busy", "extended")]
            await store.save_task(_task("busy", "u", 5, "cancelled"))
            wall[0] += 11
            assert [(s.hold.task_id, s.outcome) for s in await ledger.sweep(tx)] == [("busy", "released")]
            acc = await ledger.get_account(tx, "u")
            n.cancel_scope.cancel()
        assert (acc.balance, acc.frozen) == (95, 0)
        pushes = []
        while True:
            try:
                pushes.append(hub_rx.receive_nowait().body)
            except trio.WouldBlock:
                break
        # the freezes went straight to the store (no pushes); the four resolutions were pushed, extensions not
        assert len(pushes) == 4 and (pushes[-1]["balance"], pushes[-1]["frozen"]) == (95, 0)
        assert await store.audit() == [] and await store.audit_tasks() == []


async def test_start_up_recovers_holds_a_crash_left_pending(store_spec: str, store_kind: str) -> None:
    """What kill -9 can leave behind: a hold whose task was never saved (died between freeze and save), and
    holds of tasks whose outcome was saved but not yet settled or released. Active tasks' holds stay pending
    (the registry reloads those tasks)."""
    path = store_spec
    async with open_store(path) as store:
        for task_id, state in (("unsaved", None), ("won", "succeeded"), ("lost", "failed"), ("stopped", "cancelled"),
                               ("waiting", "queued"), ("inside", "submitted")):
            await store.freeze("u", task_id, 3, 100, ttl=3600)
            if state is not None:
                await store.save_task(_task(task_id, "u", 3, state))
        assert len(await store.audit_tasks()) == 4  # the four stale holds
    async with open_store(path) as store:  # "restart"
        hub_tx, hub_rx = trio.open_memory_channel[Publish](100)
        tx, rx = trio.open_memory_channel[ledger.LedgerMsg](8)
        async with trio.open_nursery() as n:
            await n.start(partial(ledger.run, rx, store=store, sessions=hub_tx, initial_credits=100, hold_ttl=3600))
            acc = await ledger.get_account(tx, "u")
            n.cancel_scope.cancel()
        assert (acc.balance, acc.frozen) == (97, 6)  # "won" settled; the two active tasks still hold 3 each
        states = {t: (await store.hold(t)).state for t in ("unsaved", "won", "lost", "stopped", "waiting", "inside")}
        assert states == {"unsaved": "released", "won": "settled", "lost": "released", "stopped": "released",
                          "waiting": "pending", "inside": "pending"}
        notes = [j.note for j in await store.journal("u") if j.kind in ("settle", "release")]
        assert all(note and note.startswith("recovered at start-up") for note in notes) and len(notes) == 4
        assert len([hub_rx.receive_nowait() for _ in range(4)]) == 4  # each pushed as a balance message
        assert await store.audit() == [] and await store.audit_tasks() == []


async def test_audit_rebuilds_balances_and_catches_tampering(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    async with open_store(path) as store:
        await store.freeze("u", "a", 10, 100, ttl=60)
        await store.resolve("a", "settled")
        await store.freeze("u", "b", 5, 100, ttl=60)
        await store.grant("u", 7, 100, "gift")
        assert await store.audit() == []
    tampered = [
        "UPDATE accounts SET balance = balance + 1",  # a credit created out of nowhere
        "DELETE FROM journal WHERE kind = 'grant'",  # a grant with no journal line
        "INSERT INTO journal(ts, user_id, kind, task_id, amount, balance_after, frozen_after)"
        " VALUES (0, 'u', 'settle', 'a', 10, 87, -5)",  # a second settle of the same hold
        "UPDATE holds SET state = 'released' WHERE task_id = 'b'",  # a hold resolved without its journal line
    ]
    for sql in tampered:
        copy = tmp_path / f"copy{tampered.index(sql)}.db"
        src = sqlite3.connect(path)
        with sqlite3.connect(copy) as dst:
            src.backup(dst)
        src.close()
        with sqlite3.connect(copy) as db:
            db.execute(sql)
        db.close()
        async with open_store(str(copy)) as store:
            assert await store.audit(), sql


async def test_schema_migrates_forward_and_refuses_a_newer_one(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN;{_MIGRATIONS[1]}PRAGMA user_version = 1;COMMIT;")  # a file written by version 1
    db.execute("INSERT INTO accounts VALUES ('u', 42, 0, 0)")
    db.execute("INSERT INTO journal(ts, user_id, kind, amount, balance_after, frozen_after)"
               " VALUES (0, 'u', 'open', 42, 42, 0)")
    db.close()
    async with open_store(str(path)) as store:
        assert (await store.account("u", 100)).balance == 42 and await store.audit() == []
        await store.freeze("u", "t", 2, 100, ttl=60)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal_task'").fetchone() is not None
    assert db.execute("SELECT crashes FROM tasks").fetchall() == []  # version 3: the quarantine counter
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        async with open_store(str(path)):
            pass


# ---- admin credits, over HTTP and the CLI ------------------------------------------------------------------


async def test_admin_credits_are_journaled_and_pushed(sim: Any, start_gateway: Any, tmp_path: Path) -> None:
    from stomp_client import stomp_connect

    g: GatewayUnderTest = await start_gateway([sim.url])
    r = await g.http.post(f"{g.url}/api/admin/credits", json={"userId": "alice", "amount": 5}, headers=g.auth("bob"))
    assert r.status_code == 403
    admin = {"Authorization": f"Bearer {g.token('root', admin=True)}"}
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": workflow("txt2img")},
                              headers=g.auth("alice"))  # opens the account (and a session for the push)
        assert r.status_code == 202
        r = await g.http.post(f"{g.url}/api/admin/credits", json={"userId": "alice", "amount": 25}, headers=admin)
        assert r.status_code == 200 and r.json()["balance"] == g.initial_credits + 25
        r = await g.http.post(f"{g.url}/api/admin/credits", json={"userId": "alice", "amount": "x"}, headers=admin)
        assert r.status_code == 400
        msgs = await c.collect_until(lambda m: m.get("type") == "balance" and m["balance"] == g.initial_credits + 25)
        assert msgs[-1][1]["available"] == msgs[-1][1]["balance"] - msgs[-1][1]["frozen"]
    await g.stop()
    async with open_store(str(tmp_path / "data" / "gateway.db")) as store:
        grants = [j for j in await store.journal("alice") if j.kind == "grant"]
        assert [(j.amount, j.note) for j in grants] == [(25, "admin root")]


async def test_cli_credits_show_add_and_audit(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("comfy-gateway"))
    data = str(tmp_path / "data")

    async def cli(*args: str) -> str:
        with trio.fail_after(30):
            done = await trio.run_process([exe, "credits", *args, "--data", data, "--initial-credits", "10"],
                                          capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    assert "carol: balance 10, frozen 0, available 10" in await cli("carol")
    assert "carol: balance 17, frozen 0, available 17" in await cli("carol", "--add", "7")
    assert "carol: balance 15" in await cli("carol", "--add", "-2")
    assert "ledger consistent" in await cli("--audit")
    async with open_store(f"{data}/gateway.db") as store:
        assert [(j.kind, j.amount, j.note) for j in await store.journal("carol")] == [
            ("open", 10, "initial credits"), ("grant", 7, "cli"), ("grant", -2, "cli")]


# ---- concurrency: many submits at once, credits for only some ------------------------------------------------


async def test_concurrent_submits_never_overdraw(sim: Any, start_gateway: Any) -> None:
    """40 submits at once over HTTP for a user whose credits cover 7 (price 3, 22 credits): exactly 7 accepted,
    33 refused with 402; when they are done the balance is 22 - 21 and nothing is frozen."""
    from stomp_client import stomp_connect

    g: GatewayUnderTest = await start_gateway([sim.url], initial_credits=22, price=3, max_queued_per_user=100,
                                              submit_burst=100)
    await wait_backends_up(g)
    sim.pause()  # keep every accepted task frozen while the burst runs
    statuses: list[int] = []

    async def one() -> None:
        r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": workflow("txt2img")},
                              headers=g.auth("alice"))
        statuses.append(r.status_code)

    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        with trio.fail_after(60):
            async with trio.open_nursery() as burst:
                for _ in range(40):
                    burst.start_soon(one)
        assert Counter(statuses) == {202: 7, 402: 33}
        assert await g.balance("alice") == {"userId": "alice", "balance": 22, "frozen": 21, "available": 1}
        sim.resume()
        done: list[str] = []
        await c.collect_until(lambda m: m.get("type") == "completed" and not done.append(m["taskId"])
                              and len(done) == 7, timeout=60)
    assert await g.balance("alice") == {"userId": "alice", "balance": 1, "frozen": 0, "available": 1}
