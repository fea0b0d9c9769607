"""Crash isolation (issue 10): a fault in the comfy actor, the registry or the ledger while it handles one task fails
that task (reason ``internal``, refunded) and the others finish; a task that crashed the process twice is
quarantined on the next start and the process serves."""

from __future__ import annotations

import copy
import sqlite3
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import FAST_RECONNECT, TEST_SECRET, GatewayUnderTest, workflow
from stomp_client import stomp_connect
from test_e2e_skeleton import TERMINAL, subscribed

from actors import registry
from actors.store import SqliteStore
from actors.comfy import _commands
from actors.gateway import GatewayConfig
from web.config import WebConfig
from web.server import Running, serve_gateway

POISON_SEED = 666


def seeded(seed: int) -> dict[str, Any]:
    wf = copy.deepcopy(workflow("txt2img"))
    wf["3"]["inputs"]["seed"] = seed
    return wf


def is_poison(wf: Any) -> bool:
    return wf.get("3", {}).get("inputs", {}).get("seed") == POISON_SEED


def inject(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A fault for the poison task only, in one actor."""
    if where == "comfy":
        original = _commands.Commands._submit

        async def submit(self: Any, cmd: Any) -> Any:
            if is_poison(cmd.workflow):
                raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
            return await original(self, cmd)

        monkeypatch.setattr(_commands.Commands, "_submit", submit)
    elif where == "registry":
        original_run = registry._Registry.mark_running

        async def mark_running(self: Any, task: Any, backend: str) -> None:
            if is_poison(task.rec.workflow):
                raise KeyError("injected registry fault")
            await original_run(self, task, backend)

        monkeypatch.setattr(registry._Registry, "mark_running", mark_running)
    else:
        original_resolve = SqliteStore.resolve

        async def resolve(self: Any, task_id: str, outcome: str, amount: Any = None, note: Any = None) -> Any:
            rec = await self.get_task(task_id)
            if outcome == "settled" and rec is not None and is_poison(rec.workflow):
                raise sqlite3.OperationalError("injected: disk I/O error")
            return await original_resolve(self, task_id, outcome, amount, note)

        monkeypatch.setattr(SqliteStore, "resolve", resolve)


@pytest.mark.parametrize("where", ["comfy", "registry", "ledger"])
async def test_a_fault_for_one_task_fails_only_that_task(
    where: str,
    sim: Any,
    start_gateway: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inject(monkeypatch, where)
    g: GatewayUnderTest = await start_gateway([sim.url])
    async with stomp_connect(g.ws_url, token=g.token("alice"), client_id="c1") as c:
        await subscribed(c)
        ids = [(await g.submit("alice", seeded(seed)))["taskId"] for seed in (1, POISON_SEED, 2)]
        ends: dict[str, dict[str, Any]] = {}
        await c.collect_until(
            lambda m: m.get("type") in TERMINAL and bool(ends.setdefault(m["taskId"], m)) and len(ends) == 3, timeout=30
        )
        await c.leave()
    good1, bad, good2 = (ends[i] for i in ids)
    assert good1["type"] == good2["type"] == "completed", (good1, good2)
    assert bad["type"] == "execution_error" and bad["reason"] == "internal" and bad["refunded"] is True, bad
    account = await g.balance("alice")
    assert account["balance"] == g.initial_credits - 2 * g.price and account["frozen"] == 0, account
    r = await g.http.get(f"{g.url}/api/tasks/{ids[1]}", headers=g.auth("alice"))
    assert r.json()["state"] == "failed" and r.json()["reason"] == "internal"
    assert any(ids[1] in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")  # logged with its id


async def test_a_task_that_crashed_the_process_twice_is_quarantined(
    sim: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poison task's submit raises SystemExit (a fault no isolation catches: the process dies). Two starts die
    on it; the third fails it (internal, refunded) before dispatching anything, and serves."""
    original = _commands.Commands._submit
    crashes = 0

    async def submit(self: Any, cmd: Any) -> Any:
        if is_poison(cmd.workflow):
            raise SystemExit("poison")
        return await original(self, cmd)

    monkeypatch.setattr(_commands.Commands, "_submit", submit)
    gw = GatewayConfig(
        comfyui_urls=(sim.url,),
        store_path=str(tmp_path / "gateway.db"),
        initial_credits=10,
        price=3,
        comfy_policy=FAST_RECONNECT,
        quarantine_after=2,
    )
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        for run in range(3):
            shutdown = trio.Event()
            crashed = False
            try:
                async with trio.open_nursery() as nursery:
                    running: Running = await nursery.start(
                        partial(serve_gateway, gw, WebConfig(bind="127.0.0.1:0"), secret=TEST_SECRET, shutdown=shutdown)
                    )
                    headers = {"Authorization": f"Bearer {running.auth.issue('alice')}"}
                    if run == 0:
                        r = await http.post(
                            f"{running.url}/api/tasks",
                            headers=headers,
                            json={"clientId": "c1", "workflow": seeded(POISON_SEED)},
                        )
                        assert r.status_code == 202, r.text
                        poison_id = r.json()["taskId"]
                    if run < 2:
                        with trio.fail_after(20):
                            await trio.sleep_forever()  # the poison task takes the process down
                    async with stomp_connect(
                        running.url.replace("http", "ws") + "/ws", token=running.auth.issue("alice"), client_id="c1"
                    ) as c:
                        await subscribed(c, **{"last-seq": "0"})
                        r = await http.post(
                            f"{running.url}/api/tasks", headers=headers, json={"clientId": "c1", "workflow": seeded(5)}
                        )
                        assert r.status_code == 202, r.text
                        await c.collect_until(lambda m: m.get("type") == "completed", timeout=30)
                        await c.leave()
                    view = (await http.get(f"{running.url}/api/tasks/{poison_id}", headers=headers)).json()
                    assert view["state"] == "failed" and view["reason"] == "internal", view
                    account = (await http.get(f"{running.url}/api/balance", headers=headers)).json()
                    assert account == {"userId": "alice", "balance": 7, "frozen": 0, "available": 7}, account
                    shutdown.set()
            except BaseExceptionGroup as group:
                match, rest = group.split(SystemExit)
                if rest is not None or match is None:
                    raise
                crashed = True
                crashes += 1
            assert crashed == (run < 2), run
    assert crashes == 2


async def test_a_store_error_on_one_request_is_that_requests_5xx(
    sim: Any,
    start_gateway: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    original_get, original_account = SqliteStore.get_task, SqliteStore.account

    async def get_task(self: Any, task_id: str) -> Any:
        if task_id == "broken":
            raise sqlite3.DatabaseError("injected: database disk image is malformed")
        return await original_get(self, task_id)

    async def account(self: Any, user_id: str, initial: int) -> Any:
        if user_id == "broken-user":
            raise OverflowError("injected: Python int too large to convert to SQLite INTEGER")
        return await original_account(self, user_id, initial)

    monkeypatch.setattr(SqliteStore, "get_task", get_task)
    monkeypatch.setattr(SqliteStore, "account", account)
    r = await g.http.get(f"{g.url}/api/tasks/broken", headers=g.auth("alice"))
    assert r.status_code == 503 and r.json()["error"] in ("unavailable", "busy"), r.text
    r = await g.http.get(f"{g.url}/api/balance", headers=g.auth("broken-user"))
    assert r.status_code == 500 and r.json()["error"] == "internal", r.text
    done = await g.submit("alice", seeded(3))  # the registry and the ledger went on
    r = await g.http.get(f"{g.url}/api/tasks/{done['taskId']}", headers=g.auth("alice"))
    assert r.status_code == 200 and (await g.balance("alice"))["frozen"] in (0, g.price)
