"""The chaos run (scripts/chaos.py) with small numbers and a fixed set of seeds.

Each seed plans 40 tasks from 3 users with two SIGKILLs of the gateway (restarted on the same data directory),
two kills of the ComfyUI simulator (a coin per restart decides whether it forgets its history), two cuts of
ComfyUI's sockets, four client drops (resumed with last-seq), three admin grants, a few cancels, failing and
invalid workflows and users running out of credits, and hostile users (poison workflows over HTTP and STOMP, a
session flood with submit/cancel cycles, replay storms). The auditor (scripts/_chaos_audit.py) must find nothing,
and well-behaved users' POST -> `queued` latency must stay bounded.
Seeds 3, 4, 13 and 42 are here because they once found something (a resume across two restarts that lost
terminal messages; harness races); a failure prints the seed and the replay command.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos import ChaosConfig, run_chaos

SEEDS = (3, 4, 13, 42)


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_run_loses_nothing(seed: int, tmp_path: Path) -> None:
    cfg = ChaosConfig(
        seed=seed,
        tasks=40,
        users=3,
        gateway_kills=2,
        sim_kills=2,
        socket_cuts=2,
        client_drops=4,
        grants=3,
        settle_timeout=60,
        workdir=str(tmp_path),
        latency_bound=5.0,
    )  # CI shares 2 cores with other runs: catch the 5.9 s median of issue 10, not noise
    report = await run_chaos(cfg)
    assert report.ok, "\n".join(
        [
            f"seed {seed} (replay: scripts/chaos.py --seed {seed} --tasks 40 --users 3)",
            *report.problems,
            f"stats: {report.stats}",
        ]
    )
    stats = report.stats
    # every accepted task is in the store; a submit whose answer was lost may or may not have made one (the
    # session flooder's submit/cancel cycles are tasks too)
    hostile = stats["hostile"]
    assert stats["accepted"] + hostile["flood_cycles"] <= stats["tasks"]
    assert stats["tasks"] <= stats["accepted"] + stats["answers_lost"] + hostile["flood_submits"]
    assert stats["gateway_starts"] == 3 and stats["frozen"] == 0
    assert stats["faults"]["gateway_kill"] == 2 and stats["faults"]["sim_kill"] == 2
    assert hostile["poison_http_refused"] >= 1 and hostile["storms_cut"] >= 1 and hostile["flood_sessions"] == 80


async def test_chaos_run_on_redis_with_three_processes_loses_nothing(tmp_path: Path) -> None:
    """The same plan on ``--store redis``: three gateway processes on a private Redis, clients spread over them,
    SIGKILLs of any process (the core or an edge), and Redis itself SIGKILLed and restarted on its AOF, with the
    hostile users (on Redis the session flooder's sessions also cost every process: each one's balance messages
    go through the events stream all processes read)."""
    cfg = ChaosConfig(
        seed=7,
        tasks=40,
        users=3,
        gateway_kills=2,
        sim_kills=1,
        socket_cuts=1,
        client_drops=3,
        grants=2,
        settle_timeout=60,
        workdir=str(tmp_path),
        latency_bound=5.0,  # as above: CI shares the machine
        store="redis",
        processes=3,
        redis_restarts=1,
    )
    report = await run_chaos(cfg)
    assert report.ok, "\n".join(
        [
            "replay: scripts/chaos.py --seed 7 --tasks 40 --users 3 --store redis",
            *report.problems,
            f"stats: {report.stats}",
        ]
    )
    stats = report.stats
    assert stats["faults"]["gateway_kill"] == 2 and stats["faults"]["redis_restart"] == 1
    assert stats["gateway_starts"] == 3 + 2 and stats["frozen"] == 0
    hostile = stats["hostile"]
    assert hostile["poison_http_refused"] >= 1 and hostile["storms_cut"] >= 1 and hostile["flood_sessions"] == 80
