#!/usr/bin/env python3
"""How long each GPU waits between two prompts, with a backlog: the simulator's idle gaps, per backend.

Starts N ComfyUI simulators and the whole gateway in this process (free ports on 127.0.0.1), queues a backlog of
tasks while the simulators are paused (so every gap measured has work waiting), resumes them, waits until all
tasks ran, and prints per backend the gaps between one prompt's end and the next one's start
(``FakeComfyUI.gaps()``). With ``--max-inflight 2`` (the default) the next prompt is already inside ComfyUI's
queue when the current one ends, so the gaps are the simulator's own bookkeeping (microseconds); with
``--max-inflight 1`` every gap holds a whole gateway round trip (terminal event -> registry -> scheduler ->
POST /prompt), which is what ``--max-inflight 2`` exists to hide.

    .venv/bin/python scripts/gaps.py [--backends 2] [--tasks 24] [--max-inflight 2] [--steps 20] [--step-ms 5]
    .venv/bin/python scripts/gaps.py --compare      # the same backlog with --max-inflight 1 and 2

``measure_gaps(...)`` is the same as a function (the tests use it).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout: the gateway's packages live next to scripts/
    sys.path.insert(0, str(ROOT))

from fake_comfyui import FakeComfyUI  # noqa: E402  (scripts/ is this file's own directory)

WORKFLOW = ROOT / "web" / "static" / "txt2img.json"
POLL_S = 0.01  # how often the finish line is looked at (it does not affect the gaps measured)
USERS = 4  # the backlog is spread over this many users (each one's queue cap is 32)


def txt2img(steps: int) -> dict[str, Any]:
    workflow = json.loads(WORKFLOW.read_text())
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return workflow


async def measure_gaps(
    *,
    backends: int = 2,
    tasks: int = 24,
    max_inflight: int = 2,
    steps: int = 20,
    step_ms: float = 5.0,
    timeout: float = 120.0,
) -> dict[str, list[float]]:
    """Run the backlog; return {backend name: [gap seconds, ...]} (names b0, b1, ... as the gateway's)."""
    from actors.comfy import ComfyTimeouts, RestartPolicy
    from actors.gateway import GatewayConfig
    from web.config import WebConfig
    from web.server import serve_gateway

    sims = [FakeComfyUI(step_ms=step_ms, seed=i, previews=False) for i in range(backends)]
    with tempfile.TemporaryDirectory(prefix="gaps-") as data:
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
            for sim in sims:
                await nursery.start(sim.serve)
                sim.pause()  # the backlog is built first: every gap measured then has work waiting
            gw = GatewayConfig(
                comfyui_urls=tuple(sim.url for sim in sims),
                store_path=f"{data}/gateway.db",
                max_inflight=max_inflight,
                initial_credits=10 * tasks,
                price=1,
                comfy_policy=RestartPolicy(initial_delay=0.05, max_delay=0.5, max_restarts=1000),
                comfy_timeouts=ComfyTimeouts(http=10, first_status=5),
            )
            shutdown = trio.Event()
            running = await nursery.start(
                lambda task_status: serve_gateway(
                    gw,
                    WebConfig(bind="127.0.0.1:0"),
                    secret=b"gaps-" + b"x" * 32,
                    shutdown=shutdown,
                    task_status=task_status,
                )
            )
            with trio.fail_after(timeout):
                workflow = txt2img(steps)
                for n in range(tasks):
                    user = f"user{n % USERS}"
                    r = await http.post(
                        f"{running.url}/api/tasks",
                        json={"clientId": "gaps", "workflow": workflow},
                        headers={"Authorization": f"Bearer {running.auth.issue(user)}"},
                    )
                    r.raise_for_status()
                while sum(len(sim.submitted) for sim in sims) < min(tasks, backends * max_inflight):
                    await trio.sleep(POLL_S)  # the backends connected and took their first prompts
                for sim in sims:
                    sim.resume()
                while sum(len(sim.runs) for sim in sims) < tasks:
                    await trio.sleep(POLL_S)
            shutdown.set()
            nursery.cancel_scope.cancel()
    return {f"b{i}": sim.gaps() for i, sim in enumerate(sims)}


def summary(gaps: Mapping[str, Sequence[float]]) -> list[str]:
    lines = []
    for name, values in gaps.items():
        if not values:
            lines.append(f"  {name}: no gaps (fewer than 2 prompts)")
            continue
        ms = sorted(v * 1000 for v in values)
        lines.append(
            f"  {name}: {len(ms)} gaps  median {statistics.median(ms):.3f} ms  mean {statistics.fmean(ms):.3f} ms  "
            f"max {ms[-1]:.3f} ms  total idle {sum(ms):.1f} ms"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", type=int, default=2)
    p.add_argument("--tasks", type=int, default=24)
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="KSampler steps per prompt")
    p.add_argument("--step-ms", type=float, default=5.0, help="simulated milliseconds per step")
    p.add_argument("--compare", action="store_true", help="run with --max-inflight 1 and 2")
    args = p.parse_args(argv)
    for inflight in (1, 2) if args.compare else (args.max_inflight,):
        gaps = trio.run(
            functools.partial(
                measure_gaps,
                backends=args.backends,
                tasks=args.tasks,
                max_inflight=inflight,
                steps=args.steps,
                step_ms=args.step_ms,
            )
        )
        print(
            f"max-inflight {inflight}, {args.tasks} tasks on {args.backends} backend(s), "
            f"{args.steps} steps x {args.step_ms:g} ms:"
        )
        print("\n".join(summary(gaps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
