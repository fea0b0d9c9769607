"""The two server roles, each in its own process pinned to CPU 0: the gateway and the bare relay."""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any

import trio

from ._common import CLIENT_ID, SECRET, bench_body, calibrate, control_loop, inject

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
        print(
            json.dumps(
                {
                    "event": "listening",
                    "url": running.url.replace("http://", "ws://") + "/ws",
                    "http": running.url,
                    "pid": os.getpid(),
                    "calibration_us": calibrate(),
                }
            ),
            flush=True,
        )
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
        binds = await nursery.start(partial(serve, app, hc, shutdown_trigger=shutdown.wait))
        port = int(binds[0].rsplit(":", 1)[1])
        print(
            json.dumps(
                {
                    "event": "listening",
                    "url": f"ws://127.0.0.1:{port}/ws",
                    "pid": os.getpid(),
                    "calibration_us": calibrate(),
                }
            ),
            flush=True,
        )
        await control_loop(handle, shutdown)
