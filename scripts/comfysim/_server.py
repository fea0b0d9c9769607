"""``FakeComfyUI``: one simulated ComfyUI process serving HTTP + WebSocket, with its worker; ``serve_fake_comfyui``."""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import hypercorn.trio
import trio

from ._constants import KEEP_ALIVE_TIMEOUT_S, MAX_HISTORY_ITEMS, WEBSOCKET_PATHS
from ._execution import _PromptRun
from ._http import HttpApi
from ._net import _host_for_url, _ListenerConfig
from ._nodes import NODE_SPECS
from ._records import RunRecord, _QueueItem
from ._socket import AsgiReceive, AsgiSend
from ._state import SimState
from ._validation import _is_link
from ._websocket import WebSocketEndpoint

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

log = logging.getLogger("fake_comfyui")

# --- the simulator ------------------------------------------------------------------------------------


class FakeComfyUI(SimState):
    """One simulated ComfyUI process. All state lives here; ``serve()`` runs it until cancelled.

    Cancelling the scope that runs ``serve()`` kills it: every socket drops, pending and running prompts are
    forgotten. Serving the same object again keeps history, files, counters and records (a restart that kept its
    disk); a new object is a fresh ComfyUI.
    """

    async def serve(
        self, *, host: str = "127.0.0.1", port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve HTTP + WebSocket on ``host:port`` and run the worker until cancelled.

        ``task_status.started(port)`` reports the bound port once the socket listens.
        """
        if self._serving:
            raise RuntimeError(f"{self!r} is already serving")
        config = _ListenerConfig()
        config.bind = [f"{_host_for_url(host)}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("fake_comfyui.hypercorn")
        config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
        self._serving = True
        self._wipe_temp_files()
        try:
            async with trio.open_nursery() as nursery:
                app = cast("ASGIFramework", self._asgi_app())  # raw ASGI dicts here; hypercorn types them
                binds = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))
                self.host = host
                self.port = int(binds[0].rsplit(":", 1)[1])
                self.url = f"http://{_host_for_url(host)}:{self.port}"
                nursery.start_soon(self._worker)
                log.info("fake ComfyUI listening on %s", self.url)
                task_status.started(self.port)
        finally:
            config.close_listening()
            self._forget_process_state()
            self._serving = False

    def _forget_process_state(self) -> None:
        """What a killed ComfyUI process loses: the queue, the running prompt, the sockets."""
        if self._pending or self._running:
            log.info(
                "killed with %d pending prompt(s) and running %s",
                len(self._pending),
                self._running and self._running.prompt_id,
            )
        self._pending.clear()
        self._running = None
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._sockets.clear()
        self._feature_flags.clear()
        self._current_client_id = None
        self._last_node_id = None
        self._interrupt_requested = False

    def _asgi_app(self) -> Callable[[dict[str, Any], AsgiReceive, AsgiSend], Awaitable[None]]:
        quart_app = HttpApi(self).build()
        websocket = WebSocketEndpoint(self)

        async def app(scope: dict[str, Any], receive: AsgiReceive, send: AsgiSend) -> None:
            # WebSockets are handled at the ASGI level: only there can a connection be cut abruptly.
            if scope["type"] == "websocket" and scope["path"] in WEBSOCKET_PATHS:
                await websocket.handle(scope, receive, send)
            else:
                await quart_app(
                    cast("Scope", scope), cast("ASGIReceiveCallable", receive), cast("ASGISendCallable", send)
                )

        return app

    async def _worker(self) -> None:
        while True:
            while self._paused or not self._pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            item = heapq.heappop(self._pending)[2]
            self._running = item
            self._broadcast_status()  # picked up: the count does not change, the status repeats
            await self._run(item)

    async def _run(self, item: _QueueItem) -> None:
        run = _PromptRun(self, item)
        self._interrupt_requested = False  # ComfyUI clears the flag as a prompt starts
        self._current_client_id = item.client_id
        self._last_node_id = None
        signatures = self._signatures(item.prompt) if self.cache else {}
        started = trio.current_time()
        outcome = await run.execute(signatures)
        # The terminal event is queued; now the history entry, then status, then the idle `executing`.
        self._history[item.prompt_id] = run.history_entry()
        while len(self._history) > MAX_HISTORY_ITEMS:
            del self._history[next(iter(self._history))]
        self.runs.append(RunRecord(item.prompt_id, item.client_id, started, trio.current_time(), outcome))
        self._running = None
        self._last_node_id = None
        self._broadcast_status()
        run.to_client("executing", {"node": None, "prompt_id": item.prompt_id})
        log.debug("prompt %s: %s", item.prompt_id, outcome)

    def _signatures(self, prompt: Mapping[str, Any]) -> dict[str, str]:
        """Cache keys ("classic" cache: class, IS_CHANGED and inputs, recursively); the cache keeps only the
        entries this prompt can use, as ComfyUI's does at each prompt start."""
        memo: dict[str, str] = {}

        def signature(node_id: str) -> str:
            if node_id not in memo:
                node = prompt[node_id]
                spec = NODE_SPECS[node["class_type"]]
                changed: Any = None
                if spec.always_changed:
                    changed = uuid.uuid4().hex
                elif node["class_type"] == "LoadImage":
                    data = self._read_annotated(str(node["inputs"].get("image")), default_type="input") or b""
                    changed = hashlib.sha256(data).hexdigest()
                parts = [node["class_type"], changed]
                for name in sorted(node["inputs"]):
                    value = node["inputs"][name]
                    parts.append([name, ["link", signature(value[0]), value[1]] if _is_link(value) else value])
                memo[node_id] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
            return memo[node_id]

        signatures = {node_id: signature(node_id) for node_id in prompt}
        wanted = set(signatures.values())
        self._cache = {key: entry for key, entry in self._cache.items() if key in wanted}
        return signatures


async def serve_fake_comfyui(
    sim: FakeComfyUI,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Same as ``sim.serve(...)``: for ``nursery.start(serve_fake_comfyui, sim)``."""
    await sim.serve(host=host, port=port, task_status=task_status)
