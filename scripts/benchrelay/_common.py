"""Constants and the helpers both the driver and the server roles use."""

from __future__ import annotations

import cProfile
import gc
import io
import json
import math
import os
import pstats
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent.parent
DESCRIPTION = "Relay benchmark: the gateway's push path against a bare Hypercorn WebSocket relay, on this machine."
SCRIPT = ROOT / "scripts" / "bench_relay.py"  # the server roles run it again with --role
CLIENTS_JS = ROOT / "scripts" / "bench_relay_clients.mjs"
NODE_DIR = ROOT / "tests" / "node"
WORKFLOW = ROOT / "tests" / "data" / "workflows" / "txt2img.json"
SECRET = b"bench-relay-secret-0123456789abcdef"
CLIENT_ID = "c1"
PATHS = ("hub", "comfy", "bare", "idle")  # "idle": connect, subscribe, hold --idle-seconds; no phases
DRAIN_GRACE = 10.0  # seconds the clients keep counting after the senders' time bound
MAX_SAMPLER_STEPS = 10_000  # ComfyUI's KSampler "steps" maximum
COMFY_SETTLE = 120.0  # seconds to wait for the tasks of a comfy phase to end (a backlog drains first)
THROTTLE_MS = 20.0  # simulator step while too many events are in flight (comfy path at "max")
TICK_MS = 10  # how often the clients report their count (comfy path at "max")
SERVER_START = 60.0  # seconds a server process has to start listening
QUIET_BUSY = 0.15  # CPU seconds per second (both cores) below which the machine counts as quiet
IDLE_HEARTBEAT = 10.0  # idle mode: the bare relay's heart-beat period each way (the stompjs clients ask 10 s)
IDLE_SECONDS = 3.0  # default of --idle-seconds: how long the server's idle CPU with N connections is measured
CONNECT_BATCH = 50  # clients connecting at once (Hypercorn's listen backlog is 100)


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


def announce(url: str, **extra: Any) -> None:
    """A server process's first line on stdout: where its clients connect, its pid and the core's calibration."""
    info = {"event": "listening", "url": url, **extra, "pid": os.getpid(), "calibration_us": calibrate()}
    print(json.dumps(info), flush=True)


async def control_loop(handle: Any, shutdown: trio.Event) -> None:
    """A server process's commands, one JSON line each on stdin; answers on stdout."""
    stdin = Lines(trio.lowlevel.FdStream(os.dup(0)), "stdin")
    prof: cProfile.Profile | None = None
    cpu0 = 0.0
    gc_pauses: list[float] = []  # seconds per full (generation 2) collection during the phase
    gc_any_max = 0.0  # the longest collection of any generation during the phase
    gc_total = 0.0  # seconds spent in collections of any generation during the phase
    gc_started = 0.0

    def gc_watch(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started, gc_any_max, gc_total
        if phase == "start":
            gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - gc_started
        gc_any_max = max(gc_any_max, pause)
        gc_total += pause
        if info["generation"] == 2:
            gc_pauses.append(pause)

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
                gc_any_max = gc_total = 0.0
                if cmd.get("profile"):
                    prof = cProfile.Profile()  # wall clock (cheap): only meaningful when "others" is ~0%
                    prof.enable()
                reply({"event": "begun"})
            elif cmd["cmd"] == "end":
                text = ""
                if prof is not None:
                    prof.disable()
                    if os.environ.get("BENCH_PROFILE_DUMP"):  # the raw stats, for pstats/snakeviz
                        prof.dump_stats(os.environ["BENCH_PROFILE_DUMP"])
                    buf = io.StringIO()
                    stats = pstats.Stats(prof, stream=buf)
                    stats.sort_stats("tottime").print_stats(25)
                    stats.sort_stats("cumtime").print_stats(r"/(actors|web)/", 25)  # the gateway's own code
                    text = buf.getvalue()
                    prof = None
                t = os.times()
                reply(
                    {
                        "event": "ended",
                        "cpu": t.user + t.system - cpu0,
                        "profile": text,
                        "rss_kb": rss_kb(),
                        "gc_full": len(gc_pauses),
                        "gc_full_max_ms": round(1000 * max(gc_pauses, default=0.0), 1),
                        "gc_full_total_ms": round(1000 * sum(gc_pauses), 1),
                        "gc_max_ms": round(1000 * gc_any_max, 1),
                        "gc_total_ms": round(1000 * gc_total, 1),
                        "gc_objects": len(gc.get_objects()),
                        "gc_top_types": gc_top_types(8),
                    }
                )
            elif cmd["cmd"] == "gc_freeze":
                gc.collect()
                gc.freeze()  # the objects alive now (the connections) are never scanned again
                reply({"event": "frozen", "frozen": gc.get_freeze_count()})
            elif cmd["cmd"] == "thaw":  # what web/_gc.py's FreezePolicy.thaw costs with the connections alive
                gc.unfreeze()
                started = time.perf_counter()
                found = gc.collect()
                took = time.perf_counter() - started
                gc.freeze()
                reply(
                    {
                        "event": "thawed",
                        "ms": round(1000 * took, 1),
                        "collected": found,
                        "frozen": gc.get_freeze_count(),
                    }
                )
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


class Submitter:
    """A minimal HTTP/1.1 client on one keep-alive connection: POST a JSON body, read a Content-Length answer."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buf = b""

    @classmethod
    async def open(cls, base_url: str) -> Submitter:
        host_port = base_url.split("://", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)), host_port)

    async def __aenter__(self) -> Submitter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def post(self, path: str, body: bytes, token: str) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await self.stream.send_all(head.encode() + body)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4 :]
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if "content-length" not in headers:
            raise RuntimeError(f"POST {path}: answer without Content-Length ({status}, {headers})")
        size = int(headers["content-length"])
        while len(self.buf) < size:
            await self._more()
        answer, self.buf = self.buf[:size], self.buf[size:]
        return status, answer

    async def _more(self) -> None:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise RuntimeError("the gateway closed the connection")
        self.buf += data
