#!/usr/bin/env python3
"""Long hypothesis run of the STOMP codec properties from tests/test_stomp_codec.py.

    .venv/bin/python scripts/fuzz_stomp.py --examples 200000            # both properties
    .venv/bin/python scripts/fuzz_stomp.py --examples 50000 --property fuzz --seed 7

Properties (the same functions and strategies the test module runs with 300 examples):
  round-trip  a valid session (any version, CONNECT..DISCONNECT, heart-beats) encoded with encode_frame and
              split at random points parses back to exactly its frames;
  fuzz        random bytes, random bytes after a valid CONNECT, and mutated valid sessions, fed in random
              chunks with small and default limits, only ever raise RemoteProtocolError; the ERROR frame
              it carries can always be sent, parsed headers can always be echoed, and the buffer never
              holds more than max_frame_size + 1 bytes after NEED_DATA.
Exit status 0 when every property held, 1 with hypothesis's minimal failing example otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_stomp_codec as props  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTIES: dict[str, tuple[Callable[..., None], dict[str, st.SearchStrategy[Any]]]] = {
    "round-trip": (props.check_round_trip, {"session": props.sessions(), "cuts": st.lists(st.integers(0, 2000), max_size=12)}),
    "fuzz": (props.check_fuzz, {"case": props.fuzz_inputs()}),
}  # fmt: skip
PROGRESS_EVERY = 10_000  # examples


def run(name: str, examples: int, rng_seed: int | None) -> bool:
    check, strategies = PROPERTIES[name]
    calls = 0
    started = time.monotonic()

    def counted(**kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls % PROGRESS_EVERY == 0:
            print(f"  {name}: {calls} examples, {time.monotonic() - started:.0f} s", flush=True)
        check(**kwargs)

    test = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )(given(**strategies)(counted))
    if rng_seed is not None:
        test = seed(rng_seed)(test)
    print(f"{name}: up to {examples} examples", flush=True)
    try:
        test()
    except Exception as exc:  # the property failed: hypothesis has printed the minimal example
        print(f"{name}: FAILED after {calls} calls: {exc!r}", flush=True)
        return False
    print(f"{name}: ok, {calls} calls in {time.monotonic() - started:.1f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200_000, help="examples per property (default 200000)")
    parser.add_argument("--property", choices=[*PROPERTIES, "all"], default="all")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed, for a reproducible run")
    args = parser.parse_args(argv)
    names = list(PROPERTIES) if args.property == "all" else [args.property]
    results = [run(name, args.examples, args.seed) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
