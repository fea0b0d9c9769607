"""The driver's view of its child processes, the per-phase ``Result`` and CPU/latency arithmetic."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ._common import THROTTLE_MS, Lines

# =============================================================================================================
# The driver (runs on CPU 1, with the clients and the ComfyUI simulators)
# =============================================================================================================


class ClosedLoop:
    """The comfy path's progress events as they leave the simulators (``emitted``: (prompt id, step) -> time) and,
    with ``steering`` (the "max" rate), the closed loop: the simulators step at full speed while fewer than
    ``window`` events are in flight (emitted, not yet counted by the clients), else one step every THROTTLE_MS.
    Steered as progress leaves and as the clients count (``steer`` is their ``on_tick``), not on a timer: a timed
    trio wake-up costs ~200 µs of the clients' core on this VM (STACK-NOTES)."""

    def __init__(self, sims: Sequence[Any], clients: Proc, window: int, *, steering: bool) -> None:
        self.emitted: dict[tuple[str, int], float] = {}
        self.sims, self.clients, self.window, self.steering = sims, clients, window, steering

    def progress(self, prompt_id: str, values: tuple[int, ...]) -> None:
        """The simulators' ``progress_hook``: these steps' progress events just left (one clock read per burst)."""
        now = time.time()
        for value in values:
            self.emitted[(prompt_id, value)] = now
        if self.steering:
            self.steer()

    def steer(self) -> None:
        step = THROTTLE_MS if len(self.emitted) - self.clients.ticks >= self.window else 0.0
        for sim in self.sims:
            sim.step_ms = step


class Proc:
    """A child process speaking JSON lines on stdin/stdout; its stderr goes to a log file."""

    def __init__(self, name: str, proc: trio.Process, log_path: Path, nursery: trio.Nursery) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.ticks = 0  # the clients' running count of the current phase (`tick` events)
        self.ticks_by: list[int] = []  # the same per server, when the clients spread over several (bench_scale)
        self.on_tick: Callable[[], None] | None = None  # called after each `tick` (the comfy path's closed loop)
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
                        self.ticks_by = msg.get("by") or []
                        if self.on_tick is not None:
                            self.on_tick()
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


async def idle_window(
    server: Proc, clients: Proc, idle_s: float, server_cpu: int | None, profile: bool = False
) -> dict[str, Any]:
    """The server's CPU and GC while the connected clients idle for ``idle_s`` seconds (with ``profile``: its cProfile
    text as "idle_profile"); the CPU the clients and other processes used meanwhile; how many clients were closed."""
    await server.send({"cmd": "begin", "profile": profile})
    await server.expect("begun", 10)
    d0, c0, own0 = os.times(), cpu_busy(), proc_cpu(clients.proc.pid)
    await trio.sleep(idle_s)
    await server.send({"cmd": "end"})
    idle = await server.expect("ended", 60)
    d1, c1, own1 = os.times(), cpu_busy(), proc_cpu(clients.proc.pid)
    busy = {cpu: c1[cpu] - c0.get(cpu, 0.0) for cpu in c1}
    driver = (d1.user + d1.system) - (d0.user + d0.system)
    others = sum(busy.values()) - idle["cpu"] - (own1 - own0) - driver
    await clients.send({"cmd": "status"})
    status = await clients.expect("status", 10)
    return {
        "rss_idle_mb": round(idle["rss_kb"] / 1024, 1),
        "rss_idle_kb": idle["rss_kb"],
        "idle_seconds": idle_s,
        "idle_cpu_percent": round(100 * idle["cpu"] / idle_s, 1),
        "idle_gc_full": idle["gc_full"],
        "idle_gc_max_ms": idle["gc_max_ms"],
        "idle_gc_full_total_ms": idle["gc_full_total_ms"],
        "idle_gc_total_ms": idle["gc_total_ms"],
        "idle_client_cpu_percent": round(100 * (own1 - own0) / idle_s, 1),
        "idle_others_percent": round(100 * max(0.0, others) / idle_s, 1),
        "idle_others_server_core_percent": (
            round(100 * max(0.0, busy.get(server_cpu, 0.0) - idle["cpu"]) / idle_s, 1)
            if server_cpu is not None
            else None
        ),
        "closed_while_idle": status["closed"],
        "client_errors": status["errors"],
        "idle_profile": idle["profile"],
    }


async def churn_window(server: Proc, clients: Proc, timeout: float) -> dict[str, Any]:
    """A turnover of the whole population (every client leaves, then all connect again): the server's full
    collections meanwhile (a thaw of web/_gc.py is one), the longest collection, and its RSS after."""
    await server.send({"cmd": "begin"})
    await server.expect("begun", 10)
    await clients.send({"cmd": "churn"})
    churned = await clients.expect("churned", timeout)
    await trio.sleep(1)
    await server.send({"cmd": "end"})
    ended = await server.expect("ended", 60)
    return {
        "churn_seconds": round(churned["seconds"], 2),
        "churn_leave_seconds": round(churned["leaveSeconds"], 2),
        "churn_closed": churned["closed"],
        "churn_gc_full": ended["gc_full"],
        "churn_gc_full_max_ms": ended["gc_full_max_ms"],
        "churn_gc_max_ms": ended["gc_max_ms"],
        "churn_cpu_s": round(ended["cpu"], 2),
        "rss_after_churn_kb": ended["rss_kb"],
    }
