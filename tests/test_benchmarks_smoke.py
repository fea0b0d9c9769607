"""The benchmark scripts still run end to end (a small configuration, nothing timed): every message reaches its
client on every path, no client is closed, and the figures the reports are made of are there. A benchmark that
has rotted would otherwise be found only by the next person who needs its numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, args: list[str], out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args, "--quiet-wait", "0", "--no-pin", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_relay_delivers_every_message_on_every_path(tmp_path: Path) -> None:
    report = run_script(
        "bench_relay.py",
        ["--clients", "10", "--messages", "50", "--rate", "0", "--paths", "hub,comfy,bare", "--seconds", "10"],
        tmp_path / "relay.json",
    )
    results = {r["path"]: r for r in report["results"]}
    assert set(results) == {"hub", "comfy", "bare"}
    for path, r in results.items():
        assert (r["expected"], r["delivered"], r["closed"], r["errors"]) == (500, 500, 0, []), path
        assert r["throughput"] > 0 and r["p99"] >= r["p50"] > 0, path
        assert 0 < r["ws_messages"] <= r["delivered"], path  # frames per WebSocket message >= 1
    assert results["bare"]["ws_messages"] == 500  # the bare relay sends one WebSocket message per event
    assert report["setup"]["gateway"]["kb_per_connection"] > 0


def test_bench_scale_runs_one_and_two_processes_on_redis(tmp_path: Path) -> None:
    report = run_script(
        "bench_scale.py",
        ["--clients", "40", "--messages", "20", "--rate", "0", "--processes", "1,2", "--seconds", "10"],
        tmp_path / "scale.json",
    )
    rows = report["results"]
    assert [r["k"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["expected"], r["delivered"], r["closed"], r["errors"]) == (800, 800, 0, []), r["k"]
        assert r["msgs_per_s"] > 0 and r["G_us"] > 0 and r["O_us"] > 0, r["k"]


def test_bench_relay_idle_mode_holds_the_connections_on_gateway_bare_relay_and_trio_floor(tmp_path: Path) -> None:
    report = run_script(
        "bench_relay.py",
        ["--clients", "20", "--paths", "idle", "--idle-seconds", "2", "--churn"],
        tmp_path / "idle.json",
    )
    setup = report["setup"]
    assert set(setup) == {"gateway", "bare", "floor"}
    for name, st in setup.items():
        assert st["closed_while_idle"] == 0, name
        assert st["idle_cpu_percent"] >= 0, name
    assert setup["gateway"]["kb_per_connection"] > 0
    # --churn: every gateway client left and connected again, and the server's collections were counted
    assert setup["gateway"]["churn_closed"] == 20 and setup["gateway"]["churn_gc_full"] >= 0


def test_bench_relay_idle_mode_over_sockjs_connects_and_churns_the_sockjs_clients(tmp_path: Path) -> None:
    """``--sockjs``: the gateway's idle clients are stompjs over sockjs-client (the original's SockJS frontends)."""
    report = run_script(
        "bench_relay.py",
        ["--clients", "10", "--paths", "idle", "--idle-seconds", "2", "--churn", "--sockjs"],
        tmp_path / "idle-sockjs.json",
    )
    gateway = report["setup"]["gateway"]
    assert gateway["closed_while_idle"] == 0 and gateway["kb_per_connection"] > 0
    assert gateway["churn_closed"] == 10, "every SockJS client left and connected again"
