"""What only the Redis store has: its URL (password, TLS scheme, key prefix), fencing tokens that refuse a deposed
writer, the audit over Redis data, and the CLI on ``--store redis://``. The behaviour it shares with SQLite is
shown by the ledger, restart, end-to-end and lifecycle tests, which run on both stores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from _redis_server import RedisServer

from actors.store import (
    HoldConflict,
    LeaseLost,
    RedisStore,
    StoreUnavailable,
    TaskRecord,
    open_store,
    parse_store_spec,
)
from actors.store._redis import split_redis_url


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    redis_server.flush()
    return redis_server


def _task(task_id: str, state: str, cost: int = 5) -> TaskRecord:
    return TaskRecord(task_id=task_id, seq=1, user_id="u", client_id="c", prompt_id=f"p-{task_id}", state=state,
                      size=1, cost=cost, workflow={"1": {"class_type": "X", "inputs": {}}}, created_at=1.0,
                      updated_at=2.0)


def test_urls_keep_password_and_prefix_out_of_sight() -> None:
    url, prefix, shown = split_redis_url("redis://gw:s3cret@127.0.0.1:7000/3?prefix=blue:")
    assert (url, prefix, shown) == ("redis://gw:s3cret@127.0.0.1:7000/3", "blue:",
                                   "redis://***@127.0.0.1:7000/3?prefix=blue:")
    assert split_redis_url("rediss://h:6380/0")[1] == "cg:"
    assert parse_store_spec("rediss://h:6380/0", "data") == "rediss://h:6380/0"
    with pytest.raises(ValueError, match="sqlite:PATH or redis://"):
        parse_store_spec("postgres://x", "data")


async def test_a_password_in_the_url_is_used(redis: RedisServer) -> None:
    assert redis.command(b"ACL", b"SETUSER", b"gw", b"on", b">s3cret", b"~*", b"+@all") == b"+OK"
    try:
        async with open_store(redis.url().replace("redis://", "redis://gw:s3cret@")) as store:
            assert store.path.startswith("redis://***@")
            assert (await store.account("u", 7)).balance == 7
        with pytest.raises(StoreUnavailable, match="invalid username-password"):
            async with open_store(redis.url().replace("redis://", "redis://gw:wrong@")):
                pass
    finally:
        redis.command(b"ACL", b"DELUSER", b"gw")


async def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    from _redis_server import free_port

    with pytest.raises(StoreUnavailable, match=r"redis://127.0.0.1:\d+/0: .*(?i:connect)"):
        async with open_store(f"redis://127.0.0.1:{free_port()}/0"):
            pass


async def test_prefixes_keep_two_gateways_apart_on_one_db(redis: RedisServer) -> None:
    async with open_store(redis.url() + "?prefix=a:") as a, open_store(redis.url() + "?prefix=b:") as b:
        await a.grant("u", 5, 10)
        assert (await b.account("u", 10)).balance == 10
        assert [x.balance for x in await a.accounts()] == [15]


async def test_a_stale_fencing_token_changes_nothing(redis: RedisServer) -> None:
    """The core's writes carry its fencing token; once another process took the lease, every write of the old
    core is refused (LeaseLost) and neither balances, holds, tasks nor the journal move."""
    async with open_store(redis.url()) as old, open_store(redis.url()) as new:
        assert isinstance(old, RedisStore) and isinstance(new, RedisStore)
        token = await old.acquire_lease("old", ttl=30)
        assert token >= 1 and await new.acquire_lease("new", ttl=30) == 0  # held: nobody else gets it
        old.fence = str(token)
        await old.freeze("u", "t1", 5, 100, ttl=60)
        await old.freeze("u", "t2", 5, 100, ttl=60)
        await old.save_task(_task("t1", "running"))
        await old.release_lease("old")  # (or it lapses while the old core is paused)
        new.fence = str(await new.acquire_lease("new", ttl=30))
        assert int(new.fence) == token + 1
        assert not await old.renew_lease("old", token, 30)
        before = (await new.accounts(), await new.journal(), await new.all_tasks(), await new.hold("t1"))
        for write in (
            lambda: old.freeze("u", "t3", 1, 100, ttl=60),
            lambda: old.resolve("t1", "settled"),
            lambda: old.resolve("t2", "released"),
            lambda: old.grant("u", 50, 100, "stale"),
            lambda: old.save_task(_task("t1", "succeeded")),
            lambda: old.sweep_holds(None, 60),
        ):
            with pytest.raises(LeaseLost, match="stale"):
                await write()
        assert (await new.accounts(), await new.journal(), await new.all_tasks(), await new.hold("t1")) == before
        await new.save_task(_task("t1", "succeeded"))  # the new core's writes go through
        assert (await new.resolve("t1", "settled"))[0].balance == 95
        with pytest.raises(HoldConflict):
            await new.resolve("t1", "released")
        assert await new.audit() == []


async def test_the_lease_lapses_unless_renewed(redis: RedisServer) -> None:
    async with open_store(redis.url()) as a, open_store(redis.url()) as b:
        assert isinstance(a, RedisStore) and isinstance(b, RedisStore)
        token = await a.acquire_lease("a", ttl=1.0)
        assert await a.renew_lease("a", token, 1.0) and await a.lease_holder() == "a"
        assert await b.acquire_lease("b", ttl=1.0) == 0
        with trio.fail_after(5):  # Redis's own clock expires the key: a condition polled under a deadline
            while await a.lease_holder() is not None:
                await trio.sleep(0.02)
        assert await b.acquire_lease("b", ttl=5) == token + 1
        assert not await a.renew_lease("a", token, 1.0)


async def test_audit_catches_tampering_in_redis(redis: RedisServer) -> None:
    async with open_store(redis.url()) as store:
        await store.freeze("u", "a", 10, 100, ttl=60)
        await store.resolve("a", "settled")
        await store.freeze("u", "b", 5, 100, ttl=60)
        await store.grant("u", 7, 100, "gift")
        assert await store.audit() == []
        assert isinstance(store, RedisStore)
        client = store.client
        await client.hincrby("cg:acct:u", "balance", 1)  # a credit out of nowhere
        assert any("stored" in p for p in await store.audit())
        await client.hincrby("cg:acct:u", "balance", -1)
        assert await store.audit() == []
        await client.hset("cg:hold:b", {"state": "released"})  # resolved without its journal line
        assert any("hold b" in p for p in await store.audit())


async def test_cli_credits_and_audit_on_redis(redis: RedisServer, tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("comfy-gateway"))

    async def cli(*args: str) -> str:
        with trio.fail_after(30):
            done = await trio.run_process([exe, "credits", *args, "--store", redis.url(), "--data", str(tmp_path),
                                           "--initial-credits", "10"], capture_stdout=True, capture_stderr=True,
                                          check=False)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    assert "carol: balance 17, frozen 0, available 17" in await cli("carol", "--add", "7")
    assert "ledger consistent: 1 accounts, balance 17, frozen 0" in await cli("--audit")
    async with open_store(redis.url()) as store:
        assert [(j.kind, j.amount, j.note) for j in await store.journal("carol")] == [
            ("open", 10, "initial credits"), ("grant", 7, "cli")]
        assert isinstance(store, RedisStore)
        await store.client.hincrby("cg:acct:carol", "balance", 3)
    with trio.fail_after(30):
        done = await trio.run_process([exe, "credits", "--audit", "--store", redis.url(), "--data", str(tmp_path)],
                                      capture_stdout=True, check=False)
    assert done.returncode == 1 and b"INCONSISTENT" in done.stdout
