"""The core lease on a shared Redis store: one process is the core, the others are edges; the lease passes on
when the core stops; a deposed core (paused with SIGSTOP past its lease, then resumed) cannot change a
task or a balance, because its writes carry a stale fencing token that the store's scripts refuse."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _chaos_lib import GatewayProcess, SimHandle, make_workflow
from _redis_server import RedisServer
from conftest import GatewayUnderTest
from coredis.exceptions import RedisError
from stomp_client import stomp_connect

from actors.store import RedisStore, open_store


async def health(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await http.get(f"{url}/healthz")
    assert r.status_code == 200
    return r.json()


async def wait_role(http: httpx.AsyncClient, url: str, role: str, timeout: float = 15) -> dict[str, Any]:
    """Poll /healthz (a condition under a deadline) until this process reports ``role``."""
    with trio.fail_after(timeout):
        while (h := await health(http, url))["role"] != role:
            await trio.sleep(0.05)
    return h


async def test_one_process_on_redis_is_the_core(sim: Any, start_gateway: Any, redis_server: RedisServer) -> None:
    redis_server.flush()
    g: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    h = await health(g.http, g.url)
    assert h["role"] == "core" and h["lease"]["holder"] == h["lease"]["self"] and h["lease"]["token"] >= 1
    r = await g.http.get(f"{g.url}/readyz")
    assert r.json()["role"] == "core" and r.json()["store"] == "up"


async def test_an_edge_takes_over_when_the_core_stops(sim: Any, start_gateway: Any, redis_server: RedisServer) -> None:
    """The core releases the lease on SIGTERM-style shutdown; the edge takes it at its next attempt (fencing token
    one higher), reloads the task the core left and finishes it."""
    redis_server.flush()
    core: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url(), lease_ttl=2)
    edge: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url(), lease_ttl=2)
    c, e = await health(core.http, core.url), await health(edge.http, edge.url)
    assert c["role"] == "core" and e["role"] == "edge" and e["lease"]["holder"] == c["lease"]["self"]
    r = await edge.http.get(f"{edge.url}/readyz")
    assert r.status_code == 200 and r.json()["role"] == "edge"  # an edge is ready while some process is core
    sim.pause()  # the task is still inside ComfyUI when the core stops
    task = await edge.submit("alice", make_workflow())  # through the core
    await core.stop()  # releases the lease: the edge takes it on its next attempt
    h = await wait_role(edge.http, edge.url, "core", timeout=5)
    assert h["lease"]["token"] == c["lease"]["token"] + 1
    sim.resume()
    with trio.fail_after(15):  # the new core reloaded the task and finished it
        while (r := await edge.http.get(f"{edge.url}/api/tasks/{task['taskId']}", headers=edge.auth("alice"))).json()[
            "state"
        ] != "succeeded":
            await trio.sleep(0.05)


async def test_a_core_paused_past_its_lease_cannot_change_anything(tmp_path: Path, redis_server: RedisServer) -> None:
    """Core A is paused (SIGSTOP) with a prompt inside ComfyUI; its lease lapses and B takes over, reloads the
    task and finishes it from ComfyUI's history. A is resumed (SIGCONT) with that prompt's events waiting on its
    socket: it stops being the core, and the store shows B's outcome only: one freeze, one settle, audit clean."""
    redis_server.flush()
    url = redis_server.url()
    args = ("--lease-ttl", "1", "--initial-credits", "20", "--price", "1", "--reconnect-max-delay", "0.5")
    async with httpx.AsyncClient(timeout=15) as http, trio.open_nursery() as nursery:
        sims = SimHandle(nursery, step_ms=40, seed=1, previews=False)
        await sims.start()
        a = GatewayProcess(
            data=tmp_path / "a", comfy_urls=[sims.url], args=args, store=url, log_path=tmp_path / "a.log"
        )
        b = GatewayProcess(
            data=tmp_path / "b", comfy_urls=[sims.url], args=args, store=url, log_path=tmp_path / "b.log"
        )
        await a.start(nursery)
        assert (await health(http, a.url))["role"] == "core"
        sims.sim.pause()  # the prompt waits inside ComfyUI
        r = await http.post(
            f"{a.url}/api/tasks", headers=a.headers("alice"), json={"clientId": "c1", "workflow": make_workflow()}
        )
        assert r.status_code == 202, r.text
        task_id = r.json()["taskId"]
        async with open_store(url) as store:
            assert isinstance(store, RedisStore)
            with trio.fail_after(10):
                while (rec := await store.get_task(task_id)) is None or rec.state == "queued":
                    await trio.sleep(0.02)
            assert a.proc is not None
            a.proc.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(10):  # the lease lapses in Redis (its TTL, 1 s)
                    while await store.lease_holder() is not None:
                        await trio.sleep(0.05)
                await b.start(nursery)
                assert (await health(http, b.url))["role"] == "core"
                sims.sim.resume()  # the prompt runs; its events go to A's socket (A submitted it)
                with trio.fail_after(30):  # B follows it through /queue and /history, then settles it
                    while (
                        (rec := await store.get_task(task_id)) is None
                        or rec.state != "succeeded"
                        or (hold := await store.hold(task_id)) is None
                        or hold.state != "settled"
                    ):
                        await trio.sleep(0.05)
                before = (await store.journal(), await store.all_tasks(), await store.accounts())
            finally:
                a.proc.send_signal(signal.SIGCONT)
            h = await wait_role(http, a.url, "edge", timeout=10)
            assert h["lease"]["holder"] == (await health(http, b.url))["lease"]["self"]
            # A woke up with the prompt's events and a stale token: nothing it did reached the store
            assert (await store.journal(), await store.all_tasks(), await store.accounts()) == before
            assert [j.kind for j in before[0] if j.task_id == task_id] == ["freeze", "settle"]
            assert await store.audit() == [] and await store.audit_tasks() == []
        await a.stop()
        await b.stop()
        nursery.cancel_scope.cancel()


async def test_a_deposed_core_s_writes_are_refused_and_stop_its_core(
    sim: Any, start_gateway: Any, redis_server: RedisServer
) -> None:
    """The moment between losing the lease and noticing it: A still believes it is the core (its next renewal is
    10 s away) when another process takes the lease. A's prompt then finishes in ComfyUI and A's registry tries to
    record it: the store refuses the stale token, A's core stops at once, and neither the task nor the balance
    moved."""
    redis_server.flush()
    url = redis_server.url()
    a: GatewayUnderTest = await start_gateway([sim.url], store_path=url, lease_ttl=30)
    sim.pause()
    task_id = (await a.submit("alice", make_workflow()))["taskId"]
    async with open_store(url) as thief:
        assert isinstance(thief, RedisStore)
        with trio.fail_after(10):
            while (rec := await thief.get_task(task_id)) is None or rec.state == "queued":
                await trio.sleep(0.02)
        await thief.client.delete([thief.prefix + "lease"])  # A's lease lapsed (A was paused) ...
        assert await thief.acquire_lease("thief", ttl=30) == (await health(a.http, a.url))["lease"]["token"] + 1
        before = (await thief.journal(), await thief.all_tasks(), await thief.accounts())
        assert before[1][0].state == "submitted"
        sim.resume()  # ... and now A hears its prompt finish
        with trio.fail_after(5):  # well before A's next renewal: the refused write stopped A's core
            h = await wait_role(a.http, a.url, "edge")
        assert h["lease"]["holder"] is None or h["lease"]["holder"] == "thief"
        assert (await thief.journal(), await thief.all_tasks(), await thief.accounts()) == before
        assert [j.kind for j in before[0] if j.task_id == task_id] == ["freeze"]


async def test_a_core_that_gives_up_its_lease_makes_the_next_term_resync_the_sessions(
    sim: Any, start_gateway: Any, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A core whose renewals fail for a whole TTL (Redis slow, the process starved of CPU) stops its actors
    wherever they are, e.g. between saving a task's outcome and publishing its ``completed``: that message is gone
    and Redis numbers seqs on without a gap. So its term did not end cleanly: whichever process is the core next
    (here the same one, once renewals work again) tells every session to ``resync``, as after a crash, and the
    client reloads over HTTP (a chaos run at nice 19 on a busy machine lost a ``completed`` this way)."""
    redis_server.flush()
    g: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url(), lease_ttl=1)
    first = await health(g.http, g.url)
    assert first["role"] == "core"
    failing = [True]
    renew = RedisStore.renew_lease

    async def flaky_renew(self: RedisStore, holder: str, token: int, ttl: float) -> bool:
        if failing[0]:
            raise RedisError("renewal refused by the test")
        return await renew(self, holder, token, ttl)

    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as client:
        await client.subscribe(receipt="sub")
        while (await client.next_frame()).command != "RECEIPT":  # attached once the receipt comes
            pass
        monkeypatch.setattr(RedisStore, "renew_lease", flaky_renew)
        with trio.fail_after(15):  # gave up the core after a TTL without renewal, and took the lease again
            while (h := await health(g.http, g.url))["lease"]["token"] <= first["lease"]["token"]:
                await trio.sleep(0.05)
        failing[0] = False
        got = await client.collect_until(lambda m: m.get("type") == "resync", timeout=15)
    assert got[-1][1] == {"type": "resync"}
    assert h["role"] == "core"
