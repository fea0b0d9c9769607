"""``FakeComfyUI``: one simulated ComfyUI process (its state, queue, worker and files) and ``serve_fake_comfyui``."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import posixpath
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import hypercorn.trio
import trio

from ._constants import (
    DEFAULT_STEP_MS,
    KEEP_ALIVE_TIMEOUT_S,
    MAX_HISTORY_ITEMS,
    TEMP_PREFIX_LENGTH,
    TEMP_PREFIX_LETTERS,
    WEBSOCKET_PATHS,
)
from ._execution import RunRecord, _CacheEntry, _PromptRun, _QueueItem
from ._http import HttpApi
from ._net import _host_for_url, _ListenerConfig
from ._nodes import NODE_SPECS
from ._paths import FileKey, _annotated_filepath, _safe_relative_path
from ._validation import _is_link
from ._websocket import AsgiReceive, AsgiSend, WebSocketEndpoint, _Socket, _text_frame

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

log = logging.getLogger("fake_comfyui")

# --- the simulator ------------------------------------------------------------------------------------


class FakeComfyUI:
    """One simulated ComfyUI process. All state lives here; ``serve()`` runs it until cancelled.

    Cancelling the scope that runs ``serve()`` kills it: every socket drops, pending and running prompts are
    forgotten. Serving the same object again keeps history, files, counters and records (a restart that kept its
    disk); a new object is a fresh ComfyUI.
    """

    def __init__(
        self, *, step_ms: float = DEFAULT_STEP_MS, fail_rate: float = 0.0, seed: int | None = None,
        previews: bool = True, cache: bool = False,
    ) -> None:  # fmt: skip
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within 0..1, not {fail_rate!r}")
        self.step_ms = step_ms
        self.fail_rate = fail_rate
        self.previews = previews
        self.cache = cache
        self.refuse_websockets = False
        self.host = "127.0.0.1"
        self.port = 0
        self.url = ""
        # records for tests
        self.runs: list[RunRecord] = []
        self.max_in_queue = 0
        self.submitted: list[str] = []
        self.interrupts: list[str | None] = []
        # ComfyUI's state
        self._rng = random.Random(seed)
        self._temp_prefix = "ComfyUI_temp_" + "".join(
            self._rng.choice(TEMP_PREFIX_LETTERS) for _ in range(TEMP_PREFIX_LENGTH)
        )
        self._number = 0  # the priority counter of POST /prompt
        self._pending: list[tuple[float, int, _QueueItem]] = []  # a heap, like ComfyUI's
        self._sequence = itertools.count()  # tie-breaker for equal numbers
        self._running: _QueueItem | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._files: dict[FileKey, bytes] = {}
        self._file_counters: dict[FileKey, int] = {}  # (type, subfolder, prefix) -> the last counter used
        self._cache: dict[str, _CacheEntry] = {}
        self._sockets: dict[str, _Socket] = {}  # clientId -> the socket registered under it
        self._feature_flags: dict[str, dict[str, Any]] = {}  # clientId -> flags of its socket's first message
        self._connections: set[_Socket] = set()  # every open socket, registered or not
        self._current_client_id: Any = None  # client_id of the prompt running (or last run)
        self._last_node_id: str | None = None
        self._interrupt_requested = False
        self._paused = False
        self._serving = False
        self._wakeup = trio.Event()

    def __repr__(self) -> str:
        running = self._running.prompt_id if self._running else None
        return (
            f"<FakeComfyUI {self.url or 'not serving'} pending={len(self._pending)} running={running} "
            f"history={len(self._history)} sockets={len(self._connections)}>"
        )

    # --- test controls -------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop picking up prompts (the running one, if any, goes on)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wakeup.set()

    def drop_sockets(self) -> None:
        """Cut every WebSocket's connection, without a close frame. The server and the queue go on."""
        for conn in list(self._connections):
            conn.request_drop()

    def gaps(self) -> list[float]:
        """Idle time between consecutive runs: next.started - previous.ended."""
        return [after.started - before.ended for before, after in itertools.pairwise(self.runs)]

    # --- serving -------------------------------------------------------------------------------------

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

    # --- sending -------------------------------------------------------------------------------------

    def _targets(self, sid: Any) -> list[_Socket]:
        """ComfyUI's routing: sid None → every registered socket; else only the one registered under sid."""
        if sid is None:
            return list(self._sockets.values())
        conn = self._sockets.get(sid) if isinstance(sid, str) else None
        return [conn] if conn is not None else []

    def _send_json(self, event: str, data: Any, sid: Any) -> None:
        frame = _text_frame(event, data)
        for conn in self._targets(sid):
            conn.push(frame)

    def _send_bytes(self, frame: bytes, sid: Any) -> None:
        for conn in self._targets(sid):
            conn.push(frame)

    def _queue_remaining(self) -> int:
        return len(self._pending) + (1 if self._running is not None else 0)

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self._queue_remaining()}}

    def _broadcast_status(self) -> None:
        self._send_json("status", {"status": self._queue_info()}, None)

    def _supports_preview_metadata(self, sid: Any) -> bool:
        flags = self._feature_flags.get(sid) if isinstance(sid, str) else None
        return flags is not None and flags.get("supports_preview_metadata") is True

    # --- queue and worker ----------------------------------------------------------------------------

    def _enqueue(self, item: _QueueItem) -> None:
        heapq.heappush(self._pending, (item.number, next(self._sequence), item))
        self.submitted.append(item.prompt_id)
        self.max_in_queue = max(self.max_in_queue, self._queue_remaining())
        self._broadcast_status()
        self._wakeup.set()

    def _delete_pending(self, prompt_id: Any) -> bool:
        """Remove the first pending item with this id (ComfyUI's delete_queue_item); never the running one."""
        for index, (_, _, item) in enumerate(self._pending):
            if item.prompt_id == prompt_id:
                del self._pending[index]
                heapq.heapify(self._pending)
                return True
        return False

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

    # --- files ---------------------------------------------------------------------------------------

    def _read_annotated(self, name: str, *, default_type: str) -> bytes | None:
        name, kind = _annotated_filepath(name)
        relative = _safe_relative_path(name)
        if not relative:
            return None
        subfolder, filename = posixpath.split(relative)
        return self._files.get((kind or default_type, subfolder, filename))

    def _wipe_temp_files(self) -> None:
        """ComfyUI empties its temp directory at start."""
        self._files = {key: data for key, data in self._files.items() if key[0] != "temp"}
        self._file_counters = {key: counter for key, counter in self._file_counters.items() if key[0] != "temp"}

    def _input_file_exists(self, name: str) -> bool:
        return self._read_annotated(name, default_type="input") is not None

    def _reserve_file_counters(self, kind: str, subfolder: str, prefix: str, count: int) -> int:
        """The first of ``count`` file counters for ``prefix_NNNNN_.png``: one past the highest there, as ComfyUI's
        get_save_image_path. The directory is scanned once per prefix, then the counter is remembered."""
        key = (kind, subfolder, prefix)
        if key not in self._file_counters:
            pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_")
            self._file_counters[key] = max(
                (
                    int(match.group(1))
                    for file_kind, file_subfolder, filename in self._files
                    if file_kind == kind and file_subfolder == subfolder and (match := pattern.match(filename))
                ),
                default=0,
            )
        first = self._file_counters[key] + 1
        self._file_counters[key] += count
        return first


async def serve_fake_comfyui(
    sim: FakeComfyUI,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Same as ``sim.serve(...)``: for ``nursery.start(serve_fake_comfyui, sim)``."""
    await sim.serve(host=host, port=port, task_status=task_status)
