#!/usr/bin/env python3
"""A seeded fault run against the whole gateway, checked by an auditor (scripts/_chaos_audit.py).

N tasks from M users go through a real ``comfy-gateway serve`` subprocess to the ComfyUI simulator, while, at
moments chosen by the seed, the simulator is killed and restarted (sometimes forgetting its history), its
WebSocket connections are cut, clients disconnect and resume with ``last-seq``, admins grant credits, users
cancel tasks, and the gateway itself is killed with SIGKILL and started again on the same data directory (with
``--store redis``: several gateway processes on a private Redis, any of which is killed, the core or an edge, and
Redis itself is SIGKILLed and restarted on its AOF; clients are spread over the processes). Some
workflows fail while running, some are refused by ComfyUI, and users run out of credits (402). Then the auditor
checks that every task ended, every hold was resolved exactly once, no credit was created or lost, every
result is in its user's history, every client learnt how each of its tasks ended, and nobody saw anyone
else's messages.

The seed fixes the plan (which task, which user, which workflow, which fault after which submission, every
pause); the interleaving with real sockets and processes is not replayable to the millisecond, but a failing
seed fails again far more often than not. It is printed first and last:

    .venv/bin/python scripts/chaos.py --seed 7 --tasks 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):  # scripts/ (the simulator, the harness) and the project root
    if _p not in sys.path:
        sys.path.insert(0, _p)

import httpx  # noqa: E402
import trio  # noqa: E402
from _chaos_audit import Grant, Report, settle_and_audit  # noqa: E402
from _chaos_hostile import (  # noqa: E402
    HostileStats,
    failovers_in_logs,
    flooder,
    now,
    percentile,
    poisoner,
    queued_latency,
    stormer,
)
from _chaos_lib import GatewayProcess, ResumingClient, SimHandle, make_workflow  # noqa: E402
from _chaos_plan import ChaosConfig, RunStats, make_plan  # noqa: E402
from _redis_server import RedisServer  # noqa: E402

log = logging.getLogger("chaos")

LEASE_TTL = 1.0  # seconds, with --store redis: a failover takes about this long


async def run_chaos(cfg: ChaosConfig) -> Report:
    """Run the plan of ``cfg.seed`` and audit it. The report's ``problems`` are empty when everything held."""
    plan = make_plan(cfg)
    rng = random.Random(cfg.seed * 7919 + 1)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix=f"chaos-{cfg.seed}-"))
    credits = cfg.credits()
    stats = RunStats()
    grants: list[Grant] = []
    accepted: dict[str, list[str]] = {}
    progress = [0]
    hostile = HostileStats()
    submits: list[tuple[str, str, float]] = []  # well-behaved users' accepted submits: (user, taskId, wall time)
    restarts: list[tuple[float, float]] = []  # wall-clock windows of gateway kills and restarts
    progressed = [trio.Event()]
    started = time.monotonic()
    report = Report()

    redis = None
    if cfg.store == "redis":  # a private Redis (AOF on): several gateway processes act as one
        redis = RedisServer(workdir / "redis")
        redis.start()
    async with httpx.AsyncClient(timeout=10) as http, trio.open_nursery() as nursery:
        sims = SimHandle(nursery, step_ms=cfg.step_ms, seed=cfg.seed, previews=False)
        await sims.start()
        args = (
            "--initial-credits",
            str(credits),
            "--price",
            "1",
            "--max-inflight",
            str(cfg.max_inflight),
            "--max-queued-per-user",
            str(cfg.tasks + 1),
            "--reconnect-max-delay",
            "0.5",
            "--reconnect-max-restarts",
            "100000",
            "--submit-rate",
            "100",
            "--submit-burst",
            "100",
            "--max-replays-per-minute",
            str(cfg.max_replays),
        )
        if redis is not None:
            args += ("--lease-ttl", str(LEASE_TTL))
            gws = [
                GatewayProcess(
                    data=workdir / f"data{i}",
                    comfy_urls=[sims.url],
                    args=args,
                    store=redis.url(),
                    log_path=workdir / f"gateway{i}.log",
                )
                for i in range(cfg.processes)
            ]
        else:
            gws = [
                GatewayProcess(
                    data=workdir / "data", comfy_urls=[sims.url], log_path=workdir / "gateway.log", args=args
                )
            ]
        gw = gws[0]  # the auditor's view and the hostile users' gateway
        for g in gws[1:]:  # one gateway to the outside: image URLs name one public URL, whichever process made them
            g.args += ("--public-url", gw.url)
        for g in gws:
            await g.start(nursery)
        users = sorted({u for u, *_ in plan.tasks})
        # clients spread over the processes; each resumes on its own process (which is restarted when killed)
        clients = {
            u: ResumingClient(u, f"chaos-{u}", gws[i % len(gws)], http, pause=lambda: rng.uniform(0, 0.2))
            for i, u in enumerate(users)
        }
        for c in clients.values():
            nursery.start_soon(c.run)
        for c in clients.values():
            await c.wait_live()

        async def request(
            method: str, path: str, user: str, *, admin: bool = False, body: Any = None
        ) -> httpx.Response | None:
            """One request (to a process the seed picks among several); retried only when it surely did not arrive
            (refused connection). None: answer lost."""
            for _ in range(100):
                g = gws[rng.randrange(len(gws))]
                await g.wait_up()
                try:
                    r = await http.request(method, g.url + path, json=body, headers=g.headers(user, admin=admin))
                    if r.status_code == 503 and redis is not None and r.json().get("error") == "unavailable":
                        await trio.sleep(0.2)  # no core right now (failover, Redis restarting): it did not arrive
                        continue
                    return r
                except httpx.ConnectError:
                    await g.wait_up()  # the gateway is (being) restarted: it never saw this request
                except httpx.HTTPError:
                    return None  # it may or may not have been applied
            raise RuntimeError(f"{method} {path}: the gateway never came back")

        async def submitter(user: str) -> None:
            for i, (u, kind, size, pause) in enumerate(plan.tasks):
                if u != user:
                    continue
                await trio.sleep(pause)  # seeded pacing of the load (not a wait for an outcome)
                stats.submitted += 1
                t0 = now()
                r = await request(
                    "POST",
                    "/api/tasks",
                    user,
                    body={
                        "clientId": clients[user].client_id,
                        "workflow": make_workflow(kind, steps=cfg.steps, seed=i),
                        "size": size,
                    },
                )
                if r is None:
                    stats.answers_lost += 1
                elif r.status_code == 202:
                    stats.accepted += 1
                    accepted.setdefault(user, []).append(r.json()["taskId"])
                    submits.append((user, r.json()["taskId"], t0))
                else:
                    stats.refused[r.status_code] = stats.refused.get(r.status_code, 0) + 1
                    if r.status_code not in (402, 429, 503):
                        report.add(f"submit of task {i} ({kind}) by {user}: {r.status_code} {r.text[:200]}")
                progress[0] += 1
                progressed[0].set()
                progressed[0] = trio.Event()

        async def faults() -> None:
            for index, kind, p in plan.events:
                while progress[0] < index:
                    await progressed[0].wait()
                stats.events[kind] = stats.events.get(kind, 0) + 1
                log.info("chaos: after %d submissions: %s %s", progress[0], kind, p)
                if kind == "gateway_kill":
                    killed = now()
                    victim = gws[int(p["which"] * len(gws))]  # the core or an edge
                    await victim.kill()
                    await trio.sleep(p["down"])  # seeded downtime
                    await victim.start(nursery)
                    restarts.append((killed, now() + (2.0 if redis is not None else 0.0)))  # + lease failover
                elif kind == "redis_restart":
                    assert redis is not None
                    killed = now()
                    redis.stop(kill=True)
                    await trio.sleep(p["down"])
                    redis.start()
                    restarts.append((killed, now() + 2.0))
                elif kind == "sim_kill":
                    await sims.kill()
                    await trio.sleep(p["down"])
                    await sims.start(forget=p["forget"])
                elif kind == "socket_cut":
                    sims.sim.drop_sockets()
                elif kind == "client_drop":
                    clients[p["user"]].drop()
                elif kind == "grant":
                    r = await request(
                        "POST",
                        "/api/admin/credits",
                        p["admin"],
                        admin=True,
                        body={"userId": p["user"], "amount": p["amount"]},
                    )
                    if r is not None and r.status_code != 200:
                        report.add(f"grant {p}: {r.status_code} {r.text[:200]}")
                    grants.append(Grant(p["user"], p["amount"], p["admin"], confirmed=r is not None))
                elif kind == "cancel":
                    mine = accepted.get(p["user"], [])
                    if mine:
                        stats.cancels += 1
                        recent = mine[-3:]  # the latest ones: most likely still queued or running
                        await request("DELETE", f"/api/tasks/{recent[int(p['pick'] * len(recent))]}", p["user"])

        async with trio.open_nursery() as load:
            for user in users:
                load.start_soon(submitter, user)
            load.start_soon(faults)
            if cfg.hostile:
                hrng = random.Random(cfg.seed * 104729 + 3)
                load.start_soon(poisoner, gw, http, hrng, cfg.poison_rounds or cfg.tasks // 5, hostile)
                load.start_soon(flooder, gw, http, hrng, cfg.flood_sessions or cfg.tasks * 2, hostile)
                load.start_soon(stormer, gw, cfg.storm_rounds or max(2, cfg.tasks // 50), cfg.max_replays, hostile)
        loaded = time.monotonic()
        await settle_and_audit(
            gateway=gw,
            sims=sims,
            clients=clients,
            http=http,
            initial_credits=credits,
            grants=grants,
            settle_timeout=cfg.settle_timeout,
            report=report,
        )
        for g in gws[1:]:
            if await g.stop() != 0:
                report.add(f"gateway {g.url} exited uncleanly on SIGTERM")
        seen = {u: c.seen for u, c in clients.items()}
        if redis is not None:  # failovers nobody planned (a core starved past its lease) are failover windows too
            found = failovers_in_logs([g.log_path for g in gws], LEASE_TTL)
            unplanned = [(a, b) for a, b in found if not any(a <= d and c <= b for c, d in restarts)]
            report.stats["unplanned_failovers"] = len(unplanned)
            restarts += unplanned
        every = queued_latency(submits, seen, [])
        latencies = queued_latency(submits, seen, restarts, cfg.restart_settle)
        for c in clients.values():
            c.stopping = True
            c.drop()
        nursery.cancel_scope.cancel()
    if redis is not None:
        redis.stop()
    for problem in hostile.problems:
        report.add(f"hostile: {problem}")
    for key, values in (("queued_latency_ms", latencies), ("queued_latency_ms_with_restarts", every)):
        report.stats[key] = {
            "n": len(values),
            "p50": round(1000 * percentile(values, 0.5), 1),
            "p95": round(1000 * percentile(values, 0.95), 1),
            "max": round(1000 * max(values, default=0), 1),
        }
    if cfg.hostile:
        if hostile.poison_http_refused == 0 or hostile.storms_cut == 0:
            report.add(f"hostile users were not refused as expected: {hostile.as_dict()}")
        p95 = percentile(latencies, 0.95)
        if not latencies or p95 > cfg.latency_bound:
            report.add(
                f"well-behaved users' queued latency p95 {p95:.3f}s over {len(latencies)} submits "
                f"(bound {cfg.latency_bound}s)"
            )
        report.stats["hostile"] = hostile.as_dict()

    report.stats.update(
        {
            "seed": cfg.seed,
            "users": len(users),
            "initial_credits": credits,
            "submitted": stats.submitted,
            "accepted": stats.accepted,
            "refused": stats.refused,
            "answers_lost": stats.answers_lost,
            "cancels_sent": stats.cancels,
            "faults": stats.events,
            "gateway_starts": sum(g.starts for g in gws),
            "store": cfg.store if redis is None else f"redis, {len(gws)} processes",
            "simulator_objects": len(sims.sims),
            "seconds_load": round(loaded - started, 1),
            "seconds_total": round(time.monotonic() - started, 1),
            "workdir": str(workdir),
        }
    )
    return report


def _parse(argv: list[str] | None) -> tuple[ChaosConfig, argparse.Namespace]:
    d = ChaosConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="the plan's seed (default: a random one, printed)")
    p.add_argument("--tasks", type=int, default=d.tasks)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--gateway-kills", type=int, default=None, help="default: tasks // 50, at least 2")
    p.add_argument("--sim-kills", type=int, default=None, help="default: tasks // 50, at least 2")
    p.add_argument("--socket-cuts", type=int, default=None, help="default: tasks // 40, at least 2")
    p.add_argument("--client-drops", type=int, default=None, help="default: tasks // 20, at least 4")
    p.add_argument("--grants", type=int, default=None, help="default: tasks // 30, at least 3")
    p.add_argument("--forget-share", type=float, default=d.forget_share)
    p.add_argument("--initial-credits", type=int, default=d.initial_credits)
    p.add_argument("--step-ms", type=float, default=d.step_ms)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--mean-gap", type=float, default=d.mean_gap)
    p.add_argument("--settle-timeout", type=float, default=d.settle_timeout)
    p.add_argument("--workdir", default="", help="where the data directory and logs go (default: a new temp dir)")
    p.add_argument("--no-hostile", action="store_true", help="no poisoner, session flooder or replay stormer")
    p.add_argument(
        "--latency-bound",
        type=float,
        default=d.latency_bound,
        help="seconds: p95 of well-behaved users' POST -> queued (checked with hostile users)",
    )
    p.add_argument(
        "--restart-settle",
        type=float,
        default=d.restart_settle,
        help="seconds after a gateway restart whose submits the latency check leaves out (reported apart)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "redis"),
        default=d.store,
        help="redis: a private redis-server (AOF) and --processes gateways on it, one core and edges; "
        "gateway kills hit any of them, and Redis itself is SIGKILLed and restarted",
    )
    p.add_argument("--processes", type=int, default=d.processes, help="with --store redis")
    p.add_argument(
        "--redis-restarts", type=int, default=None, help="with --store redis; default: tasks // 200, at least 1"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    n = a.tasks
    cfg = ChaosConfig(
        seed=a.seed if a.seed is not None else random.SystemRandom().randrange(1, 1_000_000),
        tasks=n,
        users=a.users,
        gateway_kills=a.gateway_kills if a.gateway_kills is not None else max(2, n // 50),
        sim_kills=a.sim_kills if a.sim_kills is not None else max(2, n // 50),
        socket_cuts=a.socket_cuts if a.socket_cuts is not None else max(2, n // 40),
        client_drops=a.client_drops if a.client_drops is not None else max(4, n // 20),
        grants=a.grants if a.grants is not None else max(3, n // 30),
        forget_share=a.forget_share,
        initial_credits=a.initial_credits,
        step_ms=a.step_ms,
        steps=a.steps,
        mean_gap=a.mean_gap,
        settle_timeout=a.settle_timeout,
        workdir=a.workdir,
        hostile=not a.no_hostile,
        latency_bound=a.latency_bound,
        restart_settle=a.restart_settle,
        store=a.store,
        processes=a.processes,
        redis_restarts=(
            0 if a.store != "redis" else a.redis_restarts if a.redis_restarts is not None else max(1, n // 200)
        ),
    )
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"chaos: seed {cfg.seed}, {cfg.tasks} tasks, {cfg.users} users", flush=True)
    report = trio.run(run_chaos, cfg)
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, **report.stats}, indent=2))
    else:
        for key, value in report.stats.items():
            print(f"  {key}: {value}")
        for problem in report.problems:
            print(f"PROBLEM: {problem}")
    verdict = "PASSED" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(
        f"chaos: seed {cfg.seed}: {verdict}; replay: scripts/chaos.py --seed {cfg.seed} --tasks {cfg.tasks} "
        f"--users {cfg.users}"
        + (f" --store redis --processes {cfg.processes}" if cfg.store == "redis" else "")
        + (f" ({json.dumps(asdict(cfg))})" if not report.ok else ""),
        flush=True,
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
