#!/usr/bin/env python3
"""Relay benchmark (issue 3): the gateway's push path against a bare Hypercorn WebSocket relay, on this machine.

One run measures, over 127.0.0.1 only, with the server pinned to CPU 0 and every client on CPU 1 (as in
STACK-NOTES §3):

* ``hub``: the gateway (``web.server.serve_gateway``, every actor running) with per-user events injected as
  ``sessions.Publish`` into the sessions hub inside the gateway process: hub -> session -> Outbox -> writer ->
  STOMP MESSAGE -> N @stomp/stompjs clients (Node, ``ws``). This is what the registry does for every event.
* ``comfy``: the same gateway fed by ComfyUI simulators (``scripts/fake_comfyui.py``): every user submits a task
  whose KSampler has M steps, and each step's ``progress`` travels simulator WebSocket -> comfy actor -> registry
  -> hub -> session -> client. The simulators run on CPU 1 with the clients (a ComfyUI is another machine).
* ``bare``: the baseline, a minimal Quart-Trio app on the same Hypercorn: one bounded memory channel and one writer
  task per connection, one WebSocket message per event, no STOMP, no actors; plain ``ws`` clients in Node.

Every message carries its send time (``time.time()``; ComfyUI progress is timed when the simulator emits it) and
the clients take ``performance.timeOrigin + performance.now()`` on arrival: the same host clock. Throughput is
messages delivered / (last arrival - first send). Every load loop is bounded by a count (``--messages`` per
client) and by time (``--seconds``); the run stops by itself.

    .venv/bin/python scripts/bench_relay.py                       # 100 clients, full speed and 5k msgs/s
    .venv/bin/python scripts/bench_relay.py --clients 1000 --messages 100 --rate 5000
    .venv/bin/python scripts/bench_relay.py --paths hub,bare --rate 0 --json results.json
    .venv/bin/python scripts/bench_relay.py --clients 10 --messages 50 --rate 0,1000 --seconds 5 --quiet-wait 0

The clients are ``scripts/bench_relay_clients.mjs``; the Python is the ``benchrelay`` package beside this file
(``_common``, ``_servers``, ``_procs``, ``_driver``, ``_report``, ``_cli``).

Needs Node >= 18 with tests/node/node_modules (``scripts/test`` installs it; so does this script, once).
BENCHMARKS.md has the numbers of a run and how to read them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # web/, actors/, fake_comfyui and benchrelay

from benchrelay import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
