"""``serve_gateway``: the actors plus the Quart-Trio app on programmatic Hypercorn, in one nursery.

The listening socket is bound before anything starts, so the real port (``--bind 127.0.0.1:0`` in tests)
is known to the actors (image URLs) and reported through ``task_status``. Setting ``shutdown`` stops it
gracefully: every STOMP connection gets an ERROR "server shutting down" and close code 1001 (before
Hypercorn's grace period ends), Hypercorn stops, then the actors are cancelled; in-flight tasks stay in
the store and are reconciled on the next start.
"""

from __future__ import annotations

import gc
import logging
import socket
from dataclasses import dataclass, replace

import hypercorn.protocol.ws_stream as _ws_stream
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from wsproto.extensions import PerMessageDeflate as _DeflateOn  # the class hypercorn's ws_stream uses

from actors.gateway import GatewayConfig, run_gateway
from actors.image_urls import ImageUrls

from . import _reap, _ws_close
from ._templates import TemplateLibrary
from ._transport import PumpedWebsocketConnection
from .app import create_app
from .auth import Authenticator
from .config import WebConfig

log = logging.getLogger(__name__)


class _NoDeflate(_DeflateOn):
    """Decline permessage-deflate (STACK-NOTES §2.8: ~100 KB per connection and 2x latency). Hypercorn
    hard-codes the extension, so this patches a private detail: pyproject pins hypercorn to 0.18.x."""

    def accept(self, offer: object) -> None:
        return None


def set_permessage_deflate(enabled: bool) -> None:
    vars(_ws_stream)["PerMessageDeflate"] = _DeflateOn if enabled else _NoDeflate  # hypercorn's private name


@dataclass(frozen=True, slots=True)
class Running:
    url: str  # e.g. "http://127.0.0.1:8080"
    port: int
    auth: Authenticator
    templates: TemplateLibrary | None = None  # reload() on SIGHUP


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--bind must be HOST:PORT, not {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve_gateway(
    gw: GatewayConfig,
    web: WebConfig,
    *,
    secret: bytes,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    templates = TemplateLibrary(web.templates_dir)  # OSError if the directory cannot be read: nothing started
    host, port = parse_bind(web.bind)
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    if not gw.public_url:
        gw = replace(gw, public_url=url)
    gw = replace(gw, image_urls=ImageUrls(gw.public_url.rstrip("/"), secret, web.image_url_ttl, web.wall_clock))
    auth = Authenticator(secret, mode=web.auth)
    if auth.open:
        log.warning("AUTH MODE 'open': clients are trusted to name themselves (clientId = user). Development only!")
    set_permessage_deflate(web.permessage_deflate)
    _ws_close.install()  # malformed frames close with 1002/1007 (RFC 6455), not a dropped TCP connection
    hc = HypercornConfig()
    hc.bind = [f"fd://{sock.detach()}"]
    hc.accesslog = None
    hc.graceful_timeout = web.shutdown_grace
    hc.websocket_max_message_size = max(web.max_frame_size * 4, 1 << 20)
    serve_done = trio.Event()

    _reap.install()  # Hypercorn's per-connection objects freed as each connection ends (web._reap, web._gc)

    async def _serve(app: object, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(app, hc, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
        finally:
            serve_done.set()

    async with trio.open_nursery() as nursery:
        handles = await nursery.start(run_gateway, gw)
        app = create_app(handles, web, auth, shutdown, templates)
        app.asgi_websocket_class = PumpedWebsocketConnection  # /ws: no receive channel, no reader task (issue 11)
        await nursery.start(_serve, app)
        gc.freeze()  # what start-up made (modules, actors, the app) is never scanned by a collection again
        task_status.started(Running(url, port, auth, templates))
        await shutdown.wait()
        # every connection's watcher sends ERROR + 1001 at once; Hypercorn returns when they are gone
        with trio.move_on_after(web.shutdown_grace + 1):
            await serve_done.wait()
        await handles.lease.resign(timeout=2)  # Redis: stop the core and hand the lease on at once
        nursery.cancel_scope.cancel()
