"""``comfy-gateway``: serve, token, credits, status. The flags and their environment variables: ``web.settings``."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors import bridge
from actors.comfy import RestartPolicy
from actors.gateway import GatewayConfig
from actors.store import LedgerError, RedisStore, StoreUnavailable, is_redis, open_store, parse_store_spec
from actors.validate import WorkflowLimits

from . import settings
from ._templates import parse_allowed_nodes
from .auth import Authenticator, load_secret, valid_id
from .config import WebConfig
from .server import Running, serve_gateway
from .sockjs import SockJSConfig

log = logging.getLogger("comfy_gateway")

SIMULATOR = Path(__file__).resolve().parent.parent / "scripts" / "fake_comfyui.py"


def build_parser() -> argparse.ArgumentParser:
    """The flags, their environment variables and defaults come from the settings table (``web.settings``)."""
    p = argparse.ArgumentParser(prog="comfy-gateway", description="A multi-user STOMP gateway in front of ComfyUI.")
    settings.add_arguments(p, "main")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    settings.add_arguments(s, "serve")

    t = sub.add_parser("token", help="print a signed token for USER")
    t.add_argument("user")
    t.add_argument("--client", default=None, help="bind the token to this clientId (cid claim)")
    t.add_argument("--ttl", type=float, default=24 * 3600, help="seconds until it expires (86400)")
    t.add_argument("--admin", action="store_true", help="allow admin endpoints")
    settings.add_arguments(t, "token")

    c = sub.add_parser("credits", help="show a user's account, or add (or with a negative N remove) credits")
    c.add_argument("user", nargs="?", help="the user (not needed with --audit)")
    c.add_argument(
        "--add",
        type=int,
        default=None,
        metavar="N",
        help="add N credits (journaled as 'cli'; a running gateway pushes no balance message for it)",
    )
    c.add_argument(
        "--allow-negative",
        action="store_true",
        help="with --add: allow leaving the account's available credits below zero",
    )
    c.add_argument(
        "--audit",
        action="store_true",
        help="rebuild every balance from the journal and check the ledger (exit 1 on a discrepancy)",
    )
    settings.add_arguments(c, "credits")

    st = sub.add_parser("status", help="the processes sharing a Redis store: their roles, and the lease holder")
    settings.add_arguments(st, "status")
    return p


def configs_from_args(args: argparse.Namespace, urls: list[str] | None = None) -> tuple[GatewayConfig, WebConfig]:
    """The actors' and the web layer's settings from ``serve``'s parsed flags (``urls`` overrides ``--comfyui``)."""
    gw = GatewayConfig(
        comfyui_urls=tuple(urls or args.comfyui),
        store_path=parse_store_spec(args.store, args.data),
        max_inflight=args.max_inflight,
        max_queued_per_user=args.max_queued_per_user,
        max_inflight_per_user=args.max_inflight_per_user,
        backend_lost_after=args.backend_lost_after,
        initial_credits=args.initial_credits,
        price=args.price,
        task_timeout=args.task_timeout,
        hold_ttl=max(2 * 3600.0, args.task_timeout * 2),
        public_url=args.public_url,
        comfy_policy=RestartPolicy(
            initial_delay=min(0.5, args.reconnect_max_delay),
            max_delay=args.reconnect_max_delay,
            max_restarts=args.reconnect_max_restarts,
        ),
        max_sessions_per_user=args.max_sessions_per_user,
        submit_rate=args.submit_rate,
        submit_burst=args.submit_burst,
        quarantine_after=args.quarantine_after,
        lease_ttl=args.lease_ttl,
    )
    web = WebConfig(
        bind=args.bind,
        auth=args.auth,
        allowed_origins=tuple(o.strip().rstrip("/") for o in args.allowed_origins.split(",") if o.strip()),
        simulate=args.simulate,
        max_frame_size=args.max_frame_size,
        max_body_size=args.max_body_size,
        max_connections_per_user=args.max_connections_per_user,
        permessage_deflate=args.permessage_deflate,
        max_replays_per_minute=args.max_replays_per_minute,
        lazy_heartbeats=not args.eager_heartbeat_reads,
        image_url_ttl=args.image_url_ttl,
        sockjs=SockJSConfig(
            heartbeat=args.sockjs_heartbeat,
            disconnect_delay=args.sockjs_disconnect_delay,
            stream_limit=args.sockjs_stream_limit,
            max_sessions=args.sockjs_max_sessions,
        ),
        limits=WorkflowLimits(
            max_depth=args.max_json_depth,
            max_items=args.max_json_items,
            max_nodes=args.max_workflow_nodes,
            max_key_length=args.max_key_length,
            max_string_length=args.max_string_length,
        ),
        **_template_policy(args),
    )
    return gw, web


def _template_policy(args: argparse.Namespace) -> dict[str, Any]:
    """--templates, --raw-workflows, --allowed-nodes, checked before anything starts (SystemExit with the reason)."""
    if args.templates and not Path(args.templates).is_dir():
        raise SystemExit(f"--templates {args.templates}: not a directory")
    try:
        allowed = parse_allowed_nodes(args.allowed_nodes)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return {"templates_dir": args.templates, "raw_workflows": args.raw_workflows, "allowed_nodes": allowed}


async def _reload_on_sighup(running: Running) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            if running.templates is None:
                continue
            try:
                catalog = await running.templates.reload()
            except OSError as exc:
                log.error("SIGHUP: cannot read the templates directory (%s); the templates loaded before stay", exc)
                continue
            log.info(
                "SIGHUP: templates reloaded: %s%s",
                ", ".join(catalog.templates) or "none",
                f" ({len(catalog.errors)} file(s) refused)" if catalog.errors else "",
            )


async def run_simulator(step_ms: float, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """The bundled ComfyUI simulator in its own process (nothing it does can stall the gateway); started reports
    its URL. Cancelled (Ctrl-C, SIGTERM, the gateway stopping): SIGTERM to the child, then SIGKILL after 5 s."""
    if not SIMULATOR.exists():
        raise SystemExit(f"--simulate needs {SIMULATOR} (run from a source checkout)")
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(SIMULATOR), "--port", "0", "--step-ms", str(step_ms)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(30):
            while b"listening on " not in buf or not buf.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise SystemExit(f"the simulator exited before listening: {buf.decode(errors='replace')}")
                buf += chunk
        url = buf.decode().split("listening on ", 1)[1].split()[0]
        task_status.started(url)
        code = await proc.wait()
        log.error("the ComfyUI simulator (pid %d) exited with %d; the gateway goes on without it", proc.pid, code)
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(5, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


async def _serve(args: argparse.Namespace) -> None:
    urls: list[str] | None = None
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        if args.simulate:
            urls = [await nursery.start(partial(run_simulator, args.sim_step_ms))]
            print(f"ComfyUI simulator on {urls[0]} (its own process)", flush=True)
        gw, web = configs_from_args(args, urls)
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
        nursery.start_soon(_reload_on_sighup, running)
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
            print(
                f"ledger {'consistent' if not problems else 'INCONSISTENT'}: {len(accounts)} accounts, balance "
                f"{sum(a.balance for a in accounts)}, frozen {sum(a.frozen for a in accounts)}"
            )
            return 1 if problems else 0
        if args.user is None:
            print("credits: a USER is needed (or --audit)", file=sys.stderr)
            return 2
        if args.add is None:
            acc = await store.account(args.user, args.initial_credits)
        else:
            try:
                acc = await store.grant(args.user, args.add, args.initial_credits, "cli", args.allow_negative)
            except LedgerError as exc:
                print(f"credits: {exc}", file=sys.stderr)
                return 2
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
        print(
            f"store {store.path}: lease held by {holder or 'nobody'} (fencing token {fence or 0}), "
            f"{len(procs)} live process(es)"
        )
        now = time.time()
        for p in procs:
            print(
                f"  {p['id']}  {p['role']:<4}  {p['url']}  pid {p['pid']} on {p['host']}  up {now - p['since']:.0f}s"
                f"  seen {now - p['seen']:.1f}s ago"
            )
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request to ComfyUI is noise
    logging.getLogger("coredis").setLevel(logging.WARNING)  # "Retry attempt" lines when a script is first loaded
    if args.command == "serve":
        _template_policy(args)  # a bad --templates or --allowed-nodes stops here, before anything starts
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
    try:
        if args.command == "credits":
            return trio.run(_credits, args)
        if args.command == "status":
            return trio.run(_status, args)
    except StoreUnavailable as exc:
        print(f"{args.command}: the store is unavailable: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
