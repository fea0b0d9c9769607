"""A bounded fuzz of the whole surface (HTTP bodies and STOMP frames with odd unicode, depth, sizes and types):
every request answered with a status the contract names, every frame answered, the ledger audit clean, the
process up. ``scripts/fuzz.py`` runs the same harness for millions of inputs (numbers in CHAOS.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _fuzz_surface import HTTP_CASES, STOMP_FRAMES, HttpCase, surface
from hypothesis import HealthCheck, given, settings

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


async def test_fuzzed_http_and_stomp_never_take_the_gateway_down(sim: Any, tmp_path: Path) -> None:
    async with surface(str(tmp_path), sim.url, socket_every=10) as s:

        @FUZZ
        @given(case=HTTP_CASES)
        def http_property(case: HttpCase) -> None:
            cases.append(case)

        @FUZZ
        @given(frame=STOMP_FRAMES)
        def stomp_property(frame: bytes) -> None:
            frames.append(frame)

        cases: list[HttpCase] = []
        frames: list[bytes] = []
        http_property()  # hypothesis drives sync functions: draw the inputs, then replay them against the gateway
        stomp_property()
        for case in cases:
            await s.http_case(case)
        for frame in frames:
            await s.stomp_case(frame)
        assert await s.check_end() == []
        assert s.stats.http == len(cases) >= 150 and s.stats.stomp == len(frames) >= 150
        assert s.stats.socket >= 15 and s.stats.statuses.get(400, 0) > 0, s.stats
        assert s.stats.stomp_outcomes.get("receipt", 0) > 0 and s.stats.stomp_outcomes.get("error", 0) > 0, s.stats
        print(s.stats)
