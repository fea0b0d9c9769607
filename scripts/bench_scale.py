#!/usr/bin/env python3
"""Scale-out benchmark (issue 12): the push path with 1 and with 2 gateway processes on one Redis, in one run.

For each K in ``--processes`` (default 1,2), on a private ``redis-server`` (``scripts/_redis_server.py``, flushed
between the K):

* K gateway processes (the relay benchmark's gateway role, ``--store redis://…``: every actor and bridge runs;
  one is the core, the others are edges), process i pinned to CPU i;
* an *injector* process that does what the core does for every event: ``Publish`` per user, round-robin, into
  ``actors.bridge.publish_to_redis`` (the core's own publishing code: the Lua script numbers each message,
  appends it to the session's stream and to the events stream);
* ``--clients`` @stomp/stompjs clients in one Node process (``scripts/bench_relay_clients.mjs``), one user and
  session each, client i on process i mod K.

The injector, Redis, the clients and this driver are pinned to the CPUs no gateway uses (with 2 CPUs and K=1:
CPU 1), or float over all CPUs when the gateways take every CPU (K=2 on 2 CPUs): then they compete with the
gateways, and the table shows what they cost (``O``, µs per delivered message) next to the gateways' cost
(``G``): on C cores the best K=C can do is C / (G + O) msgs/s.

Each phase is bounded by ``--messages`` per client and ``--seconds``. At rate 0 ("max") the load is a closed loop:
the driver keeps at most ``--window`` / K messages in flight per gateway process (injected, not yet received,
from the clients' 10 ms ticks per process), so msgs/s is the sustained delivery rate, not a backlog that the events stream (10,000 entries) would
trim. A rate > 0 is open loop at that rate. ``ratio`` = msgs/s with K processes / with the first K, same rate.

    .venv/bin/python scripts/bench_scale.py                                   # 1,000 clients, K=1,2, max + 1500/s
    .venv/bin/python scripts/bench_scale.py --clients 100 --messages 20 --rate 0 --seconds 5
    .venv/bin/python scripts/bench_scale.py --profile                        # cProfile per gateway process

Reuses the relay benchmark's pieces (``scripts/benchrelay``): the gateway role, the control loop of a child
process, the injector loop, the Node client driver and the CPU accounting. BENCHMARKS.md has a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import trio  # noqa: E402
from _redis_server import RedisServer  # noqa: E402
from benchrelay._cli import code_version, ensure_node, parse_rates  # noqa: E402
from benchrelay._common import (  # noqa: E402
    CLIENT_ID,
    CLIENTS_JS,
    CONNECT_BATCH,
    DRAIN_GRACE,
    SCRIPT,
    SECRET,
    SERVER_START,
    TICK_MS,
    bench_body,
    calibrate,
    control_loop,
    inject,
)
from benchrelay._driver import Driver  # noqa: E402
from benchrelay._procs import Proc, cpu_busy, percentile, proc_cpu  # noqa: E402
from benchrelay._report import fmt_ms, fmt_rate  # noqa: E402

SELF = Path(__file__).resolve()
CHUNK = 250  # messages per inject command in the closed loop
REPLAY_MAX = 300  # as the gateway's default (sessions.DEFAULT_REPLAY_MAX)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="client connections, one user each (default 1000)")
    p.add_argument("--messages", type=int, default=20, help="messages per client per phase (default 20)")
    p.add_argument("--rate", type=parse_rates, default=[0.0, 1500.0], help="total msgs/s, 0 = max (default 0,1500)")
    p.add_argument("--processes", default="1,2", help="gateway process counts to run, in order (default 1,2)")
    p.add_argument("--size", type=int, default=100, help="JSON body bytes per message (default 100)")
    p.add_argument("--seconds", type=float, default=20.0, help="time bound of each phase's sending (default 20)")
    p.add_argument("--window", type=int, default=2000, help="rate 0: messages in flight at most (default 2000)")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="wait up to this for a quiet machine (default 30)")
    p.add_argument("--profile", action="store_true", help="cProfile every gateway process per phase (slower)")
    p.add_argument("--no-pin", action="store_true", help="pin nothing")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("role_config", nargs="?", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.ks = [int(k) for k in a.processes.split(",") if k.strip()]
    if a.clients < 1 or a.messages < 1 or a.seconds <= 0 or a.window < 1 or not a.ks or min(a.ks) < 1:
        p.error("--clients, --messages, --window and --processes must be >= 1, --seconds > 0")
    return a


# =============================================================================================================
# The injector role: the core's publishing path alone
# =============================================================================================================


async def injector(cfg: dict[str, Any]) -> None:
    from actors._util import Forwarder
    from actors.bridge import publish_to_redis
    from actors.gateway import HUB_INBOX
    from actors.sessions import Publish
    from actors.store import RedisStore, open_store

    users = [f"u{i}" for i in range(cfg["clients"])]
    async with open_store(cfg["store"]) as store, trio.open_nursery() as nursery:
        assert isinstance(store, RedisStore)
        tx, rx = trio.open_memory_channel[Any](HUB_INBOX)  # as the gateway's publishing channel
        await nursery.start(partial(publish_to_redis, store, rx, replay_max=REPLAY_MAX))
        out = Forwarder(tx)  # as the registry publishes

        async def send(user: str, body: dict[str, Any]) -> None:
            await out.send(Publish(user, CLIENT_ID, body))

        async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
            group = users[cmd.get("group", 0) :: cmd.get("groups", 1)]  # the users of one gateway process
            off = cmd.get("offset", 0) % len(group)
            order = group[off:] + group[:off]
            make = partial(bench_body, size=cmd["size"])
            return await inject(send, make, order, cmd["count"], cmd["rate"], cmd["seconds"])

        print(json.dumps({"event": "listening", "pid": os.getpid(), "calibration_us": calibrate()}), flush=True)
        await control_loop(handle, trio.Event())
        nursery.cancel_scope.cancel()


# =============================================================================================================
# The driver
# =============================================================================================================


class ScaleDriver(Driver):
    def __init__(self, a: argparse.Namespace, tmp: Path, redis: RedisServer) -> None:
        from web.auth import Authenticator

        self.a, self.tmp, self.redis = a, tmp, redis
        self.results: list[dict[str, Any]] = []  # type: ignore[assignment]
        self.procs: list[Proc] = []
        self.users = [f"u{i}" for i in range(a.clients)]
        auth = Authenticator(SECRET)
        self.tokens = [auth.issue(u) for u in self.users]
        self.ncpu = os.cpu_count() or 1

    def others_cpus(self, k: int) -> set[int] | None:
        """The CPUs for Redis, the injector, the clients and this driver: those no gateway is pinned to."""
        if self.a.no_pin:
            return None
        free = set(range(k, self.ncpu))
        return free or set(range(self.ncpu))

    async def start_role(self, name: str, argv: list[str], cpus: set[int] | None) -> tuple[Proc, dict[str, Any]]:
        p = await self.spawn(name, argv, None)
        if cpus is not None:
            os.sched_setaffinity(p.proc.pid, cpus)
        try:
            return p, await p.expect("listening", SERVER_START)
        except (EOFError, trio.TooSlowError) as exc:
            raise RuntimeError(f"{name} did not start ({exc}):\n{p.log_tail()}") from None

    async def run_k(self, k: int, comfy_url: str) -> None:
        a, others = self.a, self.others_cpus(k)
        self.redis.flush()
        if others is not None:
            os.sched_setaffinity(0, others)
            os.sched_setaffinity(self.redis.proc.pid, others)  # type: ignore[union-attr]
        cfg = {"comfy_urls": [comfy_url], "store": self.redis.url()}
        started: list[Proc] = []
        try:
            gws, urls = [], []
            for i in range(k):
                cpus = None if a.no_pin else {i % self.ncpu}
                argv = [sys.executable, str(SCRIPT), "--role", "gateway", json.dumps(cfg)]
                p, info = await self.start_role(f"gateway{k}-{i}", argv, cpus)
                started.append(p)
                gws.append(p)
                urls.append(info["url"])
            icfg = {"store": self.redis.url(), "clients": a.clients}
            argv = [sys.executable, str(SELF), "--role", "injector", json.dumps(icfg)]
            inj, _ = await self.start_role(f"injector{k}", argv, others)
            started.append(inj)
            cfg_path = self.tmp / f"clients{k}.json"
            cfg_path.write_text(
                json.dumps(
                    {
                        "mode": "stomp",
                        "urls": urls,
                        "tokens": self.tokens,
                        "clientId": CLIENT_ID,
                        "batch": CONNECT_BATCH,
                    }
                )
            )
            clients = await self.spawn(f"clients{k}", ["node", str(CLIENTS_JS), str(cfg_path)], None)
            started.append(clients)
            if others is not None:
                os.sched_setaffinity(clients.proc.pid, others)
            ready = await clients.expect("ready", 30 + a.clients / 20)
            self.say(f"K={k}: {a.clients} clients connected in {ready['seconds']:.1f}s over {urls}")
            await trio.sleep(1)
            for rate in a.rate:
                r = await self.phase(k, rate, gws, inj, clients)
                self.results.append(r)
                self.say("  " + summary(r))
                for i, prof in enumerate(r.pop("profiles")):
                    if prof:
                        self.say(f"  profile of gateway {i} (K={k}, rate {fmt_rate(rate)}):\n{prof}")
        finally:
            for p in reversed(started):
                await p.stop()

    async def phase(self, k: int, rate: float, gws: list[Proc], inj: Proc, clients: Proc) -> dict[str, Any]:
        a = self.a
        expected = a.clients * a.messages
        await self.wait_quiet()
        for p in [*gws, inj]:
            await p.send({"cmd": "begin", "profile": a.profile and p is not inj})
            await p.expect("begun", 10)
        clients.ticks = 0
        deadline_ms = int(1000 * (a.seconds + DRAIN_GRACE))
        await clients.send(
            {"cmd": "measure", "expect": expected, "tickMs": TICK_MS if rate == 0 else 0, "deadlineMs": deadline_ms}
        )
        await clients.expect("armed", 10)
        assert self.redis.proc is not None
        c0, redis0, d0 = cpu_busy(), proc_cpu(self.redis.proc.pid), time.process_time()
        if rate == 0:
            sent = await self.closed_loop(inj, clients, expected, k)
        else:
            await inj.send({"cmd": "inject", "count": expected, "rate": rate, "size": a.size, "seconds": a.seconds})
            sent = await inj.expect("injected", a.seconds + 30)
        result = await clients.expect("result", a.seconds + DRAIN_GRACE + 30)
        c1, redis1, d1 = cpu_busy(), proc_cpu(self.redis.proc.pid), time.process_time()
        ends = []
        for p in [*gws, inj]:
            await p.send({"cmd": "end"})
            ends.append(await p.expect("ended", 60))
        wall = max(result["wall"], 1e-9)
        delivered = result["count"]
        seconds = (result["last"] / 1000 - sent["t0"]) if result["last"] is not None else 0.0
        lat = sorted(result["lat"])
        cpu = {
            "gateways": [e["cpu"] for e in ends[:-1]],
            "injector": ends[-1]["cpu"],
            "redis": redis1 - redis0,
            "clients": result["cpu"],
            "driver": d1 - d0,
        }
        ours = sum(cpu["gateways"]) + cpu["injector"] + cpu["redis"] + cpu["clients"] + cpu["driver"]
        busy = sum(c1[c] - c0.get(c, 0.0) for c in c1)
        per_msg = 1e6 / max(1, delivered)
        return {
            "k": k,
            "rate": rate,
            "expected": expected,
            "sent": sent["sent"],
            "delivered": delivered,
            "msgs_per_s": delivered / seconds if seconds > 0 else 0.0,
            "offered": sent["sent"] / max(1e-9, sent["t1"] - sent["t0"]),
            "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99),
            "max": percentile(lat, 1.0),
            "wall": wall,
            "cpu": cpu,
            "pct": {
                n: [round(100 * x / wall) for x in v] if isinstance(v, list) else round(100 * v / wall)
                for n, v in cpu.items()
            },
            "others_pct": round(100 * max(0.0, busy - ours) / wall),
            "G_us": sum(cpu["gateways"]) * per_msg,
            "O_us": (cpu["injector"] + cpu["redis"] + cpu["clients"]) * per_msg,
            "per_client": (result["perClientMin"], result["perClientMax"]),
            "closed": result["closed"],
            "errors": result["errors"][:5],
            "gc_full_max_ms": [e["gc_full_max_ms"] for e in ends[:-1]],
            "profiles": [e["profile"] for e in ends[:-1]],
        }

    async def closed_loop(self, inj: Proc, clients: Proc, expected: int, k: int) -> dict[str, Any]:
        """Inject in chunks, to each gateway's users in turn, while fewer than --window / K messages are in
        flight to that gateway (one window for all would let the slower process's backlog starve the other)."""
        a = self.a
        deadline = trio.current_time() + a.seconds
        window = a.window / k
        sent, t0 = [0] * k, None
        share = [expected // k + (g < expected % k) for g in range(k)]
        while sum(sent) < expected and trio.current_time() < deadline:
            idle = True
            for g in range(k):
                got_g = (
                    clients.ticks_by[g] if len(clients.ticks_by) == k else clients.ticks * sent[g] / max(1, sum(sent))
                )
                room = min(CHUNK, share[g] - sent[g], int(window - (sent[g] - got_g)))
                if room < min(CHUNK, share[g] - sent[g]) or room <= 0:
                    continue
                idle = False
                cmd = {"group": g, "groups": k, "offset": sent[g], "count": room, "rate": 0, "size": a.size}
                await inj.send({"cmd": "inject", **cmd, "seconds": a.seconds})
                got = await inj.expect("injected", a.seconds + 30)
                t0 = got["t0"] if t0 is None else t0
                sent[g] += got["sent"]
            if idle:
                await trio.sleep(0.002)
        return {"sent": sum(sent), "t0": time.time() if t0 is None else t0, "t1": time.time()}


def summary(r: dict[str, Any]) -> str:
    return (
        f"K={r['k']} rate {fmt_rate(r['rate'])}: {r['delivered']}/{r['expected']} delivered, {r['msgs_per_s']:,.0f} "
        f"msgs/s, p50 {fmt_ms(r['p50'])} p99 {fmt_ms(r['p99'])} ms, gateways {r['pct']['gateways']}% CPU, "
        f"G {r['G_us']:.0f} µs/msg, O {r['O_us']:.0f} µs/msg"
    )


def table(results: list[dict[str, Any]]) -> str:
    head = ("K", "target/s", "sent/s", "delivered", "msgs/s", "ratio", "p50 ms", "p99 ms", "max ms", "gateway CPU",
            "Redis", "injector", "clients", "others", "G µs/msg", "O µs/msg", "2-core bound")  # fmt: skip
    rows = [head]
    base: dict[float, dict[str, Any]] = {}  # the latest run of the first K, per rate (--processes 1,2,1,2: pairs)
    for r in results:
        if r["k"] == results[0]["k"]:
            base[r["rate"]] = r
        b = base.get(r["rate"])
        bound = 2e6 / (r["G_us"] + r["O_us"]) if r["G_us"] + r["O_us"] else 0.0
        rows.append(
            (
                str(r["k"]),
                fmt_rate(r["rate"]),
                f"{r['offered']:,.0f}",
                f"{r['delivered']}/{r['sent']}",
                f"{r['msgs_per_s']:,.0f}",
                f"{r['msgs_per_s'] / b['msgs_per_s']:.2f}" if b and b["msgs_per_s"] else "",
                fmt_ms(r["p50"]),
                fmt_ms(r["p99"]),
                fmt_ms(r["max"]),
                " + ".join(f"{x}%" for x in r["pct"]["gateways"]),
                f"{r['pct']['redis']}%",
                f"{r['pct']['injector']}%",
                f"{r['pct']['clients']}%",
                f"{r['others_pct']}%",
                f"{r['G_us']:.0f}",
                f"{r['O_us']:.0f}",
                f"{bound:,.0f}/s" if bound else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        "msgs/s = delivered / (last arrival - first send); ratio = msgs/s against the latest run of the first K at the",
        "same rate;",
        "CPU columns = share of one core over the phase; G = all gateways' CPU per delivered message; O = Redis +",
        "injector + clients per delivered message; 2-core bound = 2 s of CPU per s / (G + O) (what 2 cores allow).",
    ]
    return "\n".join(lines)


async def drive(a: argparse.Namespace) -> list[dict[str, Any]]:
    from fake_comfyui import FakeComfyUI

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        try:
            d = ScaleDriver(a, Path(tmp), redis)
            d.say(
                f"bench_scale: K in {a.ks}, {a.clients} clients, {a.messages} msgs each, rates "
                f"{[fmt_rate(r) for r in a.rate]}, {a.size} B; {d.ncpu} CPUs; code {code_version() or '?'}; "
                f"load average {os.getloadavg()[0]:.2f}"
            )
            sim = FakeComfyUI(step_ms=0, seed=0, previews=False)  # the core's backend (idle: no task is submitted)
            async with trio.open_nursery() as nursery:
                d.nursery = nursery
                await nursery.start(sim.serve)
                for k in a.ks:
                    await d.run_k(k, sim.url)
                nursery.cancel_scope.cancel()
            return d.results
        finally:
            redis.stop()


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.role == "injector":
        trio.run(injector, json.loads(a.role_config))
        return 0
    ensure_node()
    results = trio.run(drive, a)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"code": code_version(), "args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
