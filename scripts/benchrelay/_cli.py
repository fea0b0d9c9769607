"""Arguments, the Node check and ``main`` (which also runs a server role in a child process)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from ._common import DESCRIPTION, IDLE_SECONDS, NODE_DIR, PATHS, ROOT
from ._driver import Driver
from ._report import LABELS, fmt_rate, table
from ._servers import bare_server, floor_server, gateway_server


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
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100, help="client connections, one user each (default 100)")
    p.add_argument("--messages", type=int, default=500, help="messages per client per phase (default 500)")
    p.add_argument(
        "--rate",
        type=parse_rates,
        default=[0.0, 5000.0],
        help="total msgs/s, 0 = as fast as possible; a comma list runs each (default 0,5000)",
    )
    p.add_argument("--size", type=int, default=100, help="JSON body bytes of the hub and bare messages (default 100)")
    p.add_argument("--seconds", type=float, default=20.0, help="time bound of each phase's sending (default 20)")
    p.add_argument(
        "--paths",
        type=parse_paths,
        default=[p for p in PATHS if p != "idle"],
        help="which of hub,comfy,bare,idle (default hub,comfy,bare); idle: connect, subscribe and hold "
        "--idle-seconds, on the gateway, the bare relay and the trio floor (raw sockets, no HTTP or WebSocket)",
    )
    p.add_argument(
        "--backends",
        type=int,
        default=0,
        help="ComfyUI simulators for the comfy path (default: enough for steps >= 2 ms at the top rate)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=5000,
        help="comfy path at max rate: progress events allowed in flight (default 5000: at 1000 the loop, not the "
        "gateway, bound the phase on this machine; BENCHMARKS.md, session 6)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each phase, wait up to this many seconds for other processes to go quiet (default 60)",
    )
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: gc.freeze() in the server once the clients are connected (what GC pauses cost)",
    )
    p.add_argument(
        "--churn",
        action="store_true",
        help="idle mode, gateway: after the idle window every client leaves and connects again (a turnover of the "
        "population); report the server's full collections meanwhile (a web/_gc.py thaw is one) and its RSS after",
    )
    p.add_argument(
        "--sockjs",
        action="store_true",
        help="idle mode, gateway: the stompjs clients connect through sockjs-client's websocket transport at the "
        "SockJS endpoint, as the original's SockJS frontends do, instead of to /ws",
    )
    p.add_argument(
        "--thaw",
        action="store_true",
        help="after the idle window, time one thaw as web/_gc.py does it (gc.unfreeze, a full collection, gc.freeze)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=IDLE_SECONDS,
        help=f"how long the connected clients idle while the server's CPU and GC are measured (default {IDLE_SECONDS:g})",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the server process per phase, or (--paths idle) while idle (slows it ~2x)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the clients to CPU 1")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as one JSON document to PATH (and still print the table), or alone: "
        "print the JSON on stdout instead of the table",
    )
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("role_config", nargs="?", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.clients < 1 or a.messages < 1 or a.seconds <= 0 or a.size < 0 or not 0 < a.idle_seconds <= 600:
        p.error("--clients and --messages must be >= 1, --seconds > 0, --size >= 0, 0 < --idle-seconds <= 600")
    if a.sockjs and a.paths != ["idle"]:
        p.error("--sockjs is for --paths idle (its clients do not count WebSocket messages)")
    return a


def code_version() -> str:
    """The commit measured (and whether the tree differs from it), or "" outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
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
        d.say(
            f"bench_relay: {a.clients} clients, {a.messages} msgs each, rates {[fmt_rate(r) for r in a.rate]}, "
            f"{a.size} B, ≤ {a.seconds:g}s per phase; {pinned}; {os.cpu_count()} CPUs; code {code_version() or '?'}"
        )
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
        trio.run({"gateway": gateway_server, "bare": bare_server, "floor": floor_server}[a.role], cfg)
        return 0
    logging.basicConfig(level=logging.WARNING)
    ensure_node()
    d = trio.run(drive, a)
    results = d.results
    if a.json:
        doc = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            },
            "code": code_version(),
            "args": {k: v for k, v in vars(a).items() if k not in ("role", "role_config")},
            "setup": d.setup,
            "results": [
                {
                    **{k: v for k, v in r.__dict__.items() if k != "profile"},
                    "server_us_per_msg": r.server_us_per_msg,
                    "label": LABELS[r.path],
                }
                for r in results
            ],
        }
        if a.json == "-":
            print(json.dumps(doc, indent=2))
        else:
            Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
    if a.json != "-":
        print(table(results, d.setup))
    return 0
