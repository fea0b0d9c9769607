"""The driver (CPU 1, with the clients and the ComfyUI simulators): starts servers and clients, runs phases."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ._common import (
    CLIENT_ID,
    CLIENTS_JS,
    COMFY_SETTLE,
    CONNECT_BATCH,
    DRAIN_GRACE,
    IDLE_HEARTBEAT,
    MAX_SAMPLER_STEPS,
    NODE_DIR,
    QUIET_BUSY,
    ROOT,
    SCRIPT,
    SECRET,
    SERVER_START,
    TICK_MS,
    WORKFLOW,
    Submitter,
)
from ._procs import ClosedLoop, Proc, Result, churn_window, cpu_busy, fill_latency, idle_window, pin, proc_cpu
from ._report import fmt_ms, fmt_rate


class Driver:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.a = args
        self.tmp = tmp
        self.results: list[Result] = []
        self.nursery: trio.Nursery  # set by drive(): the Proc pumps run there
        self.setup: dict[str, dict[str, Any]] = {}  # per server: connect time, memory and idle CPU
        self.procs: list[Proc] = []
        self.server_cpu_id: int | None = None
        self.client_cpu_id: int | None = None
        if not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
            self.server_cpu_id, self.client_cpu_id = 0, 1
            os.sched_setaffinity(0, {1})  # this process (simulators, driver) and the Node clients: CPU 1
        from web.auth import Authenticator

        auth = Authenticator(SECRET)
        self.users = [f"u{i}" for i in range(args.clients)]
        self.tokens = [auth.issue(u) for u in self.users]

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def spawn(self, name: str, argv: list[str], cpu: int | None) -> Proc:
        log_path = self.tmp / f"{name}.log"
        logf = open(log_path, "wb")  # noqa: ASYNC230, SIM115 - a local log file, handed to the process
        proc = await trio.lowlevel.open_process(
            pin(cpu) + argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=logf,
            cwd=str(NODE_DIR if argv[0] == "node" else ROOT),
        )
        logf.close()
        p = Proc(name, proc, log_path, self.nursery)
        self.procs.append(p)
        return p

    async def start_server(self, role: str, cfg: dict[str, Any]) -> tuple[Proc, dict[str, Any]]:
        p = await self.spawn(role, [sys.executable, str(SCRIPT), "--role", role, json.dumps(cfg)], self.server_cpu_id)
        try:
            info = await p.expect("listening", SERVER_START)
        except (EOFError, trio.TooSlowError) as exc:
            raise RuntimeError(f"{role} did not start ({exc}):\n{p.log_tail()}") from None
        return p, info

    async def start_clients(self, mode: str, server: Proc, info: dict[str, Any]) -> Proc:
        """Connect the N clients; measure the server's memory per connection and its CPU while they idle."""
        await server.send({"cmd": "stats"})
        before = await server.expect("stats", 10)
        url = info["http"] + "/ws" if mode == "sockjs" else info["url"]  # sockjs-client takes the endpoint's http URL
        cfg = {"mode": mode, "url": url, "tokens": self.tokens, "clientId": CLIENT_ID, "batch": CONNECT_BATCH}
        if mode in ("bare", "floor") and self.a.paths == ["idle"]:
            cfg["heartbeatMs"] = int(IDLE_HEARTBEAT * 1000)
        cfg_path = self.tmp / f"clients-{mode}.json"
        cfg_path.write_text(json.dumps(cfg))
        p = await self.spawn(f"clients-{mode}", ["node", str(CLIENTS_JS), str(cfg_path)], self.client_cpu_id)
        try:
            ready = await p.expect("ready", 30 + self.a.clients / 20)
        except (EOFError, trio.TooSlowError, RuntimeError) as exc:
            raise RuntimeError(f"the {mode} clients did not connect ({exc}):\n{p.log_tail()}") from None
        await trio.sleep(1)
        await server.send({"cmd": "stats"})
        connected = await server.expect("stats", 10)
        idle_s = self.a.idle_seconds
        setup = {
            "connect_seconds": round(ready["seconds"], 2),
            "rss_before_mb": round(before["rss_kb"] / 1024, 1),
            "rss_connected_mb": round(connected["rss_kb"] / 1024, 1),
            "kb_per_connection": round((connected["rss_kb"] - before["rss_kb"]) / self.a.clients, 1),
            **await idle_window(server, p, idle_s, self.server_cpu_id, self.a.profile and self.a.paths == ["idle"]),
            "calibration_us": info["calibration_us"],
        }
        setup["kb_per_connection_after_idle"] = round((setup.pop("rss_idle_kb") - before["rss_kb"]) / self.a.clients, 1)
        if self.a.gc_freeze:
            await server.send({"cmd": "gc_freeze"})
            setup["gc_frozen_objects"] = (await server.expect("frozen", 30))["frozen"]
        if self.a.churn and mode in ("stomp", "sockjs"):
            setup.update(await churn_window(server, p, 60 + self.a.clients / 10))
            self.say(
                f"  churn ({mode}): {setup['churn_closed']} left and all connected again in {setup['churn_seconds']}s; "
                f"{setup['churn_gc_full']} full GC (longest {setup['churn_gc_full_max_ms']} ms), longest GC "
                f"{setup['churn_gc_max_ms']} ms, server CPU {setup['churn_cpu_s']}s; RSS "
                f"{round(setup['rss_after_churn_kb'] / 1024, 1)} MB after"
            )
        if self.a.thaw:
            await server.send({"cmd": "thaw"})
            thawed = await server.expect("thawed", 120)
            setup["thaw_ms"], setup["thaw_frozen_objects"] = thawed["ms"], thawed["frozen"]
            self.say(f"  thaw ({mode}): one full collection over {thawed['frozen']:,} objects took {thawed['ms']} ms")
        self.setup[{"stomp": "gateway", "sockjs": "gateway"}.get(mode, mode)] = setup
        if profile := setup.pop("idle_profile"):
            self.say(f"    server profile while idle ({mode}), top by own time:\n{profile}")
        self.say(
            f"  {self.a.clients} {mode} clients connected in {setup['connect_seconds']}s; server RSS "
            f"{setup['rss_before_mb']} -> {setup['rss_connected_mb']} MB ({setup['kb_per_connection']} KB per "
            f"connection), idle CPU {setup['idle_cpu_percent']}% over {idle_s:g}s ({setup['closed_while_idle']} "
            f"closed, {setup['idle_gc_full']} full GC ({setup['idle_gc_full_total_ms']} ms in all), GC "
            f"{setup['idle_gc_total_ms']} ms in all, longest GC {setup['idle_gc_max_ms']} ms; others "
            f"{setup['idle_others_server_core_percent']}% of the server core); json.dumps(100 B) "
            f"{info['calibration_us']} µs"
        )
        return p

    async def measure(
        self, r: Result, server: Proc, clients: Proc, run_load: Any, tick_ms: int = 0
    ) -> tuple[dict[str, Any], Any]:
        """begin (server CPU, profile) -> arm the clients -> run the load -> wait for the clients -> end."""
        await self.wait_quiet()
        await server.send({"cmd": "begin", "profile": self.a.profile})
        await server.expect("begun", 10)
        clients.ticks = 0
        await clients.send(
            {
                "cmd": "measure",
                "expect": r.expected,
                "tickMs": tick_ms,
                "deadlineMs": int(1000 * (self.a.seconds + DRAIN_GRACE)),
            }
        )
        await clients.expect("armed", 10)
        d0, c0 = os.times(), cpu_busy()
        load = await run_load()
        result = await clients.expect("result", self.a.seconds + DRAIN_GRACE + 30)
        d1, c1 = os.times(), cpu_busy()
        await server.send({"cmd": "end"})
        ended = await server.expect("ended", 30)
        r.server_cpu = ended["cpu"]
        r.server = {
            k: ended[k]
            for k in ("rss_kb", "gc_full", "gc_full_max_ms", "gc_full_total_ms", "gc_objects", "gc_top_types")
        }
        r.profile = ended["profile"]
        r.client_cpu = result["cpu"]
        r.driver_cpu = (d1.user + d1.system) - (d0.user + d0.system)
        r.wall = result["wall"]
        busy = {cpu: c1[cpu] - c0.get(cpu, 0.0) for cpu in c1}
        r.busy = {str(cpu): round(v, 3) for cpu, v in sorted(busy.items())}
        r.other_cpu = max(0.0, sum(busy.values()) - r.server_cpu - r.client_cpu - r.driver_cpu)
        if self.server_cpu_id is not None and self.client_cpu_id is not None:
            r.other_cpu_server_core = max(0.0, busy.get(self.server_cpu_id, 0.0) - r.server_cpu)
        r.delivered = result["count"]
        r.other = result["total"] - result["count"]
        r.ws_messages = result["wsMessages"]
        r.per_client = (result["perClientMin"], result["perClientMax"])
        r.closed = result["closed"]
        r.errors = result["errors"]
        return result, load

    async def wait_quiet(self) -> None:
        """Wait (at most --quiet-wait seconds) until other processes leave the CPUs alone: busy < 15% of a core
        (our own processes excluded: an idle gateway with many connections is not idle)."""
        deadline = trio.current_time() + self.a.quiet_wait
        waited = False
        while self.a.quiet_wait > 0:
            pids = [os.getpid(), *(p.proc.pid for p in self.procs if p.proc.returncode is None)]
            c0, own0 = cpu_busy(), sum(proc_cpu(pid) for pid in pids)
            await trio.sleep(1)
            own = sum(proc_cpu(pid) for pid in pids) - own0
            busy = sum(v - c0.get(cpu, 0.0) for cpu, v in cpu_busy().items()) - own
            if busy < QUIET_BUSY:
                if waited:
                    self.say("  (the machine is quiet again)")
                return
            if trio.current_time() >= deadline:
                self.say(f"  warning: the machine is still busy ({100 * busy:.0f}% of a core); measuring anyway")
                return
            if not waited:
                self.say(f"  waiting for other processes to leave the CPUs ({100 * busy:.0f}% of a core busy)")
                waited = True

    # -- the three paths

    async def run_injected(
        self, path: str, targets: dict[str, Any], rate: float, server: Proc, clients: Proc
    ) -> Result:
        """The hub and bare paths: the server process injects the messages itself (``targets``: to whom)."""
        a = self.a
        r = Result(path, rate, a.clients, a.size, a.clients * a.messages)

        async def load() -> dict[str, Any]:
            await server.send(
                {"cmd": "inject", **targets, "count": r.expected, "rate": rate, "size": a.size, "seconds": a.seconds}
            )
            return await server.expect("injected", a.seconds + 30)

        result, sent = await self.measure(r, server, clients, load)
        self.finish_timed(r, result, sent)
        return r

    def finish_timed(self, r: Result, result: dict[str, Any], sent: dict[str, Any]) -> None:
        r.sent = sent["sent"]
        r.offered = r.sent / max(1e-9, sent["t1"] - sent["t0"])
        if result["last"] is not None:
            r.seconds = result["last"] / 1000 - sent["t0"]
            r.throughput = r.delivered / max(1e-9, r.seconds)
        fill_latency(r, result["lat"])
        if r.delivered < r.sent:
            r.note = f"{r.sent - r.delivered} sent but not delivered"

    async def run_comfy(self, rate: float, server: Proc, clients: Proc, sims: list[Any], http_url: str) -> Result:
        """Progress events from the simulators. At a target rate each simulator steps every ``sims/rate`` s (open
        loop); at "max" they step as fast as they can while fewer than ``--window`` events are in flight (emitted,
        not yet received), so the figure is the gateway's sustained ingest rate, not a growing backlog."""
        import httpx

        a = self.a
        steps = min(a.messages, MAX_SAMPLER_STEPS)
        tasks_per_user = math.ceil(a.messages / steps)
        r = Result("comfy", rate, a.clients, 0, a.clients * steps * tasks_per_user)
        step_ms = len(sims) * 1000.0 / rate if rate > 0 else 0.0
        loop = ClosedLoop(sims, clients, a.window, steering=rate == 0)
        emitted = loop.emitted
        for sim in sims:
            sim.step_ms = step_ms
            sim.progress_hook = loop.progress  # time each progress as it leaves
        wf = json.loads(WORKFLOW.read_text())
        for node in wf.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = steps
        tasks: list[tuple[str, str]] = []  # (token, taskId)

        async with httpx.AsyncClient(timeout=30) as http:

            async def submit_all() -> None:
                """The users' submits, 16 at a time over keep-alive connections (``Submitter``: the clients' core
                is the simulators' too, and httpx cost ~1.5 ms of it per request)."""
                body = json.dumps({"clientId": CLIENT_ID, "workflow": wf}).encode()
                pending = iter([i for _ in range(tasks_per_user) for i in range(a.clients)])  # round after round

                async def worker() -> None:
                    async with await Submitter.open(http_url) as submitter:
                        for i in pending:
                            status, answer = await submitter.post("/api/tasks", body, self.tokens[i])
                            if status != 202:
                                raise RuntimeError(f"submit for {self.users[i]}: {status} {answer!r}")
                            tasks.append((self.tokens[i], json.loads(answer)["taskId"]))

                async with trio.open_nursery() as n:
                    for _ in range(16):
                        n.start_soon(worker)

            async def load() -> dict[str, Any]:
                with trio.move_on_after(a.seconds):  # the submissions count against the time bound too
                    await submit_all()
                return {}

            idle = [0, 0]  # samples of (a simulator idle while tasks wait in the gateway, all simulator samples)

            async def watch_backends() -> None:
                """DESIGN: "a backend must never wait for the gateway between two prompts". Sample how often one does."""
                while True:
                    await trio.sleep(0.05)
                    if len(tasks) > sum(len(sim.submitted) for sim in sims) - submitted_before:
                        idle[0] += sum(sim._running is None for sim in sims)
                        idle[1] += len(sims)

            submitted_before = sum(len(sim.submitted) for sim in sims)
            async with trio.open_nursery() as helpers:
                helpers.start_soon(watch_backends)
                if rate == 0:
                    clients.on_tick = loop.steer
                try:
                    result, _ = await self.measure(r, server, clients, load, tick_ms=TICK_MS if rate == 0 else 0)
                finally:
                    clients.on_tick = None
                helpers.cancel_scope.cancel()
            for sim in sims:
                sim.step_ms = 0.0
            await self.settle(http, http_url, tasks, cancel=result["count"] < r.expected)
        for sim in sims:
            sim.progress_hook = None
        r.sent = len(emitted)
        lat = []
        first = min(emitted.values()) if emitted else None
        for pid, value, t in result["recs"]:
            sent_at = emitted.get((pid, value))
            if sent_at is not None:
                lat.append(t - sent_at * 1000)
        fill_latency(r, lat)
        if first is not None and result["last"] is not None:
            r.seconds = result["last"] / 1000 - first
            r.throughput = r.delivered / max(1e-9, r.seconds)
            r.offered = r.sent / max(1e-9, max(emitted.values()) - first)
        r.note = f"{len(sims)} simulators, {steps}-step KSampler, " + (
            f"step {step_ms:.2f} ms" if rate else f"closed loop: ≤ {a.window} progress events in flight"
        )
        if idle[1]:
            r.note += f"; simulators idle {100 * idle[0] / idle[1]:.0f}% of the time while tasks waited in the gateway"
        if r.delivered < r.sent:
            r.note += f"; {r.sent - r.delivered} emitted but not delivered in time"
        return r

    async def settle(self, http: Any, http_url: str, tasks: list[tuple[str, str]], *, cancel: bool) -> None:
        """Leave nothing behind for the next phase: cancel what is left (when the time bound ended the phase), then
        wait until every task is terminal in the gateway, so no progress backlog is still on its way."""
        from actors.store import TERMINAL_STATES

        async def state(token: str, tid: str) -> str:
            resp = await http.get(f"{http_url}/api/tasks/{tid}", headers={"Authorization": f"Bearer {token}"})
            return str(resp.json().get("state")) if resp.status_code == 200 else "gone"

        if cancel:
            async with trio.open_nursery() as n:
                for token, tid in tasks:
                    n.start_soon(
                        partial(
                            http.delete, f"{http_url}/api/tasks/{tid}", headers={"Authorization": f"Bearer {token}"}
                        )
                    )
        with trio.move_on_after(COMFY_SETTLE) as scope:
            pending = list(tasks)
            while pending:
                states = [await state(token, tid) for token, tid in pending]
                pending = [t for t, st in zip(pending, states, strict=True) if st not in TERMINAL_STATES]
                if pending:
                    await trio.sleep(0.5)
            await trio.sleep(1.0)  # the last messages reach the clients
        if scope.cancelled_caught:
            self.say(f"  warning: {len(pending)} task(s) still not finished {COMFY_SETTLE:.0f}s after the phase")

    # -- the run

    async def run(self) -> None:
        a = self.a
        rates = a.rate
        paths = a.paths
        if any(p in paths for p in ("hub", "comfy")):
            await self.run_gateway(rates, paths)
        if paths == ["idle"]:  # only connections held idle: gateway, then the bare relay
            await self.run_gateway((), paths)
        if "bare" in paths or paths == ["idle"]:
            self.say("bare relay (Quart-Trio on Hypercorn, one WebSocket message per event)")
            # idle mode: the bare relay and its clients exchange heart-beats as the gateway's do (the fair floor)
            hb = {"heartbeat": IDLE_HEARTBEAT} if paths == ["idle"] else {}
            server, info = await self.start_server("bare", hb)
            try:
                clients = await self.start_clients("bare", server, info)
                try:
                    for rate in rates if paths != ["idle"] else ():
                        self.report(await self.run_injected("bare", {"clients": self.a.clients}, rate, server, clients))
                finally:
                    await clients.stop()
            finally:
                await server.stop()
        if paths == ["idle"]:
            self.say("trio floor (a trio task per raw TCP connection, no HTTP or WebSocket, the same heart-beats)")
            server, info = await self.start_server("floor", {"heartbeat": IDLE_HEARTBEAT})
            try:
                await (await self.start_clients("floor", server, info)).stop()
            finally:
                await server.stop()

    async def run_gateway(self, rates: Sequence[float], paths: Sequence[str]) -> None:
        from fake_comfyui import FakeComfyUI

        a = self.a
        nsims = a.backends or max(2, min(16, math.ceil(max(rates, default=0) * 2 / 1000)))
        sims = [FakeComfyUI(step_ms=0, seed=i, previews=False) for i in range(nsims)]
        async with trio.open_nursery() as nursery:
            for sim in sims:
                await nursery.start(sim.serve)
            self.say(f"gateway (+ {nsims} ComfyUI simulators on the client CPU)")
            server, info = await self.start_server(
                "gateway", {"comfy_urls": [s.url for s in sims], "store": str(self.tmp / "gateway.db")}
            )
            try:
                clients = await self.start_clients("sockjs" if a.sockjs else "stomp", server, info)
                try:
                    await self.wait_backends(sims)
                    for rate in rates if "hub" in paths else ():
                        self.report(await self.run_injected("hub", {"users": self.users}, rate, server, clients))
                    for rate in rates if "comfy" in paths else ():  # last: a backlog would disturb the others
                        self.report(await self.run_comfy(rate, server, clients, sims, info["http"]))
                finally:
                    await clients.stop()
            finally:
                await server.stop()
            nursery.cancel_scope.cancel()

    async def wait_backends(self, sims: list[Any]) -> None:
        """The comfy actors are connected when every simulator has a registered socket."""
        with trio.move_on_after(20):
            while not all(s._sockets for s in sims):  # noqa: ASYNC110 - the simulator has no event for it
                await trio.sleep(0.1)

    def report(self, r: Result) -> None:
        self.results.append(r)
        lat = f"p50 {fmt_ms(r.p50)} p99 {fmt_ms(r.p99)} ms" if r.p50 is not None else "no latency"
        self.say(
            f"  {r.path:5} rate {fmt_rate(r.rate):>5}: {r.delivered}/{r.expected} delivered, "
            f"{r.throughput:,.0f} msgs/s, {lat}, server CPU {r.server_cpu:.2f}s {r.note}"
        )
        for e in r.errors[:5]:
            self.say(f"    client error: {e}")
        if r.profile:
            self.say(f"    server profile ({r.path}, rate {fmt_rate(r.rate)}), top by own time:\n{r.profile}")
