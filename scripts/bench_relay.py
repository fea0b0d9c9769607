#!/usr/bin/env python3
"""Relay benchmark (issue 3): the gateway's push path against a bare Hypercorn WebSocket relay, on this machine.

One run measures, over 127.0.0.1 only, with the server pinned to CPU 0 and every client on CPU 1 (as in
STACK-NOTES §3):

* ``hub``: the gateway (``web.server.serve_gateway``, every actor running) with per-user events injected as
  ``sessions.Publish`` into the sessions hub inside the gateway process: hub -> session -> Outbox -> writer ->
  STOMP MESSAGE -> N @stomp/stompjs clients (Node, ``ws``). This is what the registry does for every event.
* ``comfy``: the same gateway fed by ComfyUI simulators (``scripts/fake_comfyui.py``): every user submits a task
  whose KSampler has M steps, and each step's ``progress`` travels simulator WebSocket -> comfy actor -> registry
  -> hub -> session -> client. The simulators run on CPU 1 with the clients (a ComfyUI is another machine).
* ``bare``: the baseline, a minimal Quart-Trio app on the same Hypercorn: one bounded memory channel and one writer
  task per connection, one WebSocket message per event, no STOMP, no actors; plain ``ws`` clients in Node.

Every message carries its send time (``time.time()``; ComfyUI progress is timed when the simulator emits it) and
the clients take ``performance.timeOrigin + performance.now()`` on arrival: the same host clock. Throughput is
messages delivered / (last arrival - first send). Every load loop is bounded by a count (``--messages`` per
client) and by time (``--seconds``); the run stops by itself.

    .venv/bin/python scripts/bench_relay.py                       # 100 clients, full speed and 5k msgs/s
    .venv/bin/python scripts/bench_relay.py --clients 1000 --messages 100 --rate 5000
    .venv/bin/python scripts/bench_relay.py --paths hub,bare --rate 0 --json results.json
    .venv/bin/python scripts/bench_relay.py --clients 10 --messages 50 --rate 0,1000 --seconds 5 --quiet-wait 0

Needs Node >= 18 with tests/node/node_modules (``scripts/test`` installs it; so does this script, once).
BENCHMARKS.md has the numbers of a run and how to read them.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import math
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import trio  # noqa: E402

NODE_DIR = ROOT / "tests" / "node"
WORKFLOW = ROOT / "tests" / "data" / "workflows" / "txt2img.json"
SECRET = b"bench-relay-secret-0123456789abcdef"
CLIENT_ID = "c1"
PATHS = ("hub", "comfy", "bare")
DRAIN_GRACE = 10.0  # seconds the clients keep counting after the senders' time bound
MAX_SAMPLER_STEPS = 10_000  # ComfyUI's KSampler "steps" maximum
COMFY_SETTLE = 120.0  # seconds to wait for the tasks of a comfy phase to end (a backlog drains first)
THROTTLE_MS = 20.0  # simulator step while too many events are in flight (comfy path at "max")
TICK_MS = 10  # how often the clients report their count (comfy path at "max")
SERVER_START = 60.0  # seconds a server process has to start listening
QUIET_BUSY = 0.15  # CPU seconds per second (both cores) below which the machine counts as quiet
IDLE_SECONDS = 3.0  # how long the server's idle CPU with N connections is measured
CONNECT_BATCH = 50  # clients connecting at once (Hypercorn's listen backlog is 100)


# =============================================================================================================
# The clients: one Node process, N connections (STOMP over `ws` with @stomp/stompjs, or bare `ws`)
# =============================================================================================================

NODE_CLIENT = r"""
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';
import readline from 'node:readline';
import { readFileSync } from 'node:fs';

const now = () => performance.timeOrigin + performance.now();  // ms since the epoch, sub-ms resolution
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const cfg = JSON.parse(readFileSync(process.argv[process.argv.length - 1], 'utf8'));
const n = cfg.tokens.length;
const perClient = new Array(n).fill(0);
const errors = [];
let closed = 0;
let phase = null;
const err = (s) => { if (errors.length < 20) errors.push(String(s)); };

function onMessage(i, text) {
  const t = now();
  if (phase === null) return;
  let m;
  try { m = JSON.parse(text); } catch (e) { phase.bad++; return; }
  phase.total++;
  if (m.type === 'bench') {
    phase.lat.push(Math.round((t - m.t / 1000) * 1000) / 1000);
  } else if (m.type === 'progress') {
    phase.recs.push([m.prompt_id, m.value, t]);
  } else {
    return;
  }
  perClient[i]++;
  phase.count++;
  if (phase.first === null) phase.first = t;
  phase.last = t;
  if (phase.count >= phase.expect) finish();
}

function finish() {
  if (phase === null) return;
  const p = phase;
  phase = null;
  clearTimeout(p.timer);
  if (p.ticker) clearInterval(p.ticker);
  const cpu = process.cpuUsage(p.cpu0);
  let lo = Infinity, hi = 0;
  for (const c of perClient) { lo = Math.min(lo, c); hi = Math.max(hi, c); }
  out({ event: 'result', count: p.count, total: p.total, bad: p.bad, first: p.first, last: p.last, wsMessages: p.wsMessages,
        lat: p.lat, recs: p.recs, perClientMin: lo, perClientMax: hi, closed, errors,
        cpu: (cpu.user + cpu.system) / 1e6, wall: (now() - p.t0) / 1000 });
}

function connectStomp(i) {
  return new Promise((resolve, reject) => {
    const c = new Client({
      webSocketFactory: () => {
        const ws = new WebSocket(cfg.url, ['v12.stomp', 'v11.stomp', 'v10.stomp'], { perMessageDeflate: false });
        ws.on('message', () => { if (phase) phase.wsMessages++; });  // to see how many frames one message packs
        return ws;
      },
      connectHeaders: { Authorization: 'Bearer ' + cfg.tokens[i], clientId: cfg.clientId },
      reconnectDelay: 0, heartbeatIncoming: 10000, heartbeatOutgoing: 10000, debug: () => {},
    });
    let up = false;
    c.onConnect = () => {
      const receipt = 'sub-' + i;
      c.watchForReceipt(receipt, () => { up = true; resolve(c); });
      c.subscribe('/user/topic/messages', (msg) => onMessage(i, msg.body), { id: 'sub-0', receipt });
    };
    c.onStompError = (f) => { err(`client ${i}: ERROR ${f.headers.message}`); if (!up) reject(new Error(f.headers.message)); };
    c.onWebSocketClose = (ev) => { closed++; if (!up) reject(new Error(`client ${i}: closed ${ev.code}`)); };
    c.onWebSocketError = () => { if (!up) reject(new Error(`client ${i}: socket error`)); };
    c.activate();
  });
}

function connectBare(i) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(cfg.url + '?u=' + i, { perMessageDeflate: false });
    let up = false;
    ws.on('message', (data) => {
      const s = data.toString();
      if (!up) { if (s === 'hello') { up = true; resolve(ws); } return; }
      if (phase) phase.wsMessages++;
      onMessage(i, s);
    });
    ws.on('close', (code) => { closed++; if (!up) reject(new Error(`client ${i}: closed ${code}`)); });
    ws.on('error', (e) => { err(`client ${i}: ${e.message}`); if (!up) reject(e); });
  });
}

const conns = [];
async function main() {
  const connect = cfg.mode === 'stomp' ? connectStomp : connectBare;
  const t0 = now();
  for (let i = 0; i < n; i += cfg.batch) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + cfg.batch); j++) batch.push(connect(j));
    conns.push(...await Promise.all(batch));
  }
  out({ event: 'ready', seconds: (now() - t0) / 1000, clockSkewMs: Date.now() - now() });
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'measure') {
    phase = { expect: cmd.expect, count: 0, total: 0, bad: 0, wsMessages: 0, first: null, last: null, lat: [], recs: [],
              t0: now(), cpu0: process.cpuUsage(), timer: setTimeout(finish, cmd.deadlineMs),
              ticker: cmd.tickMs ? setInterval(() => { if (phase) out({ event: 'tick', count: phase.count }); }, cmd.tickMs) : null };
    perClient.fill(0);
    out({ event: 'armed' });
  } else if (cmd.cmd === 'quit') {
    for (const c of conns) { try { cfg.mode === 'stomp' ? c.deactivate() : c.close(); } catch (e) {} }
    setTimeout(() => process.exit(0), 300);
  }
}).on('close', () => process.exit(0));

main().catch((e) => { out({ event: 'failed', error: String(e && e.message || e), errors }); process.exit(1); });
"""


# =============================================================================================================
# Helpers shared by the roles
# =============================================================================================================


class Lines:
    """Newline-delimited JSON over a trio receive stream."""

    def __init__(self, stream: Any, name: str) -> None:
        self.stream = stream
        self.name = name
        self.buf = bytearray()

    async def next(self) -> dict[str, Any]:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                if line.strip():
                    return json.loads(line)
                continue
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError(f"{self.name} ended")
            self.buf += chunk



def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def gc_top_types(n: int) -> list[tuple[str, int]]:
    """The most common types among the objects the cyclic GC tracks (what a full collection has to scan)."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:n]


def calibrate() -> float:
    """µs per json.dumps of a 100-byte body on this core: to compare machines (and runs) with each other."""
    body = bench_body(12345, 100)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10_000):
            json.dumps(body, separators=(",", ":"))
        best = min(best, (time.perf_counter() - t) / 10_000 * 1e6)
    return round(best, 2)


def bench_body(k: int, size: int) -> dict[str, Any]:
    """A message of exactly ``size`` JSON bytes (when size allows): its send time in µs since the epoch."""
    t = int(time.time() * 1e6)
    base = 40 + len(str(t)) + len(str(k))  # {"type":"bench","t":T,"k":K,"pad":""}
    return {"type": "bench", "t": t, "k": k, "pad": "x" * max(0, size - base)}


async def inject(send: Any, make: Any, users: Sequence[Any], count: int, rate: float, seconds: float) -> dict[str, Any]:
    """Send ``count`` messages round-robin over ``users`` at ``rate`` msgs/s (0: as fast as ``send`` allows),
    stopping after ``seconds`` in any case. Returns what was sent and when (wall clock)."""
    t0 = time.time()
    start = trio.current_time()
    deadline = start + seconds
    n = len(users)
    k = 0
    while k < count and trio.current_time() < deadline:
        if rate > 0:
            due = min(count, int((trio.current_time() - start) * rate) + 1)
            if k >= due:
                await trio.sleep_until(start + k / rate)
                continue
        else:
            due = count
        while k < due:
            await send(users[k % n], make(k))
            k += 1
            if not k & 255 and trio.current_time() >= deadline:
                break
    return {"sent": k, "t0": t0, "t1": time.time()}


async def control_loop(handle: Any, shutdown: trio.Event) -> None:
    """A server process's commands, one JSON line each on stdin; answers on stdout."""
    stdin = Lines(trio.lowlevel.FdStream(os.dup(0)), "stdin")
    prof: cProfile.Profile | None = None
    cpu0 = 0.0
    gc_pauses: list[float] = []  # seconds per full (generation 2) collection during the phase
    gc_started = 0.0

    def gc_watch(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started
        if info["generation"] == 2:
            if phase == "start":
                gc_started = time.perf_counter()
            else:
                gc_pauses.append(time.perf_counter() - gc_started)

    gc.callbacks.append(gc_watch)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        while True:
            cmd = await stdin.next()
            if cmd["cmd"] == "begin":
                t = os.times()
                cpu0 = t.user + t.system
                gc_pauses.clear()
                if cmd.get("profile"):
                    prof = cProfile.Profile()  # wall clock (cheap): only meaningful when "others" is ~0%
                    prof.enable()
                reply({"event": "begun"})
            elif cmd["cmd"] == "end":
                text = ""
                if prof is not None:
                    prof.disable()
                    buf = io.StringIO()
                    stats = pstats.Stats(prof, stream=buf)
                    stats.sort_stats("tottime").print_stats(25)
                    stats.sort_stats("cumtime").print_stats(r"/(actors|web)/", 25)  # the gateway's own code
                    text = buf.getvalue()
                    prof = None
                t = os.times()
                reply({"event": "ended", "cpu": t.user + t.system - cpu0, "profile": text, "rss_kb": rss_kb(),
                       "gc_full": len(gc_pauses), "gc_full_max_ms": round(1000 * max(gc_pauses, default=0.0), 1),
                       "gc_full_total_ms": round(1000 * sum(gc_pauses), 1), "gc_objects": len(gc.get_objects()),
                       "gc_top_types": gc_top_types(8)})
            elif cmd["cmd"] == "gc_freeze":
                gc.collect()
                gc.freeze()  # the objects alive now (the connections) are never scanned again
                reply({"event": "frozen", "frozen": gc.get_freeze_count()})
            elif cmd["cmd"] == "stats":
                t = os.times()
                reply({"event": "stats", "cpu": t.user + t.system, "rss_kb": rss_kb()})
            elif cmd["cmd"] == "inject":
                reply({"event": "injected", **await handle(cmd)})
            elif cmd["cmd"] == "quit":
                break
    except EOFError:
        pass
    finally:
        shutdown.set()


# =============================================================================================================
# Server role 1: the gateway (runs on CPU 0)
# =============================================================================================================


async def gateway_server(cfg: dict[str, Any]) -> None:
    import web.server as server_mod
    from actors.comfy import RestartPolicy
    from actors.gateway import GatewayConfig
    from actors.sessions import Publish
    from web.config import WebConfig

    # serve_gateway keeps its Handles to itself: catch them on their way into create_app (the real server runs)
    handles: list[Any] = []
    create_app = server_mod.create_app

    def capture(h: Any, *args: Any, **kw: Any) -> Any:
        handles.append(h)
        return create_app(h, *args, **kw)

    server_mod.create_app = capture
    gw = GatewayConfig(
        comfyui_urls=tuple(cfg["comfy_urls"]), store_path=cfg["store"], initial_credits=10**9, price=1,
        max_queued_per_user=64, comfy_policy=RestartPolicy(initial_delay=0.05, max_delay=0.5, max_restarts=1000,
                                                           window=60.0, healthy_after=5.0),
    )
    web = WebConfig(bind="127.0.0.1:0")
    shutdown = trio.Event()

    async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        hub = handles[0].sessions
        size = cmd["size"]

        async def send(user: str, body: dict[str, Any]) -> None:
            await hub.send(Publish(user, CLIENT_ID, body))

        return await inject(send, partial(bench_body, size=size), cmd["users"], cmd["count"], cmd["rate"], cmd["seconds"])

    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(server_mod.serve_gateway, gw, web, secret=SECRET, shutdown=shutdown))
        print(json.dumps({"event": "listening", "url": running.url.replace("http://", "ws://") + "/ws",
                          "http": running.url, "pid": os.getpid(), "calibration_us": calibrate()}), flush=True)
        await control_loop(handle, shutdown)


# =============================================================================================================
# Server role 2: the bare relay (runs on CPU 0)
# =============================================================================================================


async def bare_server(cfg: dict[str, Any]) -> None:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve
    from quart import websocket
    from quart_trio import QuartTrio

    from web.server import set_permessage_deflate

    set_permessage_deflate(False)  # as the gateway (the clients do not offer it anyway)
    app = QuartTrio("bare_relay")
    conns: dict[int, trio.MemorySendChannel[str]] = {}

    @app.websocket("/ws")
    async def ws() -> None:
        u = int(websocket.args.get("u", "-1"))
        await websocket.accept()
        tx, rx = trio.open_memory_channel[str](1000)  # STACK-NOTES §3: a bounded channel + a writer
        conns[u] = tx
        try:
            await websocket.send("hello")
            async for msg in rx:
                await websocket.send(msg)
        finally:
            if conns.get(u) is tx:
                del conns[u]

    async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        size = cmd["size"]

        def make(k: int) -> str:
            return json.dumps(bench_body(k, size), separators=(",", ":"))

        async def send(u: int, msg: str) -> None:
            tx = conns.get(u)
            if tx is not None:
                await tx.send(msg)

        return await inject(send, make, list(range(cmd["clients"])), cmd["count"], cmd["rate"], cmd["seconds"])

    hc = HypercornConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 1
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, hc, shutdown_trigger=shutdown.wait))  # type: ignore[arg-type]
        port = int(binds[0].rsplit(":", 1)[1])
        print(json.dumps({"event": "listening", "url": f"ws://127.0.0.1:{port}/ws", "pid": os.getpid(),
                          "calibration_us": calibrate()}), flush=True)
        await control_loop(handle, shutdown)


# =============================================================================================================
# The driver (runs on CPU 1, with the clients and the ComfyUI simulators)
# =============================================================================================================


class Proc:
    """A child process speaking JSON lines on stdin/stdout; its stderr goes to a log file."""

    def __init__(self, name: str, proc: trio.Process, log_path: Path, nursery: trio.Nursery) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.ticks = 0  # the clients' running count of the current phase (`tick` events)
        self._tx, self._rx = trio.open_memory_channel[dict[str, Any]](math.inf)
        assert proc.stdout is not None
        nursery.start_soon(self._pump, Lines(proc.stdout, name))

    async def _pump(self, lines: Lines) -> None:
        with self._tx:
            try:
                while True:
                    msg = await lines.next()
                    if msg.get("event") == "tick":
                        self.ticks = msg["count"]
                    else:
                        self._tx.send_nowait(msg)
            except (EOFError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                try:
                    msg = await self._rx.receive()
                except trio.EndOfChannel:
                    raise EOFError(f"{self.name} ended:\n{self.log_tail()}") from None
                if msg.get("event") == event:
                    return msg
                if msg.get("event") == "failed":
                    raise RuntimeError(f"{self.name} failed: {msg}")

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all((json.dumps(obj) + "\n").encode())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        try:
            with trio.move_on_after(2):
                await self.send({"cmd": "quit"})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        with trio.move_on_after(10):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Result:
    path: str
    rate: float
    clients: int
    size: int
    expected: int
    sent: int = 0
    delivered: int = 0
    other: int = 0  # messages delivered that are not the measured ones (task lifecycle, in `comfy`)
    seconds: float = 0.0
    offered: float = 0.0  # msgs/s actually sent
    throughput: float = 0.0  # msgs/s delivered
    p50: float | None = None  # ms
    p99: float | None = None
    p999: float | None = None
    max: float | None = None
    server_cpu: float = 0.0  # seconds
    client_cpu: float = 0.0
    driver_cpu: float = 0.0  # this process: the ComfyUI simulators (comfy path) and the driver
    other_cpu: float = 0.0  # CPU seconds used by processes other than ours during the phase (should be ~0)
    other_cpu_server_core: float | None = None  # the part of it on the server's core (when pinned)
    busy: dict[str, float] = field(default_factory=dict)  # CPU seconds used per core during the phase
    wall: float = 0.0  # seconds the phase lasted for the clients
    server: dict[str, Any] = field(default_factory=dict)  # RSS and full GC pauses of the server during the phase
    per_client: tuple[int, int] = (0, 0)
    ws_messages: int = 0  # WebSocket messages the clients received (STOMP frames per message = coalescing)
    closed: int = 0
    errors: list[str] = field(default_factory=list)
    note: str = ""
    profile: str = ""

    @property
    def server_us_per_msg(self) -> float | None:
        return 1e6 * self.server_cpu / self.delivered if self.delivered else None


def cpu_busy() -> dict[int, float]:
    """CPU seconds spent (not idle) per core since boot, from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    busy: dict[int, float] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals]
                    busy[int(name[3:])] = (sum(v[:8]) - v[3] - v[4]) / tick  # all but idle and iowait
    except OSError:
        pass
    return busy


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/PID/stat (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def fill_latency(r: Result, lat: list[float]) -> None:
    lat.sort()
    r.p50, r.p99, r.p999, r.max = (percentile(lat, q) for q in (0.5, 0.99, 0.999, 1.0))


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


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
        logf = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        proc = await trio.lowlevel.open_process(
            pin(cpu) + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
            cwd=str(NODE_DIR if argv[0] == "node" else ROOT),
        )
        logf.close()
        p = Proc(name, proc, log_path, self.nursery)
        self.procs.append(p)
        return p

    async def start_server(self, role: str, cfg: dict[str, Any]) -> tuple[Proc, dict[str, Any]]:
        p = await self.spawn(role, [sys.executable, __file__, "--role", role, json.dumps(cfg)], self.server_cpu_id)
        try:
            info = await p.expect("listening", SERVER_START)
        except (EOFError, trio.TooSlowError) as exc:
            raise RuntimeError(f"{role} did not start ({exc}):\n{p.log_tail()}") from None
        return p, info

    async def start_clients(self, mode: str, server: Proc, info: dict[str, Any]) -> Proc:
        """Connect the N clients; measure the server's memory per connection and its CPU while they idle."""
        await server.send({"cmd": "stats"})
        before = await server.expect("stats", 10)
        cfg = {"mode": mode, "url": info["url"], "tokens": self.tokens, "clientId": CLIENT_ID, "batch": CONNECT_BATCH}
        cfg_path = self.tmp / f"clients-{mode}.json"
        cfg_path.write_text(json.dumps(cfg))
        p = await self.spawn(f"clients-{mode}", ["node", "--input-type=module", "-e", NODE_CLIENT, str(cfg_path)],
                             self.client_cpu_id)
        try:
            ready = await p.expect("ready", 30 + self.a.clients / 20)
        except (EOFError, trio.TooSlowError, RuntimeError) as exc:
            raise RuntimeError(f"the {mode} clients did not connect ({exc}):\n{p.log_tail()}") from None
        await trio.sleep(1)
        await server.send({"cmd": "stats"})
        connected = await server.expect("stats", 10)
        await trio.sleep(IDLE_SECONDS)
        await server.send({"cmd": "stats"})
        idle = await server.expect("stats", 10)
        setup = {
            "connect_seconds": round(ready["seconds"], 2),
            "rss_before_mb": round(before["rss_kb"] / 1024, 1),
            "rss_connected_mb": round(connected["rss_kb"] / 1024, 1),
            "kb_per_connection": round((connected["rss_kb"] - before["rss_kb"]) / self.a.clients, 1),
            "idle_cpu_percent": round(100 * (idle["cpu"] - connected["cpu"]) / IDLE_SECONDS, 1),
            "calibration_us": info["calibration_us"],
        }
        if self.a.gc_freeze:
            await server.send({"cmd": "gc_freeze"})
            setup["gc_frozen_objects"] = (await server.expect("frozen", 30))["frozen"]
        self.setup["gateway" if mode == "stomp" else "bare"] = setup
        self.say(f"  {self.a.clients} {mode} clients connected in {setup['connect_seconds']}s; server RSS "
                 f"{setup['rss_before_mb']} -> {setup['rss_connected_mb']} MB ({setup['kb_per_connection']} KB per "
                 f"connection), idle CPU {setup['idle_cpu_percent']}%; json.dumps(100 B) {info['calibration_us']} µs")
        return p

    async def measure(self, r: Result, server: Proc, clients: Proc, run_load: Any, tick_ms: int = 0) -> tuple[dict[str, Any], Any]:
        """begin (server CPU, profile) -> arm the clients -> run the load -> wait for the clients -> end."""
        await self.wait_quiet()
        await server.send({"cmd": "begin", "profile": self.a.profile})
        await server.expect("begun", 10)
        clients.ticks = 0
        await clients.send({"cmd": "measure", "expect": r.expected, "tickMs": tick_ms,
                            "deadlineMs": int(1000 * (self.a.seconds + DRAIN_GRACE))})
        await clients.expect("armed", 10)
        d0, c0 = os.times(), cpu_busy()
        load = await run_load()
        result = await clients.expect("result", self.a.seconds + DRAIN_GRACE + 30)
        d1, c1 = os.times(), cpu_busy()
        await server.send({"cmd": "end"})
        ended = await server.expect("ended", 30)
        r.server_cpu = ended["cpu"]
        r.server = {k: ended[k] for k in ("rss_kb", "gc_full", "gc_full_max_ms", "gc_full_total_ms", "gc_objects",
                                          "gc_top_types")}
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

    async def run_hub(self, rate: float, server: Proc, clients: Proc) -> Result:
        a = self.a
        r = Result("hub", rate, a.clients, a.size, a.clients * a.messages)

        async def load() -> dict[str, Any]:
            await server.send({"cmd": "inject", "users": self.users, "count": r.expected, "rate": rate,
                               "size": a.size, "seconds": a.seconds})
            return await server.expect("injected", a.seconds + 30)

        result, sent = await self.measure(r, server, clients, load)
        self.finish_timed(r, result, sent)
        return r

    async def run_bare(self, rate: float, server: Proc, clients: Proc) -> Result:
        a = self.a
        r = Result("bare", rate, a.clients, a.size, a.clients * a.messages)

        async def load() -> dict[str, Any]:
            await server.send({"cmd": "inject", "clients": a.clients, "count": r.expected, "rate": rate,
                               "size": a.size, "seconds": a.seconds})
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
        emitted: dict[tuple[str, int], float] = {}
        for sim in sims:
            sim.step_ms = step_ms
            sim._send_json = partial(self.timed_send, sim._send_json, emitted)  # time each progress as it leaves
        wf = json.loads(WORKFLOW.read_text())
        for node in wf.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = steps
        tasks: list[tuple[str, str]] = []  # (token, taskId)

        async with httpx.AsyncClient(timeout=30) as http:

            async def submit_all() -> None:
                limit = trio.CapacityLimiter(16)

                async def one(i: int) -> None:
                    async with limit:
                        resp = await http.post(f"{http_url}/api/tasks", json={"clientId": CLIENT_ID, "workflow": wf},
                                               headers={"Authorization": f"Bearer {self.tokens[i]}"})
                        if resp.status_code != 202:
                            raise RuntimeError(f"submit for {self.users[i]}: {resp.status_code} {resp.text}")
                        tasks.append((self.tokens[i], resp.json()["taskId"]))

                for _ in range(tasks_per_user):  # round after round (the scheduler is fair anyway)
                    async with trio.open_nursery() as n:
                        for i in range(a.clients):
                            n.start_soon(one, i)

            async def throttle() -> None:
                while True:
                    backlog = len(emitted) - clients.ticks
                    for sim in sims:
                        sim.step_ms = THROTTLE_MS if backlog >= a.window else 0.0
                    await trio.sleep(0.005)

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
                    helpers.start_soon(throttle)
                result, _ = await self.measure(r, server, clients, load, tick_ms=TICK_MS if rate == 0 else 0)
                helpers.cancel_scope.cancel()
            for sim in sims:
                sim.step_ms = 0.0
            await self.settle(http, http_url, tasks, cancel=result["count"] < r.expected)
        for sim in sims:
            del sim._send_json
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
            f"step {step_ms:.2f} ms" if rate else f"closed loop: ≤ {a.window} progress events in flight")
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
                    n.start_soon(partial(http.delete, f"{http_url}/api/tasks/{tid}",
                                         headers={"Authorization": f"Bearer {token}"}))
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

    @staticmethod
    def timed_send(orig: Any, emitted: dict[tuple[str, int], float], event: str, data: Any, sid: Any) -> None:
        if event == "progress":
            emitted[(data["prompt_id"], data["value"])] = time.time()
        orig(event, data, sid)

    # -- the run

    async def run(self) -> None:
        a = self.a
        rates = a.rate
        paths = a.paths
        if any(p in paths for p in ("hub", "comfy")):
            await self.run_gateway(rates, paths)
        if "bare" in paths:
            self.say("bare relay (Quart-Trio on Hypercorn, one WebSocket message per event)")
            server, info = await self.start_server("bare", {})
            try:
                clients = await self.start_clients("bare", server, info)
                try:
                    for rate in rates:
                        self.report(await self.run_bare(rate, server, clients))
                finally:
                    await clients.stop()
            finally:
                await server.stop()

    async def run_gateway(self, rates: Sequence[float], paths: Sequence[str]) -> None:
        from fake_comfyui import FakeComfyUI

        a = self.a
        nsims = a.backends or max(2, min(16, math.ceil(max(rates) * 2 / 1000)))
        sims = [FakeComfyUI(step_ms=0, seed=i, previews=False) for i in range(nsims)]
        async with trio.open_nursery() as nursery:
            for sim in sims:
                await nursery.start(sim.serve)
            self.say(f"gateway (+ {nsims} ComfyUI simulators on the client CPU)")
            server, info = await self.start_server("gateway", {"comfy_urls": [s.url for s in sims],
                                                               "store": str(self.tmp / "gateway.db")})
            try:
                clients = await self.start_clients("stomp", server, info)
                try:
                    await self.wait_backends(sims)
                    for rate in rates if "hub" in paths else ():
                        self.report(await self.run_hub(rate, server, clients))
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
            while not all(s._sockets for s in sims):
                await trio.sleep(0.1)

    def report(self, r: Result) -> None:
        self.results.append(r)
        lat = f"p50 {fmt_ms(r.p50)} p99 {fmt_ms(r.p99)} ms" if r.p50 is not None else "no latency"
        self.say(f"  {r.path:5} rate {fmt_rate(r.rate):>5}: {r.delivered}/{r.expected} delivered, "
                 f"{r.throughput:,.0f} msgs/s, {lat}, server CPU {r.server_cpu:.2f}s {r.note}")
        for e in r.errors[:5]:
            self.say(f"    client error: {e}")
        if r.profile:
            self.say(f"    server profile ({r.path}, rate {fmt_rate(r.rate)}), top by own time:\n{r.profile}")


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def fmt_rate(rate: float) -> str:
    return "max" if rate == 0 else f"{rate:g}"


LABELS = {"hub": "gateway, hub → client", "comfy": "gateway, ComfyUI → client", "bare": "bare Hypercorn relay"}


def table(results: list[Result], setup: dict[str, dict[str, Any]]) -> str:
    bare = {r.rate: r for r in results if r.path == "bare"}
    head = ("path", "target/s", "sent/s", "delivered/sent", "msgs/s", "p50 ms", "p99 ms", "max ms", "srv CPU",
            "µs/msg", "frames/WS", "cli CPU", "others", "× bare msgs/s", "× bare p99")
    rows = [head]
    for r in results:
        b = bare.get(r.rate)
        wall = max(r.wall, 1e-9)
        ratio_t = f"{r.throughput / b.throughput:.2f}" if b and b.throughput and r.path != "bare" else ""
        ratio_p = f"{r.p99 / b.p99:.2f}" if b and b.p99 and r.p99 is not None and r.path != "bare" else ""
        rows.append((
            LABELS[r.path], fmt_rate(r.rate), f"{r.offered:,.0f}", f"{r.delivered}/{r.sent}", f"{r.throughput:,.0f}",
            fmt_ms(r.p50), fmt_ms(r.p99), fmt_ms(r.max), f"{100 * r.server_cpu / wall:.0f}%",
            f"{r.server_us_per_msg:.1f}" if r.server_us_per_msg else "-",
            f"{(r.delivered + r.other) / r.ws_messages:.2f}" if r.ws_messages else "-",
            f"{100 * (r.client_cpu + (r.driver_cpu if r.path == 'comfy' else 0)) / wall:.0f}%",
            (f"{100 * r.other_cpu / wall:.0f}%" if r.other_cpu_server_core is None else
             f"{100 * r.other_cpu_server_core / wall:.0f}% / {100 * r.other_cpu / wall:.0f}%"), ratio_t, ratio_p,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        "msgs/s = delivered / (last arrival - first send); latency = arrival - send time, same host clock.",
        "srv CPU = server process CPU / phase wall time (100% = its core saturated); µs/msg = server CPU per delivered",
        "message; frames/WS = messages per WebSocket message (the gateway's coalescing); cli CPU = Node clients",
        "(+ the simulators for ComfyUI → client); others = CPU used by processes that are not part of the benchmark,",
        "on the server's core / on both cores (should be ~0%: otherwise the figures are disturbed).",
    ]
    for r in results:
        sv = r.server
        lines.append(f"{LABELS[r.path]} at {fmt_rate(r.rate)}: server RSS {sv['rss_kb'] / 1024:.0f} MB after the phase, "
                     f"{sv['gc_objects']:,} objects tracked by the GC (most: "
                     f"{', '.join(f'{k} {v:,}' for k, v in sv['gc_top_types'][:3])}), {sv['gc_full']} full "
                     f"collection(s) (longest {sv['gc_full_max_ms']} ms)" + (f"; {r.note}" if r.note else ""))
    for name, st in setup.items():
        lines.append(f"{name}: {st['rss_before_mb']} -> {st['rss_connected_mb']} MB RSS with the clients connected "
                     f"({st['kb_per_connection']} KB per connection), idle CPU {st['idle_cpu_percent']}%, "
                     f"json.dumps(100 B) {st['calibration_us']} µs on the server core")
    def share(r: Result) -> float:  # what disturbs the server: others on its core (on any core when not pinned)
        other = r.other_cpu if r.other_cpu_server_core is None else r.other_cpu_server_core
        return other / max(r.wall, 1e-9)

    noisy = [r for r in results if share(r) > 0.10]
    if noisy:
        lines.append(f"WARNING: other processes used > 10% of the server's core during {len(noisy)} phase(s) "
                     f"({', '.join(f'{r.path} at {fmt_rate(r.rate)}' for r in noisy)}): rerun on a quiet machine.")
    busy_clients = [r for r in results if r.other_cpu / max(r.wall, 1e-9) > 0.10 and r not in noisy]
    if busy_clients:
        lines.append(f"note: other processes shared the clients' core during {len(busy_clients)} phase(s); that only "
                     "matters if the clients could not keep up (cli CPU + others near 100%).")
    return "\n".join(lines)


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r < 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--rate must be numbers >= 0, comma-separated, not {text!r}")
    return rates


def parse_paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        raise argparse.ArgumentTypeError(f"--paths must be among {','.join(PATHS)}, not {text!r}")
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100, help="client connections, one user each (default 100)")
    p.add_argument("--messages", type=int, default=500, help="messages per client per phase (default 500)")
    p.add_argument("--rate", type=parse_rates, default=[0.0, 5000.0],
                   help="total msgs/s, 0 = as fast as possible; a comma list runs each (default 0,5000)")
    p.add_argument("--size", type=int, default=100, help="JSON body bytes of the hub and bare messages (default 100)")
    p.add_argument("--seconds", type=float, default=20.0, help="time bound of each phase's sending (default 20)")
    p.add_argument("--paths", type=parse_paths, default=list(PATHS), help="which of hub,comfy,bare (default all)")
    p.add_argument("--backends", type=int, default=0,
                   help="ComfyUI simulators for the comfy path (default: enough for steps >= 2 ms at the top rate)")
    p.add_argument("--window", type=int, default=1000,
                   help="comfy path at max rate: progress events allowed in flight (default 1000)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each phase, wait up to this many seconds for other processes to go quiet (default 60)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="experiment: gc.freeze() in the server once the clients are connected (what GC pauses cost)")
    p.add_argument("--profile", action="store_true", help="cProfile the server process per phase (slows it ~2x)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the clients to CPU 1")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the results as one JSON document to PATH (and still print the table), or alone: "
                        "print the JSON on stdout instead of the table")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("role_config", nargs="?", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.clients < 1 or a.messages < 1 or a.seconds <= 0 or a.size < 0:
        p.error("--clients and --messages must be >= 1, --seconds > 0, --size >= 0")
    return a


def code_version() -> str:
    """The commit measured (and whether the tree differs from it), or "" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + (" + uncommitted changes" if dirty else "")


def ensure_node() -> None:
    if not shutil.which("node"):
        raise SystemExit("bench_relay: `node` (>= 18) is needed for the clients")
    if not (NODE_DIR / "node_modules" / "@stomp" / "stompjs").is_dir():
        print("bench_relay: installing tests/node packages (npm install)", file=sys.stderr)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)


async def drive(a: argparse.Namespace) -> Driver:
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        d = Driver(a, Path(tmp))
        pinned = "server on CPU 0, clients on CPU 1" if d.server_cpu_id is not None else "not pinned"
        d.say(f"bench_relay: {a.clients} clients, {a.messages} msgs each, rates {[fmt_rate(r) for r in a.rate]}, "
              f"{a.size} B, ≤ {a.seconds:g}s per phase; {pinned}; {os.cpu_count()} CPUs; code {code_version() or '?'}")
        async with trio.open_nursery() as nursery:
            d.nursery = nursery
            await d.run()
            nursery.cancel_scope.cancel()
        return d


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.role:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        cfg = json.loads(a.role_config or "{}")
        trio.run(gateway_server if a.role == "gateway" else bare_server, cfg)
        return 0
    logging.basicConfig(level=logging.WARNING)
    ensure_node()
    d = trio.run(drive, a)
    results = d.results
    if a.json:
        doc = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "node": subprocess.run(
                ["node", "--version"], capture_output=True, text=True).stdout.strip()},
            "code": code_version(),
            "args": {k: v for k, v in vars(a).items() if k not in ("role", "role_config")},
            "setup": d.setup,
            "results": [{**{k: v for k, v in r.__dict__.items() if k != "profile"},
                         "server_us_per_msg": r.server_us_per_msg, "label": LABELS[r.path]} for r in results],
        }
        if a.json == "-":
            print(json.dumps(doc, indent=2))
        else:
            Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
    if a.json != "-":
        print(table(results, d.setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
