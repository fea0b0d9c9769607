"""The server roles, each in its own process pinned to CPU 0: the gateway, the bare relay and (idle mode) the
trio floor."""

from __future__ import annotations

import contextlib
import json
import math
from functools import partial
from typing import Any

import trio

from ._common import CLIENT_ID, SECRET, announce, bench_body, control_loop, inject

# =============================================================================================================
# Server role 1: the gateway (runs on CPU 0)
# =============================================================================================================


async def gateway_server(cfg: dict[str, Any]) -> None:
    import web.server as server_mod
    from actors._util import Forwarder
    from actors.comfy import RestartPolicy
    from actors.gateway import GatewayConfig
    from actors.sessions import Publish
    from web.app import create_app
    from web.config import WebConfig

    # serve_gateway keeps its Handles to itself: catch them on their way into create_app (the real server runs)
    handles: list[Any] = []

    def capture(h: Any, *args: Any, **kw: Any) -> Any:
        handles.append(h)
        return create_app(h, *args, **kw)

    vars(server_mod)["create_app"] = capture  # web.server calls it by this module-global name
    gw = GatewayConfig(
        comfyui_urls=tuple(cfg["comfy_urls"]),
        store_path=cfg["store"],
        initial_credits=10**9,
        price=1,
        max_queued_per_user=64,
        comfy_policy=RestartPolicy(
            initial_delay=0.05, max_delay=0.5, max_restarts=1000, window=60.0, healthy_after=5.0
        ),
    )
    web = WebConfig(bind="127.0.0.1:0")
    shutdown = trio.Event()

    async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        hub = Forwarder(handles[0].sessions)  # as the registry publishes: send_nowait, a checkpoint every 512
        size = cmd["size"]

        async def send(user: str, body: dict[str, Any]) -> None:
            await hub.send(Publish(user, CLIENT_ID, body))

        return await inject(
            send, partial(bench_body, size=size), cmd["users"], cmd["count"], cmd["rate"], cmd["seconds"]
        )

    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(server_mod.serve_gateway, gw, web, secret=SECRET, shutdown=shutdown))
        announce(running.url.replace("http://", "ws://") + "/ws", http=running.url)
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

    heartbeat = float(cfg.get("heartbeat", 0))  # idle mode: a "\n" each way every `heartbeat` s, as STOMP's

    async def discard() -> None:  # what the clients send (their heart-beats) is read and dropped
        while True:
            await websocket.receive()

    @app.websocket("/ws")
    async def ws() -> None:
        u = int(websocket.args.get("u", "-1"))
        await websocket.accept()
        tx, rx = trio.open_memory_channel[str](1000)  # STACK-NOTES §3: a bounded channel + a writer
        conns[u] = tx
        try:
            await websocket.send("hello")
            if not heartbeat:
                async for msg in rx:
                    await websocket.send(msg)
                return
            async with trio.open_nursery() as nursery:  # the plainest heart-beats: a reader, a timeout per wait
                nursery.start_soon(discard)
                while True:
                    with trio.move_on_after(heartbeat) as idle:
                        msg = await rx.receive()
                    await websocket.send("\n" if idle.cancelled_caught else msg)
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
        binds = await nursery.start(partial(serve, app, hc, shutdown_trigger=shutdown.wait))
        port = int(binds[0].rsplit(":", 1)[1])
        announce(f"ws://127.0.0.1:{port}/ws")
        await control_loop(handle, shutdown)


# =============================================================================================================
# Server role 3 (idle mode only): the trio floor, what N idle connections cost trio itself
# =============================================================================================================


async def floor_server(cfg: dict[str, Any]) -> None:
    """No HTTP, no WebSocket, no STOMP: a trio task per TCP connection reading (and dropping) what the client sends
    (its heart-beat, a 7-byte masked WebSocket frame, every ``heartbeat`` s), and a 3-byte heart-beat frame written
    to each connection every ``heartbeat`` s, all due ones at one wake-up a second, straight into the socket as the
    gateway's timer heap does. This is the least any trio server can spend on the same traffic: the idle CPU's
    baseline below the bare relay."""
    heartbeat = float(cfg.get("heartbeat", 10.0))
    socks: list[trio.socket.SocketType] = []

    async def reader(sock: trio.socket.SocketType) -> None:
        with sock:
            while await sock.recv(65536):
                pass

    async def beats() -> None:
        i = 0
        while True:
            await trio.sleep(1.0)
            for _ in range(math.ceil(len(socks) / heartbeat)):
                if not socks:
                    break
                with contextlib.suppress(OSError):
                    socks[i % len(socks)]._sock.send(b"\x81\x01\n")  # type: ignore[attr-defined]
                i += 1

    async def serve(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        task_status.started(listener.getsockname()[1])
        async with trio.open_nursery() as conns:
            conns.start_soon(beats)
            while True:
                sock, _ = await listener.accept()
                socks.append(sock)
                conns.start_soon(reader, sock)

    async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"the floor server takes no {cmd['cmd']!r}")

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve)
        announce(f"ws://127.0.0.1:{port}/ws")
        await control_loop(handle, shutdown)
        nursery.cancel_scope.cancel()
