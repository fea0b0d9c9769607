"""Several gateway processes on one Redis acting as one gateway: edges hand requests to the core through Redis, every
process delivers every session's messages, a client resumes with ``last-seq`` on any process, and the core's
death (SIGKILL) costs clients connected elsewhere nothing but a pause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from _chaos_lib import GatewayProcess, SimHandle, make_workflow
from _redis_server import RedisServer
from conftest import GatewayUnderTest, wait_backends_up
from stomp_client import stomp_connect
from test_core_lease import health
from test_stompjs import NODE_DIR, node_or_fail

from actors.store import open_store

WATCH_SCRIPT = NODE_DIR / "stompjs_watch.mjs"


async def test_an_edge_serves_the_whole_flow_through_the_core(
    sim: Any, start_gateway: Any, redis_server: RedisServer
) -> None:
    """A client on the edge submits there (HTTP), and gets queued ... completed and its balance pushes; the task,
    its results and the balance read on the edge are the core's."""
    redis_server.flush()
    core: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    edge: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    assert [(await health(g.http, g.url))["role"] for g in (core, edge)] == ["core", "edge"]
    await wait_backends_up(edge)  # the core's status broadcast reaches the edge's subscribers
    async with stomp_connect(edge.ws_url, token=edge.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        task = await edge.submit("alice", make_workflow())
        msgs = await c.collect_until(lambda m: m.get("type") == "completed" and m["taskId"] == task["taskId"])
    types = [m["type"] for _, m in msgs if m.get("taskId") == task["taskId"]]
    assert types[0] == "queued" and "started" in types and types[-1] == "completed", types
    seqs = [int(h["seq"]) for h, _ in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # numbered once, in Redis, without gaps
    balances = [m for _, m in msgs if m.get("type") == "balance"]
    assert balances[-1]["frozen"] == 0 and balances[-1]["balance"] == edge.initial_credits - edge.price
    r = await edge.http.get(f"{edge.url}/api/tasks/{task['taskId']}", headers=edge.auth("alice"))
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    r = await edge.http.get(f"{edge.url}/api/results", headers=edge.auth("alice"))
    assert [x["taskId"] for x in r.json()["results"]] == [task["taskId"]]
    assert (await edge.balance("alice"))["balance"] == edge.initial_credits - edge.price
    r = await edge.http.get(f"{edge.url}/api/tasks/nope", headers=edge.auth("alice"))
    assert r.status_code == 404


async def test_a_client_resumes_on_another_process_with_last_seq(
    sim: Any, start_gateway: Any, redis_server: RedisServer
) -> None:
    """Drop the connection to process A mid-task, reconnect to process B with the last seq seen: every message
    comes exactly once, in order, the ones sent meanwhile by replay from the session's stream in Redis."""
    redis_server.flush()
    a: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    b: GatewayUnderTest = await start_gateway([sim.url], store_path=redis_server.url())
    seen: list[tuple[int, dict[str, Any]]] = []
    async with stomp_connect(a.ws_url, token=a.token("alice"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert (await c.next_frame()).command == "RECEIPT"
        sim.pause()  # the task waits inside ComfyUI while the client moves
        task = await a.submit("alice", make_workflow(steps=6))
        for h, m in await c.collect_until(lambda m: m.get("type") == "queued"):
            seen.append((int(h["seq"]), m))
    sim.resume()  # messages now go out while the client is connected nowhere
    async with open_store(redis_server.url()) as store:
        with trio.fail_after(15):
            while (rec := await store.get_task(task["taskId"])) is None or rec.state != "succeeded":
                await trio.sleep(0.02)
    async with stomp_connect(b.ws_url, token=b.token("alice"), client_id="c1") as c:
        await c.send_frame(
            "SUBSCRIBE",
            {"id": "s", "destination": "/user/topic/messages", "receipt": "r", "last-seq": str(seen[-1][0])},
        )
        assert (await c.next_frame()).command == "RECEIPT"
        for h, m in await c.collect_until(lambda m: m.get("type") == "completed"):
            seen.append((int(h["seq"]), m))
    seqs = [s for s, _ in seen]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # no gap, no duplicate, across processes
    types = [m["type"] for _, m in seen if m.get("taskId") == task["taskId"]]
    assert "resync" not in types and types[0] == "queued" and types[-1] == "completed", types
    assert [m["value"] for _, m in seen if m.get("type") == "progress"] == list(range(1, 7))


async def test_three_processes_survive_a_sigkill_of_the_core(tmp_path: Path, redis_server: RedisServer) -> None:
    """Done when (issue 12): a @stomp/stompjs client on process B, its task submitted over HTTP to process C, the
    core A killed with SIGKILL mid-task: B's client sees the task end without reconnecting, and the ledger audit
    is clean."""
    node = node_or_fail()
    redis_server.flush()
    url = redis_server.url()
    args = ("--lease-ttl", "2", "--initial-credits", "20", "--price", "2", "--reconnect-max-delay", "0.5")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(make_workflow(steps=30)))
    async with httpx.AsyncClient(timeout=15) as http, trio.open_nursery() as nursery:
        sims = SimHandle(nursery, step_ms=50, seed=1, previews=False)
        await sims.start()
        procs = {
            name: GatewayProcess(
                data=tmp_path / name, comfy_urls=[sims.url], args=args, store=url, log_path=tmp_path / f"{name}.log"
            )
            for name in "abc"
        }
        for p in procs.values():
            await p.start(nursery)
        a, b, c = procs["a"], procs["b"], procs["c"]
        assert [(await health(http, p.url))["role"] for p in (a, b, c)] == ["core", "edge", "edge"]
        proc = await trio.lowlevel.open_process(
            [
                node,
                str(WATCH_SCRIPT),
                "--ws",
                b.ws_url,
                "--http",
                c.url,
                "--token",
                b.issue("alice"),
                "--client-id",
                "web-1",
                "--workflow",
                str(wf),
            ],
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            env=dict(os.environ),
        )
        lines: list[dict[str, Any]] = []
        buf = b""
        killed_at_seq = None
        assert proc.stdout is not None
        with trio.fail_after(90):
            while True:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                *done, buf = buf.split(b"\n")
                for raw in done:
                    line = json.loads(raw)
                    lines.append(line)
                    if line.get("type") == "progress" and killed_at_seq is None:
                        await a.kill()  # SIGKILL the core mid-task
                        killed_at_seq = line["seq"]
            await proc.wait()
        summary = lines[-1]
        assert proc.returncode == 0 and summary.get("done"), lines[-5:]
        assert killed_at_seq is not None
        assert summary["connects"] == 1 and summary["errors"] == []  # never reconnected
        end = summary["end"]
        assert end["taskId"] == summary["taskId"]
        assert end["type"] == "completed" or (
            end["type"] == "execution_error" and end["reason"] == "backend_lost" and end["refunded"]
        ), end
        assert any(m.get("seq", 0) > killed_at_seq for m in lines[:-1])  # messages came after the core died
        roles = [(await health(http, p.url))["role"] for p in (b, c)]
        assert sorted(roles) == ["core", "edge"], roles  # one of the survivors took over
        for p in (b, c):
            await p.stop()
        exe = str(Path(sys.executable).with_name("comfy-gateway"))
        done_audit = await trio.run_process(
            [exe, "credits", "--audit", "--store", url], capture_stdout=True, check=False
        )
        assert done_audit.returncode == 0 and b"ledger consistent" in done_audit.stdout, done_audit.stdout
        nursery.cancel_scope.cancel()


async def test_a_submit_repeated_by_the_next_core_is_one_task(
    sim: Any, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    """An edge's submit carries its request id as task id, so a core that reads it again (its predecessor died
    before acknowledging) answers with the same task and freezes once; if the predecessor died between the freeze
    and saving the task, the new core's start-up sweep has released that hold, and the submit starts afresh under
    a new id (reusing the released hold would have run the task for free)."""
    from actors import registry
    from actors._util import ask
    from actors.gateway import GatewayConfig, run_gateway

    redis_server.flush()
    url = redis_server.url()
    handles = await nursery.start(run_gateway, GatewayConfig(comfyui_urls=(sim.url,), store_path=url, price=2))
    wf = make_workflow()

    async def submit(rid: str) -> Any:
        return await ask(handles.registry, lambda r: registry.Submit("alice", "c1", wf, 1, r, task_id=rid))

    first = await submit("rid-1")
    assert isinstance(first, registry.Accepted) and first.task_id == "rid-1"
    again = await submit("rid-1")
    assert isinstance(again, registry.Accepted) and again.task_id == "rid-1"
    async with open_store(url) as store:
        await store.freeze("alice", "rid-2", 2, 100, ttl=60)  # a dead core froze ...
        await store.resolve("rid-2", "released", note="recovered at start-up; task never saved")  # ... swept
        fresh = await submit("rid-2")
        assert isinstance(fresh, registry.Accepted) and fresh.task_id != "rid-2"
        with trio.fail_after(15):
            while {t.state for t in await store.all_tasks()} != {"succeeded"}:
                await trio.sleep(0.02)
        freezes = [j.task_id for j in await store.journal() if j.kind == "freeze"]
        assert sorted(freezes) == sorted(["rid-1", "rid-2", fresh.task_id])  # rid-1 once, rid-2 never again
        assert await store.audit() == [] and await store.audit_tasks() == []
        assert (await store.account("alice", 100)).balance == 100 - 2 - 2


async def test_a_grant_repeated_by_the_next_core_is_applied_once(
    sim: Any, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    """An edge's admin grant carries its request id as grant id, so a core that reads it again (its predecessor
    granted, then died before acknowledging: a chaos run found the grant twice in the journal) answers with the
    account and does not add the credits again; a grant with another id is applied as usual."""
    from actors import ledger
    from actors._util import ask
    from actors.gateway import GatewayConfig, run_gateway

    redis_server.flush()
    url = redis_server.url()
    handles = await nursery.start(
        run_gateway, GatewayConfig(comfyui_urls=(sim.url,), store_path=url, initial_credits=10)
    )

    async def grant(rid: str, amount: int) -> Any:
        return await ask(
            handles.ledger, lambda r: ledger.Grant("alice", amount, "admin root", r, grant_id=rid), name="ledger"
        )

    first = await grant("rid-1", 5)
    again = await grant("rid-1", 5)
    other = await grant("rid-2", 7)
    assert (first.balance, again.balance, other.balance) == (15, 15, 22)
    async with open_store(url) as store:
        assert [j.amount for j in await store.journal("alice") if j.kind == "grant"] == [5, 7]
        assert await store.audit() == []
