"""The HTTP side: ComfyUI's routes (also under /api), its 403 origin check and its 500 body."""

from __future__ import annotations

import itertools
import json
import logging
import mimetypes
import os
import posixpath
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ._constants import (
    API_PREFIX,
    COMFYUI_VERSION,
    FAKE_FREE_MEMORY_BYTES,
    FAKE_MEMORY_BYTES,
    FILE_TYPES,
    INTERNAL_ERROR_TEXT,
    MAX_UPLOAD_SIZE_BYTES,
    MODEL_FOLDERS,
    SERVER_FEATURES,
)
from ._net import _origin_forbidden
from ._nodes import NODE_SPECS, object_info
from ._paths import _annotated_filepath, _safe_relative_path
from ._records import _QueueItem
from ._state import SimState
from ._validation import _error, validate_prompt

log = logging.getLogger("fake_comfyui")

# --- HTTP helpers -------------------------------------------------------------------------------------


def _json_response(payload: Any, status: int = 200) -> Response:
    # Our own json.dumps: Quart's provider sorts keys, and history order is part of the protocol.
    return Response(json.dumps(payload), status=status, content_type="application/json; charset=utf-8")


def _empty_response(status: int = 200) -> Response:
    response = Response(b"", status=status)
    del response.headers["Content-Type"]  # aiohttp's bare web.Response(status=...) has none
    return response


class HttpApi:
    """ComfyUI's HTTP routes over one simulator's state."""

    def __init__(self, sim: SimState) -> None:
        self.sim = sim

    def build(self) -> QuartTrio:
        app = QuartTrio("fake_comfyui")
        app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_SIZE_BYTES
        routes: list[tuple[str, str, Callable[..., Awaitable[Response]]]] = [
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/<prompt_id>", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/view", self._get_view),
            ("POST", "/upload/image", self._post_upload_image),
            ("GET", "/system_stats", self._get_system_stats),
            ("GET", "/features", self._get_features),
            ("GET", "/object_info", self._get_object_info),
            ("GET", "/object_info/<node_class>", self._get_object_info_class),
            ("GET", "/embeddings", self._get_empty_list),
            ("GET", "/extensions", self._get_empty_list),
            ("GET", "/models", self._get_models),
            ("GET", "/models/<folder>", self._get_model_files),
            ("POST", "/free", self._post_ok),
            ("PATCH", "/internal/logs/subscribe", self._post_ok),
        ]
        for method, path, view in routes:
            for prefix in ("", API_PREFIX):
                app.add_url_rule(prefix + path, endpoint=f"{method} {prefix}{path}", view_func=view, methods=[method])
        app.before_request(self._check_origin)
        app.register_error_handler(Exception, self._internal_error)
        return app

    async def _check_origin(self) -> Response | None:
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if _origin_forbidden(host, origin):
            log.warning("request with non matching host and origin %s != %s, returning 403", host, origin)
            return _empty_response(403)
        return None

    async def _internal_error(self, error: Exception) -> Response | HTTPException:
        if isinstance(error, HTTPException):
            return error  # 404, 405...: Quart's own answer
        log.error("%s %s failed: answering 500", request.method, request.path, exc_info=error)
        return Response(INTERNAL_ERROR_TEXT, status=500, content_type="text/plain; charset=utf-8")

    @staticmethod
    async def _json_body(*, empty_is: Any = ...) -> Any:
        """The request's JSON body; invalid JSON raises (→ 500), unless ``empty_is`` is given for that case."""
        raw = await request.get_data()
        if empty_is is not ...:
            try:
                return json.loads(raw)
            except ValueError:
                return empty_is
        return json.loads(raw)

    async def _post_prompt(self) -> Response:
        body = await self._json_body()
        if "number" in body:
            number: float = float(body["number"])
        else:
            number = -self.sim._number if body.get("front") else self.sim._number
            self.sim._number += 1  # also for prompts rejected below, as ComfyUI
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return _json_response({"error": error, "node_errors": {}}, 400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        result = validate_prompt(prompt, body.get("partial_execution_targets"), self.sim._input_file_exists)
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            log.info("invalid prompt: %s", result.error)
            return _json_response({"error": result.error, "node_errors": result.node_errors}, 400)
        self.sim._enqueue(_QueueItem(number, prompt_id, prompt, extra_data, result.outputs))
        return _json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})

    async def _get_prompt(self) -> Response:
        return _json_response(self.sim._queue_info())

    async def _get_queue(self) -> Response:
        running = [self.sim._running.as_list()] if self.sim._running is not None else []
        pending = [entry[2].as_list() for entry in self.sim._pending]  # heap order, not run order, as ComfyUI
        return _json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self) -> Response:
        body = await self._json_body()
        if body.get("clear"):
            self.sim._pending.clear()
            self.sim._broadcast_status()
        for prompt_id in body.get("delete", ()):
            if self.sim._delete_pending(prompt_id):  # never the running prompt
                self.sim._broadcast_status()
        return _empty_response()

    async def _get_history(self) -> Response:
        max_items_arg, offset_arg = request.args.get("max_items"), request.args.get("offset")
        max_items = int(max_items_arg) if max_items_arg is not None else None
        offset = int(offset_arg) if offset_arg is not None else -1
        if offset < 0 and max_items is not None:
            offset = len(self.sim._history) - max_items
        selected: dict[str, Any] = {}
        for index, prompt_id in enumerate(self.sim._history):
            if index >= offset:
                selected[prompt_id] = self.sim._history[prompt_id]
                if max_items is not None and len(selected) >= max_items:
                    break
        return _json_response(selected)

    async def _get_history_item(self, prompt_id: str) -> Response:
        entry = self.sim._history.get(prompt_id)
        return _json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self) -> Response:
        body = await self._json_body()
        if body.get("clear"):
            self.sim._history.clear()
        for prompt_id in body.get("delete", ()):
            self.sim._history.pop(prompt_id, None)
        return _empty_response()

    async def _post_interrupt(self) -> Response:
        body = await self._json_body(empty_is={})
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.sim.interrupts.append(prompt_id or None)
        if not prompt_id:
            log.info("global interrupt")
            self.sim._interrupt_requested = True
        elif self.sim._running is not None and self.sim._running.prompt_id == prompt_id:
            log.info("interrupting prompt %s", prompt_id)
            self.sim._interrupt_requested = True
        else:
            log.info("prompt %s is not running, not interrupting", prompt_id)
        return _empty_response()

    async def _get_view(self) -> Response:
        query = request.args
        if "filename" not in query:
            return _empty_response(404)
        filename, kind = _annotated_filepath(query["filename"])
        if not filename:
            return _empty_response(400)
        if filename[0] == "/" or ".." in filename:
            return _empty_response(400)
        kind = kind or query.get("type", "output")
        if kind not in FILE_TYPES:
            return _empty_response(400)
        subfolder = ""
        if "subfolder" in query:
            normalized = _safe_relative_path(query["subfolder"])
            if normalized is None:
                return _empty_response(403)
            subfolder = normalized
        filename = posixpath.basename(filename)
        data = self.sim._files.get((kind, subfolder, filename))
        if data is None:
            return _empty_response(404)
        # `preview=` (webp/jpeg re-encoding) and `channel=` are ignored: the file is always sent as stored.
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(data, content_type=content_type, headers={"Content-Disposition": f'filename="{filename}"'})

    async def _post_upload_image(self) -> Response:
        files, form = await request.files, await request.form
        image = files.get("image")
        if image is None or not image.filename:
            return _empty_response(400)
        kind = form.get("type") or "input"
        subfolder = form.get("subfolder", "")
        relative = _safe_relative_path(posixpath.join(subfolder, image.filename)) if kind in FILE_TYPES else None
        if not relative:
            return _empty_response(400)
        folder, filename = posixpath.split(relative)
        data = image.read()
        if form.get("overwrite") not in ("true", "1"):
            stem, extension = posixpath.splitext(filename)
            for counter in itertools.count(1):
                existing = self.sim._files.get((kind, folder, filename))
                if existing is None or existing == data:  # same bytes under the same name: reused
                    break
                filename = f"{stem} ({counter}){extension}"
        self.sim._files[(kind, folder, filename)] = data
        self.sim._file_counters = {
            key: value for key, value in self.sim._file_counters.items() if key[:2] != (kind, folder)
        }
        return _json_response({"name": filename, "subfolder": subfolder, "type": kind})

    async def _get_system_stats(self) -> Response:
        return _json_response({
            "system": {
                "os": os.name, "ram_total": FAKE_MEMORY_BYTES, "ram_free": FAKE_FREE_MEMORY_BYTES,
                "comfyui_version": COMFYUI_VERSION, "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
                "python_version": sys.version, "pytorch_version": "simulated", "embedded_python": False,
                "argv": ["fake_comfyui.py", "--port", str(self.sim.port)],
            },
            "devices": [{
                "name": "cpu", "type": "cpu", "index": None, "vram_total": FAKE_MEMORY_BYTES,
                "vram_free": FAKE_FREE_MEMORY_BYTES, "torch_vram_total": FAKE_MEMORY_BYTES,
                "torch_vram_free": FAKE_FREE_MEMORY_BYTES,
            }],
        })  # fmt: skip

    async def _get_features(self) -> Response:
        return _json_response(dict(SERVER_FEATURES))

    async def _get_object_info(self) -> Response:
        return _json_response({class_type: object_info(class_type, spec) for class_type, spec in NODE_SPECS.items()})

    async def _get_object_info_class(self, node_class: str) -> Response:
        spec = NODE_SPECS.get(node_class)
        return _json_response({node_class: object_info(node_class, spec)} if spec is not None else {})

    async def _get_empty_list(self) -> Response:
        return _json_response([])

    async def _get_models(self) -> Response:
        return _json_response(list(MODEL_FOLDERS))

    async def _get_model_files(self, folder: str) -> Response:
        # No model files: CheckpointLoaderSimple takes any name (its input is a free string here).
        return _json_response([]) if folder in MODEL_FOLDERS else _empty_response(404)

    async def _post_ok(self) -> Response:
        return _empty_response()
