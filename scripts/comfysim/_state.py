"""``SimState``: what one simulated ComfyUI process holds (queue, history, files, sockets, records) and the
small operations on it that the HTTP and WebSocket faces and a prompt's execution share."""

from __future__ import annotations

import heapq
import itertools
import logging
import posixpath
import random
import re
from collections.abc import Callable
from typing import Any

import trio

from ._constants import DEFAULT_STEP_MS, TEMP_PREFIX_LENGTH, TEMP_PREFIX_LETTERS
from ._paths import FileKey, _annotated_filepath, _safe_relative_path
from ._records import RunRecord, _CacheEntry, _QueueItem
from ._socket import _Socket, _text_frame

log = logging.getLogger("fake_comfyui")


class SimState:
    """The state of one simulated ComfyUI and its test controls; ``FakeComfyUI`` adds serving and the worker."""

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
        # instrumentation (the relay benchmark times each progress as it leaves): called with (prompt_id, the
        # step values) whenever progress events are handed to the sockets
        self.progress_hook: Callable[[str, tuple[int, ...]], None] | None = None
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

    def _targets(self, sid: Any) -> list[_Socket]:
        """ComfyUI's routing: sid None → every registered socket; else only the one registered under sid."""
        if sid is None:
            return list(self._sockets.values())
        conn = self._sockets.get(sid) if isinstance(sid, str) else None
        return [conn] if conn is not None else []

    def _send_json(self, event: str, data: Any, sid: Any) -> None:
        self._send_text(_text_frame(event, data), sid)

    def _send_text(self, frame: str, sid: Any) -> None:
        """A text frame encoded already (as ``_text_frame`` would)."""
        for conn in self._targets(sid):
            conn.push(frame)

    def _send_bytes(self, frame: bytes, sid: Any) -> None:
        for conn in self._targets(sid):
            conn.push(frame)

    def _send_frames(self, frames: tuple[str | bytes, ...], sid: Any) -> None:
        """Frames encoded already, in order, as one outbox item: one write (a burst of sampler steps)."""
        item = frames if len(frames) > 1 else frames[0]
        for conn in self._targets(sid):
            conn.push(item)

    def _queue_remaining(self) -> int:
        return len(self._pending) + (1 if self._running is not None else 0)

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self._queue_remaining()}}

    def _broadcast_status(self) -> None:
        self._send_json("status", {"status": self._queue_info()}, None)

    def _supports_preview_metadata(self, sid: Any) -> bool:
        flags = self._feature_flags.get(sid) if isinstance(sid, str) else None
        return flags is not None and flags.get("supports_preview_metadata") is True

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
