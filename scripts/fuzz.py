"""Long fuzz of the whole gateway surface: ``.venv/bin/python scripts/fuzz.py --inputs 1000000``.

Runs the simulator and the gateway in this process (``_fuzz_surface``): HTTP bodies and STOMP frames from a fast
seeded generator of the same kinds of input as the hypothesis strategies of ``tests/test_fuzz_surface.py`` (odd
unicode and lone surrogates, invalid UTF-8, depth up to 20,000, huge and negative numbers, wrong types), or with
``--hypothesis`` drawn by those strategies in batches (slow: ~10 ms an input), mostly through Quart's in-process client and every
``--socket-every``-th HTTP input over a real socket. Property: every request answered (a contract status, never
500; every frame a RECEIPT or an ERROR), and at the end the ledger audit is clean and /healthz answers. Exits 1
at the first violation, printing it. Bounded: ``--inputs`` and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _fuzz_surface import HTTP_CASES, STOMP_FRAMES, HttpCase, fast_http_case, fast_stomp_frame, surface
from fake_comfyui import FakeComfyUI


def draw(strategy: object, n: int, batch_seed: int) -> list[object]:
    out: list[object] = []

    @seed(batch_seed)
    @settings(max_examples=n, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: object) -> None:
        out.append(value)

    collect()
    return out


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as data:
        async with trio.open_nursery() as nursery:
            sim = FakeComfyUI(step_ms=1, seed=args.seed, previews=False)
            port = await nursery.start(sim.serve)
            async with surface(data, f"http://127.0.0.1:{port}", socket_every=args.socket_every) as s:
                done, batch = 0, 0
                while done < args.inputs and time.monotonic() - started < args.max_seconds:
                    batch += 1
                    n = min(args.batch, args.inputs - done)
                    stomp_n = n // 2
                    if args.hypothesis:
                        cases = draw(HTTP_CASES, n - stomp_n, args.seed * 1_000_003 + batch)
                        frames = draw(STOMP_FRAMES, stomp_n, args.seed * 1_000_033 + batch)
                    else:
                        cases = [fast_http_case(rng) for _ in range(n - stomp_n)]
                        frames = [fast_stomp_frame(rng) for _ in range(stomp_n)]
                    for case in cases:
                        assert isinstance(case, HttpCase)
                        await s.http_case(case)
                    for frame in frames:
                        assert isinstance(frame, bytes)
                        await s.stomp_case(frame)
                    done += len(cases) + len(frames)
                    if batch % args.report_every == 0:
                        rate = done / (time.monotonic() - started)
                        print(
                            f"{done} inputs, {rate:.0f}/s; http {s.stats.http} (socket {s.stats.socket}) "
                            f"statuses {dict(sorted(s.stats.statuses.items()))}; stomp {s.stats.stomp} "
                            f"{s.stats.stomp_outcomes}",
                            flush=True,
                        )
                problems = await s.check_end()
                elapsed = time.monotonic() - started
                print(
                    f"DONE {done} inputs in {elapsed:.0f}s ({done / elapsed:.0f}/s): http {s.stats.http} "
                    f"(over a socket {s.stats.socket}), statuses {dict(sorted(s.stats.statuses.items()))}; "
                    f"stomp {s.stats.stomp} {s.stats.stomp_outcomes}; sim ran {len(sim.runs)} prompts; "
                    f"audit {problems or 'clean'}",
                    flush=True,
                )
            nursery.cancel_scope.cancel()
    return 1 if problems else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1000, help="inputs drawn per hypothesis batch")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--socket-every", type=int, default=50, help="every N-th HTTP input goes over a real socket")
    p.add_argument("--report-every", type=int, default=10, help="batches between progress lines")
    p.add_argument("--max-seconds", type=float, default=6 * 3600)
    p.add_argument(
        "--hypothesis",
        action="store_true",
        help="draw inputs with the hypothesis strategies (about 10 ms per input) instead of the fast "
        "seeded generator of the same kinds of input",
    )
    logging.basicConfig(level=logging.CRITICAL)  # the gateway logs every refusal; the numbers are what counts
    sys.exit(trio.run(main, p.parse_args()))
