"""``comfy-gateway``: serve, token, credits, status. Every serve flag also reads an environment variable."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

import trio

from actors.comfy import RestartPolicy
from actors.gateway import GatewayConfig
from actors import bridge
from actors.store import RedisStore, is_redis, open_store, parse_store_spec

from .auth import Authenticator, load_secret, valid_id
from .config import DEFAULT_BIND, WebConfig
from .server import Running, serve_gateway

log = logging.getLogger("comfy_gateway")

SIMULATOR = Path(__file__).resolve().parent.parent / "scripts" / "fake_comfyui.py"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comfy-gateway", description="A multi-user STOMP gateway in front of ComfyUI.")
    p.add_argument("--log-level", default=_env("GATEWAY_LOG_LEVEL", "INFO"), help="env GATEWAY_LOG_LEVEL (INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--bind", default=_env("GATEWAY_BIND", DEFAULT_BIND), help="HOST:PORT to listen on (env GATEWAY_BIND)")
    s.add_argument("--comfyui", action="append", default=None, metavar="URL",
                   help="ComfyUI base URL; repeat for several backends (env COMFYUI_URL, comma-separated)")
    s.add_argument("--store", default=_env("GATEWAY_STORE", ""),
                   help="sqlite:PATH (default DATA/gateway.db) or redis://... (env GATEWAY_STORE)")
    s.add_argument("--data", default=_env("GATEWAY_DATA", "data"), help="data directory (env GATEWAY_DATA)")
    s.add_argument("--lease-ttl", type=float, default=float(_env("GATEWAY_LEASE_TTL", "5")),
                   help="Redis store: seconds the core lease lasts unless renewed; another process takes over "
                        "within about this long after the core dies (env GATEWAY_LEASE_TTL)")
    s.add_argument("--auth", choices=("token", "open"), default=_env("GATEWAY_AUTH", "token"),
                   help="'open' trusts the clientId as the user: development only (env GATEWAY_AUTH)")
    s.add_argument("--max-inflight", type=int, default=_int_env("GATEWAY_MAX_INFLIGHT", 2),
                   help="prompts inside each ComfyUI at once (env GATEWAY_MAX_INFLIGHT)")
    s.add_argument("--max-queued-per-user", type=int, default=_int_env("GATEWAY_MAX_QUEUED_PER_USER", 32),
                   help="waiting tasks per user before 429 (env GATEWAY_MAX_QUEUED_PER_USER)")
    s.add_argument("--max-inflight-per-user", type=int, default=_int_env("GATEWAY_MAX_INFLIGHT_PER_USER", 0),
                   help="one user's prompts inside ComfyUI at once, 0 = no cap (env GATEWAY_MAX_INFLIGHT_PER_USER)")
    s.add_argument("--initial-credits", type=int, default=_int_env("GATEWAY_INITIAL_CREDITS", 100),
                   help="credits of a new account (env GATEWAY_INITIAL_CREDITS)")
    s.add_argument("--price", type=int, default=_int_env("GATEWAY_PRICE", 1),
                   help="credits per unit of a task's size (env GATEWAY_PRICE)")
    s.add_argument("--task-timeout", type=float, default=float(_env("GATEWAY_TASK_TIMEOUT", "1800")),
                   help="seconds a task may run before it is interrupted (env GATEWAY_TASK_TIMEOUT)")
    s.add_argument("--backend-lost-after", type=float, default=float(_env("GATEWAY_BACKEND_LOST_AFTER", "300")),
                   help="seconds a backend may stay unreachable before its in-flight tasks fail as backend_lost "
                        "and are refunded (env GATEWAY_BACKEND_LOST_AFTER)")
    s.add_argument("--public-url", default=_env("GATEWAY_PUBLIC_URL", ""),
                   help="base of image URLs when behind a proxy (env GATEWAY_PUBLIC_URL; default: the bound URL)")
    s.add_argument("--allowed-origins", default=_env("GATEWAY_ALLOWED_ORIGINS", "*"),
                   help="comma-separated origins allowed for CORS and the WebSocket (env GATEWAY_ALLOWED_ORIGINS)")
    s.add_argument("--max-frame-size", type=int, default=_int_env("GATEWAY_MAX_FRAME_SIZE", 64 * 1024),
                   help="bytes of one inbound STOMP frame (env GATEWAY_MAX_FRAME_SIZE)")
    s.add_argument("--max-body-size", type=int, default=_int_env("GATEWAY_MAX_BODY_SIZE", 1 << 20),
                   help="bytes of one HTTP request body (env GATEWAY_MAX_BODY_SIZE)")
    s.add_argument("--max-connections-per-user", type=int, default=_int_env("GATEWAY_MAX_CONNECTIONS_PER_USER", 16),
                   help="STOMP connections per user (env GATEWAY_MAX_CONNECTIONS_PER_USER)")
    s.add_argument("--permessage-deflate", action="store_true",
                   default=_env("GATEWAY_PERMESSAGE_DEFLATE", "") in ("1", "true", "yes"),
                   help="accept WebSocket compression (costs ~100 KB per connection; env GATEWAY_PERMESSAGE_DEFLATE)")
    s.add_argument("--reconnect-max-delay", type=float, default=float(_env("GATEWAY_RECONNECT_MAX_DELAY", "30")),
                   help="seconds: cap of the backoff between ComfyUI reconnects (env GATEWAY_RECONNECT_MAX_DELAY)")
    s.add_argument("--reconnect-max-restarts", type=int, default=_int_env("GATEWAY_RECONNECT_MAX_RESTARTS", 5),
                   help="reconnects per minute before a backend is marked down and retried slowly "
                        "(env GATEWAY_RECONNECT_MAX_RESTARTS)")
    s.add_argument("--simulate", action="store_true", help="also start the bundled ComfyUI simulator and use it")
    s.add_argument("--sim-step-ms", type=float, default=float(_env("GATEWAY_SIM_STEP_MS", "100")),
                   help="with --simulate: milliseconds per sampling step")

    t = sub.add_parser("token", help="print a signed token for USER")
    t.add_argument("user")
    t.add_argument("--client", default=None, help="bind the token to this clientId (cid claim)")
    t.add_argument("--ttl", type=float, default=24 * 3600, help="seconds until it expires (86400)")
    t.add_argument("--admin", action="store_true", help="allow admin endpoints")
    t.add_argument("--data", default=_env("GATEWAY_DATA", "data"), help="data directory holding the secret")

    c = sub.add_parser("credits", help="show a user's account, or add (or with a negative N remove) credits")
    c.add_argument("user", nargs="?", help="the user (not needed with --audit)")
    c.add_argument("--add", type=int, default=None, metavar="N",
                   help="add N credits (journaled as 'cli'; a running gateway pushes no balance message for it)")
    c.add_argument("--audit", action="store_true",
                   help="rebuild every balance from the journal and check the ledger (exit 1 on a discrepancy)")
    c.add_argument("--data", default=_env("GATEWAY_DATA", "data"))
    c.add_argument("--store", default=_env("GATEWAY_STORE", ""))
    c.add_argument("--initial-credits", type=int, default=_int_env("GATEWAY_INITIAL_CREDITS", 100))

    st = sub.add_parser("status", help="the processes sharing a Redis store: their roles, and the lease holder")
    st.add_argument("--store", default=_env("GATEWAY_STORE", ""), help="redis://... (env GATEWAY_STORE)")
    st.add_argument("--data", default=_env("GATEWAY_DATA", "data"))
    return p


def load_simulator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_comfyui", SIMULATOR)
    if spec is None or spec.loader is None or not SIMULATOR.exists():
        raise SystemExit(f"--simulate needs {SIMULATOR} (run from a source checkout)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fake_comfyui"] = mod
    spec.loader.exec_module(mod)
    return mod


async def _serve(args: argparse.Namespace) -> None:
    urls = args.comfyui or [u.strip() for u in (_env("COMFYUI_URL", "http://127.0.0.1:8188") or "").split(",") if u.strip()]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        if args.simulate:
            sim_mod = load_simulator()
            sim = sim_mod.FakeComfyUI(step_ms=args.sim_step_ms)
            sim_port = await nursery.start(sim.serve)
            urls = [f"http://127.0.0.1:{sim_port}"]
            print(f"ComfyUI simulator on {urls[0]}", flush=True)
        gw = GatewayConfig(
            comfyui_urls=tuple(urls), store_path=parse_store_spec(args.store, args.data),
            max_inflight=args.max_inflight, max_queued_per_user=args.max_queued_per_user,
            max_inflight_per_user=args.max_inflight_per_user, backend_lost_after=args.backend_lost_after,
            initial_credits=args.initial_credits, price=args.price, task_timeout=args.task_timeout,
            lease_ttl=args.lease_ttl,
            hold_ttl=max(2 * 3600.0, args.task_timeout * 2), public_url=args.public_url,
            comfy_policy=RestartPolicy(initial_delay=min(0.5, args.reconnect_max_delay),
                                       max_delay=args.reconnect_max_delay, max_restarts=args.reconnect_max_restarts),
        )
        web = WebConfig(
            bind=args.bind, auth=args.auth,
            allowed_origins=tuple(o.strip().rstrip("/") for o in args.allowed_origins.split(",") if o.strip()),
            simulate=args.simulate, max_frame_size=args.max_frame_size, max_body_size=args.max_body_size,
            max_connections_per_user=args.max_connections_per_user, permessage_deflate=args.permessage_deflate,
        )
        secret = load_secret(args.data)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    shutdown.set()
                    return

        nursery.start_soon(on_signal)
        gateway_done = trio.Event()

        async def run_gateway(task_status: trio.TaskStatus[Running]) -> None:
            try:
                await serve_gateway(gw, web, secret=secret, shutdown=shutdown, task_status=task_status)
            finally:
                gateway_done.set()

        running: Running = await nursery.start(run_gateway)
        print(f"comfy-gateway serving on {running.url}", flush=True)
        if args.simulate:
            print(f"open {running.url}/ in a browser (demo user 'demo', token issued by the page itself)", flush=True)
        await gateway_done.wait()
        nursery.cancel_scope.cancel()  # the simulator and the signal watcher


async def _credits(args: argparse.Namespace) -> int:
    async with open_store(parse_store_spec(args.store, args.data)) as store:
        if args.audit:
            problems = await store.audit()
            for line in problems:
                print(line)
            accounts = await store.accounts()
            print(f"ledger {'consistent' if not problems else 'INCONSISTENT'}: {len(accounts)} accounts, balance "
                  f"{sum(a.balance for a in accounts)}, frozen {sum(a.frozen for a in accounts)}")
            return 1 if problems else 0
        if args.user is None:
            print("credits: a USER is needed (or --audit)", file=sys.stderr)
            return 2
        if args.add is None:
            acc = await store.account(args.user, args.initial_credits)
        else:
            acc = await store.grant(args.user, args.add, args.initial_credits, "cli")
        print(f"{acc.user_id}: balance {acc.balance}, frozen {acc.frozen}, available {acc.available}")
        return 0


async def _status(args: argparse.Namespace) -> int:
    spec = parse_store_spec(args.store, args.data)
    if not is_redis(spec):
        print(f"store {spec}: one process (SQLite), which is always the core; see its /healthz")
        return 0
    async with open_store(spec) as store:
        assert isinstance(store, RedisStore)
        procs = await bridge.processes(store)
        holder = await store.lease_holder()
        fence = await store.client.get(store.prefix + "fence")
        print(f"store {store.path}: lease held by {holder or 'nobody'} (fencing token {fence or 0}), "
              f"{len(procs)} live process(es)")
        now = time.time()
        for p in procs:
            print(f"  {p['id']}  {p['role']:<4}  {p['url']}  pid {p['pid']} on {p['host']}  up {now - p['since']:.0f}s"
                  f"  seen {now - p['seen']:.1f}s ago")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request to ComfyUI is noise
    logging.getLogger("coredis").setLevel(logging.WARNING)  # "Retry attempt" lines when a script is first loaded
    if args.command == "serve":
        try:
            trio.run(_serve, args)
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "token":
        if not valid_id(args.user):
            print(f"invalid user id {args.user!r}", file=sys.stderr)
            return 2
        auth = Authenticator(load_secret(args.data))
        print(auth.issue(args.user, client_id=args.client, ttl=args.ttl, admin=args.admin))
        return 0
    if args.command == "credits":
        return trio.run(_credits, args)
    if args.command == "status":
        return trio.run(_status, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
