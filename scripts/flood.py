#!/usr/bin/env python3
"""One user floods the gateway with sessions; another user's ``queued`` latency and the gateway's memory are measured.

    .venv/bin/python scripts/flood.py --sessions 2000 --cycles 50

The issue-10 scenario at full size (``tests/test_limits.py`` runs a smaller one in CI): a real ``comfy-gateway
serve`` process and the simulator; user ``mallory`` connects, subscribes and leaves with ``--sessions`` different
clientIds, with ``--cycles`` submit-and-cancel cycles spread over them (every cycle changes the balance, which is
pushed to the user's sessions); meanwhile and afterwards user ``alice`` submits and times POST -> ``queued`` over
her own STOMP connection. Prints the latencies and the gateway's RSS before and after; exits 1 if alice's p95 is
over ``--latency-bound`` or RSS grew by more than ``--memory-bound`` MB. Bounded by its counts (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import httpx  # noqa: E402
import trio  # noqa: E402
from _chaos_client import _frame, _parse  # noqa: E402
from _chaos_hostile import percentile  # noqa: E402
from _chaos_lib import GatewayProcess, SimHandle, make_workflow  # noqa: E402
from trio_websocket import open_websocket_url  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def frames(ws: object, buf: list[bytes]):
    while True:
        frame, buf[0] = _parse(buf[0])
        if frame is not None:
            yield frame
            continue
        data = await ws.get_message()  # type: ignore[attr-defined]
        buf[0] += data.encode() if isinstance(data, str) else data


async def session(gw: GatewayProcess, user: str, client_id: str) -> None:
    async with open_websocket_url(gw.ws_url, subprotocols=["v12.stomp"]) as ws:
        await ws.send_message(
            _frame(
                "CONNECT",
                {
                    "accept-version": "1.2",
                    "heart-beat": "0,0",
                    "clientId": client_id,
                    "Authorization": f"Bearer {gw.issue(user)}",
                },
            )
        )
        await ws.send_message(_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages"}))
        await ws.send_message(_frame("DISCONNECT", {"receipt": "bye"}))
        async for frame in frames(ws, [b""]):
            if frame.command == "ERROR" or frame.headers.get("receipt-id") == "bye":
                return


async def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="flood-"))
    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        sims = SimHandle(nursery, step_ms=2, seed=1, previews=False)
        await sims.start()
        gw = GatewayProcess(
            data=workdir / "data",
            comfy_urls=[sims.url],
            log_path=workdir / "gateway.log",
            args=(
                "--initial-credits",
                "100000",
                "--submit-rate",
                "1000",
                "--submit-burst",
                "1000",
                "--max-queued-per-user",
                "1000",
            ),
        )
        await gw.start(nursery)
        assert gw.proc is not None
        rss_before = rss_mb(gw.proc.pid)
        latencies: list[float] = []
        stop = trio.Event()

        async def alice() -> None:
            async with open_websocket_url(gw.ws_url, subprotocols=["v12.stomp"]) as ws:
                await ws.send_message(
                    _frame(
                        "CONNECT",
                        {
                            "accept-version": "1.2",
                            "heart-beat": "0,0",
                            "clientId": "a",
                            "Authorization": f"Bearer {gw.issue('alice')}",
                        },
                    )
                )
                await ws.send_message(
                    _frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
                )
                queued: dict[str, float] = {}
                news = [trio.Event()]

                async def reader() -> None:
                    async for frame in frames(ws, [b""]):
                        if frame.command == "MESSAGE":
                            body = json.loads(frame.body)
                            if body.get("type") == "queued":
                                queued[body["taskId"]] = time.monotonic()
                                news[0].set()
                                news[0] = trio.Event()

                async with trio.open_nursery() as inner:
                    inner.start_soon(reader)
                    n = 0
                    while not stop.is_set() or n < 20:
                        t0 = time.monotonic()
                        r = await http.post(
                            gw.url + "/api/tasks",
                            headers=gw.headers("alice"),
                            json={"clientId": "a", "workflow": make_workflow("ok", seed=n)},
                        )
                        task = r.json()["taskId"]
                        with trio.fail_after(30):
                            while task not in queued:
                                await news[0].wait()
                        latencies.append(queued[task] - t0)
                        n += 1
                        await trio.sleep(0.2)
                    inner.cancel_scope.cancel()

        async def mallory() -> None:
            every = max(1, args.sessions // max(1, args.cycles))
            for i in range(args.sessions):
                await session(gw, "mallory", f"m{i}")
                if i % every == 0:
                    r = await http.post(
                        gw.url + "/api/tasks",
                        headers=gw.headers("mallory"),
                        json={"clientId": f"m{i}", "workflow": make_workflow("ok", seed=i)},
                    )
                    if r.status_code == 202:
                        await http.delete(f"{gw.url}/api/tasks/{r.json()['taskId']}", headers=gw.headers("mallory"))
            stop.set()

        started = time.monotonic()
        async with trio.open_nursery() as load:
            load.start_soon(alice)
            load.start_soon(mallory)
        rss_after = rss_mb(gw.proc.pid)
        metrics = (await http.get(gw.url + "/metrics")).text
        sessions = next((line for line in metrics.splitlines() if line.startswith("gateway_sessions ")), "?")
        await gw.stop()
        nursery.cancel_scope.cancel()
    p50, p95, worst = (1000 * percentile(latencies, q) for q in (0.5, 0.95, 1.0))
    grew = rss_after - rss_before
    print(
        f"flood: {args.sessions} sessions of mallory, {args.cycles} submit/cancel cycles in "
        f"{time.monotonic() - started:.1f}s; alice's queued latency over {len(latencies)} submits: "
        f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {worst:.1f} ms; gateway RSS {rss_before:.0f} -> "
        f"{rss_after:.0f} MB (+{grew:.0f}); {sessions}"
    )
    ok = p95 <= args.latency_bound * 1000 and grew < args.memory_bound
    print("flood: PASSED" if ok else "flood: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--latency-bound", type=float, default=0.25, help="seconds: alice's p95 POST -> queued")
    p.add_argument("--memory-bound", type=float, default=150.0, help="MB the gateway's RSS may grow")
    sys.exit(trio.run(main, p.parse_args()))
