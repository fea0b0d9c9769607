"""``python scripts/fake_comfyui.py --port P ...``: run one simulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ._constants import DEFAULT_STEP_MS
from ._net import _host_for_url
from ._server import FakeComfyUI

log = logging.getLogger("fake_comfyui")

# --- CLI ----------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A ComfyUI simulator (HTTP + WebSocket on one port).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed)")
    parser.add_argument("--step-ms", type=float, default=DEFAULT_STEP_MS, help="time per sampling step")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of prompts that fail (0..1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the failure randomness")
    parser.add_argument("--no-previews", action="store_true", help="no sampler preview images")
    parser.add_argument("--cache", action="store_true", help="cache node outputs like ComfyUI's classic cache")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def _run_until_signalled(sim: FakeComfyUI, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(sim.serve, host=host, port=port))
            print(f"fake ComfyUI listening on http://{_host_for_url(host)}:{bound}", flush=True)
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    sim = FakeComfyUI(
        step_ms=args.step_ms, fail_rate=args.fail_rate, seed=args.seed, previews=not args.no_previews, cache=args.cache
    )
    trio.run(_run_until_signalled, sim, args.host, args.port)
    return 0
