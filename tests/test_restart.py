"""kill -9 of the gateway in the middle of running tasks, then a restart on the same --data.

The gateway runs as a real ``comfy-gateway serve`` subprocess (fixed port and GATEWAY_SECRET, so clients reconnect
with the same tokens); the ComfyUI simulator runs in the test. After the restart every task must end (completed
from /history, or backend_lost when ComfyUI forgot it), no credit may be created or lost, nothing may stay
frozen, and each client must learn every outcome (its terminal message, or a resync and the state over HTTP).
The auditor is the chaos run's (scripts/_chaos_audit.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from _chaos_audit import Report, settle_and_audit
from _chaos_lib import GatewayProcess, ResumingClient, SimHandle, make_workflow
from conftest import both_stores

INITIAL = 20
GATEWAY_ARGS = ("--initial-credits", str(INITIAL), "--price", "1", "--max-inflight", "2",
                "--max-queued-per-user", "100", "--reconnect-max-delay", "0.5", "--reconnect-max-restarts", "1000",
)


async def submit(http: httpx.AsyncClient, gw: GatewayProcess, user: str, kind: str = "ok", size: int = 1) -> str:
    r = await http.post(f"{gw.url}/api/tasks", headers=gw.headers(user),
                        json={"clientId": f"c-{user}", "workflow": make_workflow(kind), "size": size})
    assert r.status_code == 202, r.text
    return r.json()["taskId"]


async def wait_until_ran(sims: SimHandle, n: int, timeout: float = 30) -> None:
    """The simulator (in this process) finished ``n`` prompts: a condition polled under a deadline."""
    with trio.fail_after(timeout):
        while len(sims.sim.runs) < n:
            await trio.sleep(0.01)


async def start_world(nursery: trio.Nursery, tmp_path: Path, store_spec: str, http: httpx.AsyncClient,
                      users: tuple[str, ...]) -> tuple[SimHandle, GatewayProcess, dict[str, ResumingClient]]:
    sims = SimHandle(nursery, step_ms=40, seed=1, previews=False)
    await sims.start()
    gw = GatewayProcess(data=tmp_path / "data", comfy_urls=[sims.url], args=GATEWAY_ARGS,
                        log_path=tmp_path / "gateway.log", store=store_spec)
    await gw.start(nursery)
    clients = {u: ResumingClient(u, f"c-{u}", gw, http, pause=lambda: 0.02) for u in users}
    for c in clients.values():
        nursery.start_soon(c.run)
    for c in clients.values():
        await c.wait_live()
    return sims, gw, clients


def check(report: Report, gw: GatewayProcess) -> None:
    assert report.ok, "\n".join(report.problems + [f"gateway log: {gw.log_path}"])


@both_stores
async def test_kill_9_mid_run_then_restart_completes_from_history(tmp_path: Path, store_spec: str) -> None:
    """ComfyUI keeps running while the gateway is dead: what finished meanwhile is completed from /history, what
    is still waiting inside ComfyUI (submitted under the dead process's clientId, so its events go nowhere) is
    found by reconciliation and followed until it ends, and tasks still queued in the gateway are dispatched."""
    async with httpx.AsyncClient(timeout=15) as http, trio.open_nursery() as nursery:
        sims, gw, clients = await start_world(nursery, tmp_path, store_spec, http, ("alice", "bob"))
        ids = [await submit(http, gw, "alice") for _ in range(4)]
        ids += [await submit(http, gw, "bob"), await submit(http, gw, "bob", "fail", size=2)]
        first = await clients["alice"].wait_for(lambda m: m.get("type") == "progress")  # running; one more waits
        sims.sim.pause()  # the running prompt goes on; the waiting one stays inside ComfyUI
        await gw.kill()
        await wait_until_ran(sims, 1)  # the running prompt ends while nobody listens
        await gw.start(nursery)
        await gw.wait_output("reconciling")  # it asks ComfyUI about both (while the second is still pending) ...
        await clients["alice"].wait_for(lambda m: m.get("taskId") == first["taskId"] and m["type"] == "completed")
        sims.sim.resume()  # ... and only then does the second run, its events going to the dead clientId
        report = await settle_and_audit(gateway=gw, sims=sims, clients=clients, http=http,
                                        initial_credits=INITIAL, grants=[], settle_timeout=60)
        for c in clients.values():
            c.stopping = True
            c.drop()
        nursery.cancel_scope.cancel()
    check(report, gw)
    by_state = report.stats["by_state"]
    assert report.stats["tasks"] == len(ids) == 6
    assert by_state.get("succeeded", 0) >= 4 and by_state.get("failed:execution_error") == 1, by_state
    assert gw.kills == 1 and gw.starts == 2


@both_stores
async def test_kill_9_with_comfyui_restarted_empty_loses_only_what_was_inside(tmp_path: Path, store_spec: str) -> None:
    """The gateway and ComfyUI both die; ComfyUI comes back with nothing: the prompts that were inside it end as
    backend_lost (refunded), the tasks still queued in the gateway run on the new ComfyUI."""
    async with httpx.AsyncClient(timeout=15) as http, trio.open_nursery() as nursery:
        sims, gw, clients = await start_world(nursery, tmp_path, store_spec, http, ("alice", "bob"))
        ids = [await submit(http, gw, u) for u in ("alice", "bob", "alice", "bob", "alice", "bob")]
        await clients["bob"].wait_for(lambda m: m.get("type") == "progress")
        await gw.kill()
        await sims.kill()
        await sims.start(forget=True)
        await gw.start(nursery)
        report = await settle_and_audit(gateway=gw, sims=sims, clients=clients, http=http,
                                        initial_credits=INITIAL, grants=[], settle_timeout=60)
        for c in clients.values():
            c.stopping = True
            c.drop()
        nursery.cancel_scope.cancel()
    check(report, gw)
    by_state: dict[str, Any] = report.stats["by_state"]
    assert report.stats["tasks"] == len(ids)
    assert by_state.get("failed:backend_lost", 0) >= 1, by_state  # the one that was running, at least
    assert by_state.get("succeeded", 0) >= 1, by_state
    assert set(by_state) <= {"succeeded", "failed:backend_lost"}, by_state
