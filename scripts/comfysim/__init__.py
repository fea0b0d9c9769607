"""A ComfyUI simulator: ComfyUI 0.3.64's HTTP + WebSocket protocol on one port, for the gateway's tests.

It reproduces what ``docs/comfyui-protocol.md`` describes and ``tests/data/comfyui-transcripts/`` shows: message
shapes and their order, who receives what (including the same-clientId trap and the broadcasts of prompts
without ``client_id``), the 400 bodies of prompt validation, the priority queue, the history and ``/view``.
It imports nothing from the gateway (``actors``, ``web``): it is an independent reference, so it catches
their parser bugs instead of sharing them.

Simulated rather than computed:

- Nodes do no real work. Images are small solid-colour (optionally noisy) PNGs, at most
  ``SAVED_IMAGE_MAX_SIDE_PX`` on a side, kept in an in-memory file store that ``/view`` serves and
  ``/upload/image`` fills. Latent previews are ``PREVIEW_SIDE_PX`` PNGs (ComfyUI would send JPEGs).
- Time: ``KSampler``/``KSamplerAdvanced`` send one ``progress`` per sampling step, ``step_ms`` apart (with
  ``step_ms`` 0, back to back: the event loop gets a turn every 64 steps, and a socket's writer sends all the
  frames that are ready in one write, as a fast ComfyUI does; the relay benchmark's "max" relies on it);
  ``SaveImageWebsocket`` sends one frame per ``step_ms``; every other node is instant. All waiting is
  ``trio.sleep``, so tests can run under ``trio.testing.MockClock``.
- Scripted faults, as extra node inputs (ComfyUI ignores undeclared inputs, so they pass validation):
  ``"sim_error": "<text>"`` makes the node raise ``RuntimeError(<text>)`` when it executes;
  ``"sim_sleep_ms": N`` makes it take N ms without progress updates (an interrupt then lands at the next
  node, as with a slow real node). ``fail_rate`` fails random prompts at a random step.
- The "classic" output cache is off unless ``cache=True`` (then identical nodes are not executed again and
  ``execution_cached`` lists them); without it ``execution_cached`` always has ``"nodes": []``.

Test controls: ``pause()``/``resume()``, ``drop_sockets()``, ``refuse_websockets``, ``step_ms``.
Records: ``runs``, ``max_in_queue``, ``submitted``, ``interrupts``, ``gaps()``.

Modules, one concern each: ``_constants``; ``_png`` (images); ``_nodes`` (node classes); ``_validation`` (prompt
validation, execution order); ``_records``; ``_state`` (``SimState``: queue, history, files, sockets); ``_execution``
(one prompt's run); ``_socket`` (one socket, ComfyUI's frames); ``_http`` and ``_websocket`` (the two faces); ``_net``
(origin checks, listener); ``_server`` (``FakeComfyUI``: serving and the worker); ``_cli``.

CLI: ``python scripts/fake_comfyui.py --port P [--host H] [--step-ms MS] [--fail-rate F] [--seed S]
[--no-previews] [--cache]``; prints ``fake ComfyUI listening on http://HOST:PORT`` once listening (``--port 0``
picks a free port and prints it) and runs until SIGINT/SIGTERM.
"""

from ._cli import main
from ._constants import DEFAULT_STEP_MS, SAVED_IMAGE_MAX_SIDE_PX
from ._nodes import NODE_SPECS
from ._png import PNG_SIGNATURE, encode_png, png_size
from ._records import RunRecord
from ._server import FakeComfyUI, serve_fake_comfyui
from ._validation import execution_order, validate_prompt

__all__ = [
    "DEFAULT_STEP_MS",
    "NODE_SPECS",
    "PNG_SIGNATURE",
    "SAVED_IMAGE_MAX_SIDE_PX",
    "FakeComfyUI",
    "RunRecord",
    "encode_png",
    "execution_order",
    "main",
    "png_size",
    "serve_fake_comfyui",
    "validate_prompt",
]
