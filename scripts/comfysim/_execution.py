"""The execution of one prompt: the events it sends, what a node may do (``_NodeContext``), its history entry."""

from __future__ import annotations

import json
import logging
import posixpath
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import trio

from ._constants import BURST_STEPS, MS_PER_S, PREVIEW_SIDE_PX, SIM_ERROR_INPUT, SIM_SLEEP_INPUT
from ._nodes import NODE_SPECS, PROGRESS_CLASSES, _seed_color
from ._paths import _format_value, _safe_relative_path
from ._png import SimImage, _split_rgb, encode_png, render_rgb
from ._records import _CacheEntry, _QueueItem
from ._socket import _preview_frame, _preview_with_metadata_frame, _text_binary_frame
from ._state import SimState
from ._validation import _full_type_name, _is_link, execution_order

log = logging.getLogger("fake_comfyui")

# --- records and queue items --------------------------------------------------------------------------


class _Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class _NodeFailure(Exception):
    def __init__(self, node_id: str, class_type: str, cause: Exception, inputs: Mapping[str, Any]) -> None:
        super().__init__(f"{class_type} {node_id}: {cause!r}")
        self.node_id = node_id
        self.class_type = class_type
        self.cause = cause
        self.inputs = dict(inputs)


def _json_number(value: Any) -> str:
    """``json.dumps`` of a number, without the encoder's overhead for the common int."""
    return str(value) if type(value) is int else json.dumps(value)


def _node_state_tail(node_id: str, maximum: float, state: str, prompt_id: str) -> tuple[str, str]:
    """A node's entry in progress_state around its value: ``head + json.dumps(value) + tail`` is
    ``json.dumps(node_id) + ": " + json.dumps(state dict)``, with the state dict's keys in ComfyUI's order."""
    rest = json.dumps({
        "max": maximum, "state": state, "node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
        "parent_node_id": None, "real_node_id": node_id,
    })  # fmt: skip
    return f'{json.dumps(node_id)}: {{"value": ', f", {rest[1:]}"


# --- execution of one prompt --------------------------------------------------------------------------


class _NodeContext:
    """What a node implementation may do: report progress, save files, send a TEXT frame."""

    def __init__(self, run: _PromptRun, node_id: str) -> None:
        self._run = run
        self.node_id = node_id

    @property
    def temp_prefix(self) -> str:
        return self._run.sim._temp_prefix

    async def run_steps(self, values: Sequence[int], total: int, preview: Callable[[int], bytes | None]) -> None:
        """One step per value: ``step_ms`` of work, then a progress update (with ``preview(value)``).

        With ``step_ms`` 0 the steps run back to back and the event loop gets a turn every ``BURST_STEPS`` steps; the
        frames of the steps between two turns go to the socket's outbox together (one item), so the writer sends
        them in one write, as a fast ComfyUI (its sampler in a thread) hands them over. Each event is still its own
        frame, in the order ComfyUI sends them."""
        run = self._run
        sim = run.sim
        fail_at = run.pick_fail_step(self.node_id, values)
        frames: list[str | bytes] = []  # of the steps since the last turn of the event loop
        stepped: list[int] = []
        try:
            for n, value in enumerate(values):
                step_ms = sim.step_ms
                if step_ms > 0:
                    run.flush(frames, stepped)
                    await trio.sleep(step_ms / MS_PER_S)
                elif n % BURST_STEPS == 0:
                    run.flush(frames, stepped)
                    await trio.lowlevel.checkpoint()
                run.progress(self.node_id, value, total, preview(value), frames, fail=value == fail_at)
                stepped.append(value)
                if step_ms > 0:
                    run.flush(frames, stepped)
        finally:  # the steps before an interrupt or a failure went out before its event, as in ComfyUI
            run.flush(frames, stepped)

    async def sample(self, steps: int, seed: int) -> None:
        previews = self._run.sim.previews

        def preview(step: int) -> bytes | None:
            if not previews:
                return None
            # from grey noise towards the final colour, like a latent preview
            color = _seed_color(seed)
            mixed = [(channel * step + 0x80 * (steps - step)) // steps for channel in _split_rgb(color)]
            rgb = render_rgb(PREVIEW_SIDE_PX, PREVIEW_SIDE_PX, (mixed[0] << 16) | (mixed[1] << 8) | mixed[2],
                             noise_seed=seed + step, noise=(steps - step) / (2 * steps))  # fmt: skip
            return encode_png(PREVIEW_SIDE_PX, PREVIEW_SIDE_PX, rgb)

        await self.run_steps(range(1, steps + 1), steps, preview)

    def send_text(self, text: str) -> None:
        """A binary TEXT frame, broadcast (core nodes send it without a target)."""
        self._run.sim._send_bytes(_text_binary_frame(self.node_id, text), None)

    def read_input_file(self, name: str) -> bytes | None:
        return self._run.sim._read_annotated(name, default_type="input")

    def save_images(self, images: SimImage, filename_prefix: str, kind: str) -> list[dict[str, str]]:
        """Write the batch as ``<subfolder>/<prefix>_<counter:05>_.png``, as ComfyUI's SaveImage/PreviewImage."""
        relative = _safe_relative_path(filename_prefix)
        if relative is None or relative == "":
            raise ValueError(
                f"Saving image outside the {kind} folder is not allowed. filename_prefix: {filename_prefix}"
            )
        subfolder, prefix = posixpath.split(relative)
        counter = self._run.sim._reserve_file_counters(kind, subfolder, prefix, images.batch)
        metadata = {"prompt": json.dumps(self._run.item.prompt)}
        saved = []
        for index in range(images.batch):
            filename = f"{prefix}_{counter + index:05}_.png"
            self._run.sim._files[(kind, subfolder, filename)] = images.png(index, text=metadata)
            saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
        return saved


class _PromptRun:
    """The execution of one queue item: the events it sends and what goes into its history entry."""

    def __init__(self, sim: SimState, item: _QueueItem) -> None:
        self.sim = sim
        self.item = item
        self.prompt_id = item.prompt_id
        self.client_id = item.client_id
        self.prompt = item.prompt
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.node_states: dict[str, dict[str, Any]] = {}
        self.encoded_states: dict[str, str] = {}  # node id -> its '"id": {state}' in progress_state, same order
        self.encoded_prompt_id = json.dumps(self.prompt_id)
        self.state_tails: dict[tuple[str, str, str], tuple[str, str]] = {}  # see state_frame
        self.progress_tails: dict[tuple[str, str], str] = {}  # see progress
        self.values: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self.fail_node: str | None = None
        self.status_str = "success"

    # events ----------------------------------------------------------------------------------------

    def add_message(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        """Recorded in history.status.messages; sent to the client, or broadcast if asked and there is none."""
        data = {**data, "timestamp": int(time.time() * MS_PER_S)}  # data, not timing: ComfyUI's wall clock
        self.messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.sim._send_json(event, data, self.client_id)

    def to_client(self, event: str, data: dict[str, Any]) -> None:
        """Per-prompt events that are not sent at all for a prompt without client_id."""
        if self.client_id is not None:
            self.sim._send_json(event, data, self.client_id)

    def set_state(self, node_id: str, value: float, maximum: float, state: str) -> None:
        self.sim._send_text(self.state_frame(node_id, value, maximum, state), self.client_id)  # or broadcast

    def state_frame(self, node_id: str, value: float, maximum: float, state: str) -> str:
        """Record a node's state; the progress_state frame that tells it.

        The frame is json.dumps({"type": "progress_state", "data": {"prompt_id": ..., "nodes": node_states}}),
        built from each node's encoding, kept until that node changes: at full speed (one per sampler step) encoding
        every node again was the simulator's biggest cost. A node's encoding is its value and the rest of its state,
        encoded once per (node, max, state) (``_node_state_tail``)."""
        self.node_states[node_id] = {
            "value": value, "max": maximum, "state": state, "node_id": node_id, "prompt_id": self.prompt_id,
            "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id,
        }  # fmt: skip
        key = (node_id, state, _json_number(maximum))  # by its encoding: 0.0 and -0.0 are equal keys, not equal JSON
        tail = self.state_tails.get(key)
        if tail is None:
            tail = self.state_tails[key] = _node_state_tail(node_id, maximum, state, self.prompt_id)
        self.encoded_states[node_id] = f"{tail[0]}{_json_number(value)}{tail[1]}"
        nodes = ", ".join(self.encoded_states.values())
        return f'{{"type": "progress_state", "data": {{"prompt_id": {self.encoded_prompt_id}, "nodes": {{{nodes}}}}}}}'

    def progress(
        self, node_id: str, value: int, total: int, preview: bytes | None, out: list[str | bytes], *, fail: bool = False
    ) -> None:
        """A progress-bar update: ComfyUI's hook checks the interrupt flag first, then sends
        progress_state, [preview with metadata], progress, [legacy preview]. The frames are appended to ``out``
        (for this prompt's client, or broadcast when it has none; ``flush`` sends them)."""
        self.raise_if_interrupted(node_id)
        if fail:
            raise RuntimeError(f"Simulated failure (fail_rate={self.sim.fail_rate})")
        out.append(self.state_frame(node_id, value, total, "running"))
        with_metadata = preview is not None and self.sim._supports_preview_metadata(self.client_id)
        if preview is not None and with_metadata:
            out.append(_preview_with_metadata_frame(preview, self.prompt_id, node_id))
        key = (node_id, _json_number(total))
        tail = self.progress_tails.get(key)
        if tail is None:  # the frame is _text_frame("progress", {"value", "max", "prompt_id", "node"})
            rest = json.dumps({"max": total, "prompt_id": self.prompt_id, "node": node_id})
            tail = self.progress_tails[key] = f", {rest[1:]}}}"
        out.append(f'{{"type": "progress", "data": {{"value": {_json_number(value)}{tail}')
        if preview is not None and not with_metadata:
            out.append(_preview_frame(preview))

    def flush(self, frames: list[str | bytes], values: list[int]) -> None:
        """Hand the frames of the steps since the last flush to the sockets as one outbox item; tell the
        ``progress_hook`` (instrumentation) which steps' progress just left."""
        if frames:
            self.sim._send_frames(tuple(frames), self.client_id)
            frames.clear()
        if values:
            if (hook := self.sim.progress_hook) is not None:
                hook(self.prompt_id, tuple(values))
            values.clear()

    def raise_if_interrupted(self, node_id: str) -> None:
        if self.sim._interrupt_requested:
            self.sim._interrupt_requested = False  # ComfyUI clears the flag when it raises
            raise _Interrupted(node_id)

    # failures --------------------------------------------------------------------------------------

    def choose_fail_node(self, order: Sequence[str]) -> None:
        if order and self.sim.fail_rate > 0 and self.sim._rng.random() < self.sim.fail_rate:
            self.fail_node = self.sim._rng.choice(list(order))

    def pick_fail_step(self, node_id: str, values: Sequence[int]) -> int | None:
        if node_id != self.fail_node or not values:
            return None
        return self.sim._rng.choice(list(values))

    # execution -------------------------------------------------------------------------------------

    async def execute(self, signatures: Mapping[str, str]) -> Literal["success", "error", "interrupted"]:
        sim = self.sim
        cached = [node_id for node_id in self.prompt if signatures.get(node_id) in sim._cache]
        for node_id in cached:
            self.values[node_id] = sim._cache[signatures[node_id]].outputs
        self.add_message("execution_start", {"prompt_id": self.prompt_id}, broadcast=False)
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id}, broadcast=False)
        order = execution_order(self.prompt, self.item.outputs_to_execute, cached)
        self.choose_fail_node([node_id for node_id in order if node_id not in cached])
        try:
            for node_id in order:
                if node_id in cached:
                    self.replay_cached(node_id, sim._cache[signatures[node_id]])
                else:
                    await self.execute_node(node_id, signatures.get(node_id))
        except _Interrupted as interrupted:
            self.status_str = "error"
            self.add_message("execution_interrupted", {
                "prompt_id": self.prompt_id, "node_id": interrupted.node_id,
                "node_type": self.prompt[interrupted.node_id]["class_type"], "executed": list(self.executed),
            }, broadcast=True)  # fmt: skip
            return "interrupted"
        except _NodeFailure as failure:
            self.status_str = "error"
            self.add_message("execution_error", {
                "prompt_id": self.prompt_id, "node_id": failure.node_id, "node_type": failure.class_type,
                "executed": list(self.executed),
                "exception_message": f"{failure.cause}\n",  # ComfyUI: "{ex}\n{tips}", tips only for OOM
                "exception_type": _full_type_name(type(failure.cause)),
                "traceback": traceback.format_tb(failure.cause.__traceback__),
                "current_inputs": {name: [_format_value(value)] for name, value in failure.inputs.items()},
                "current_outputs": list(self.prompt),
            }, broadcast=False)  # fmt: skip
            return "error"
        self.add_message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)
        return "success"

    def replay_cached(self, node_id: str, entry: _CacheEntry) -> None:
        """A cached output node: its UI is sent again (without `executing`), and it counts as finished."""
        if entry.ui is not None:
            self.ui[node_id] = entry.ui
        self.to_client(
            "executed", {"node": node_id, "display_node": node_id, "output": entry.ui, "prompt_id": self.prompt_id}
        )
        self.set_state(node_id, 1, 1, "finished")

    async def execute_node(self, node_id: str, signature: str | None) -> None:
        node = self.prompt[node_id]
        class_type = node["class_type"]
        spec = NODE_SPECS[class_type]
        self.set_state(node_id, 0.0, 1.0, "running")
        self.sim._last_node_id = node_id
        self.to_client("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        self.raise_if_interrupted(node_id)  # checked as the node starts, after `executing` went out
        inputs: dict[str, Any] = {}
        try:
            inputs = {
                name: self.values[value[0]][value[1]] if _is_link(value) else value
                for name, value in node["inputs"].items()
                if name in spec.required or name in spec.optional
            }
            await self.scripted_behaviour(node_id, node["inputs"])
            result = await spec.run(_NodeContext(self, node_id), **inputs)
        except _Interrupted:
            raise
        except Exception as exc:  # whatever a node raises becomes execution_error, as in ComfyUI
            log.debug("prompt %s: node %s (%s) failed: %r", self.prompt_id, node_id, class_type, exc)
            raise _NodeFailure(node_id, class_type, exc, inputs) from exc
        self.values[node_id] = result.outputs
        if result.ui:
            self.ui[node_id] = result.ui
            self.to_client(
                "executed", {"node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": self.prompt_id}
            )
        state = self.node_states[node_id]
        self.set_state(node_id, state["max"], state["max"], "finished")
        self.executed.append(node_id)
        if signature is not None and self.sim.cache:
            self.sim._cache[signature] = _CacheEntry(result.outputs, result.ui)

    async def scripted_behaviour(self, node_id: str, raw_inputs: Mapping[str, Any]) -> None:
        """The simulator's extra inputs and the fail_rate failure of nodes without progress steps."""
        sleep_ms = raw_inputs.get(SIM_SLEEP_INPUT)
        if isinstance(sleep_ms, (int, float)) and sleep_ms > 0:
            await trio.sleep(sleep_ms / MS_PER_S)
        else:
            await trio.lowlevel.checkpoint()
        message = raw_inputs.get(SIM_ERROR_INPUT)
        if message is not None:
            raise RuntimeError(str(message))
        if node_id == self.fail_node and self.prompt[node_id]["class_type"] not in PROGRESS_CLASSES:
            raise RuntimeError(f"Simulated failure (fail_rate={self.sim.fail_rate})")

    def history_entry(self) -> dict[str, Any]:
        nodes = sorted(self.ui)  # ComfyUI lists outputs and meta by node id as strings
        return {
            "prompt": self.item.as_list(),
            "outputs": {node_id: self.ui[node_id] for node_id in nodes},
            "status": {
                "status_str": self.status_str,
                "completed": self.status_str == "success",
                "messages": [[event, data] for event, data in self.messages],
            },
            "meta": {
                node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
                for node_id in nodes
            },
        }
