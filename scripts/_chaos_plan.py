"""The chaos run's configuration and its seeded plan (which task, user, workflow and fault, and when), for
``scripts/chaos.py``; the plan depends on the seed only."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChaosConfig:
    seed: int = 1
    tasks: int = 60
    users: int = 4
    gateway_kills: int = 2
    sim_kills: int = 2
    forget_share: float = 0.5  # share of simulator restarts that forget everything (a new ComfyUI)
    socket_cuts: int = 2
    client_drops: int = 4
    grants: int = 3
    cancel_share: float = 0.05  # per submission: also cancel one of the user's three latest tasks
    fail_share: float = 0.1  # workflows that fail while running
    invalid_share: float = 0.05  # workflows ComfyUI refuses (400)
    max_size: int = 3
    initial_credits: int = 0  # 0: about 80% of what the user's tasks would cost
    mean_gap: float = 0.03  # seconds between one user's submissions (exponential)
    step_ms: float = 5.0
    steps: int = 4
    max_inflight: int = 2
    settle_timeout: float = 120.0
    workdir: str = ""
    hostile: bool = True  # poisoner, session flooder and replay stormer alongside the well-behaved users
    poison_rounds: int = 0  # 0: tasks // 5
    flood_sessions: int = 0  # 0: tasks * 2 (the per-user session limit is 64)
    storm_rounds: int = 0  # 0: tasks // 50, at least 2
    max_replays: int = 10  # the gateway's --max-replays-per-minute in this run
    latency_bound: float = 1.0  # seconds: p95 of well-behaved users' POST -> queued ...
    restart_settle: float = 10.0  # ... leaving out submits within this long after a gateway restart
    store: str = "sqlite"  # "redis": a private redis-server and ``processes`` gateways on it (one core, edges)
    processes: int = 3  # with store "redis"
    redis_restarts: int = 0  # with store "redis": SIGKILLs of Redis (restarted on its AOF)

    def credits(self) -> int:
        if self.initial_credits:
            return self.initial_credits
        return max(5, int(0.8 * self.tasks / self.users * (1 + self.max_size) / 2))


@dataclass
class Plan:
    tasks: list[tuple[str, str, int, float]]  # (user, workflow kind, size, pause before it)
    events: list[tuple[int, str, dict[str, Any]]]  # (after this many submissions, kind, parameters)


def make_plan(cfg: ChaosConfig) -> Plan:
    rng = random.Random(cfg.seed)
    users = [f"user{i}" for i in range(cfg.users)]
    tasks = []
    for _ in range(cfg.tasks):
        r = rng.random()
        kind = "invalid" if r < cfg.invalid_share else "fail" if r < cfg.invalid_share + cfg.fail_share else "ok"
        tasks.append((rng.choice(users), kind, rng.randint(1, cfg.max_size), rng.expovariate(1 / cfg.mean_gap)))
    events: list[tuple[int, str, dict[str, Any]]] = []

    def at() -> int:
        return rng.randint(1, max(1, cfg.tasks - 1))

    for _ in range(cfg.gateway_kills):
        events.append((at(), "gateway_kill", {"down": rng.uniform(0, 0.5), "which": rng.random()}))
    for _ in range(cfg.redis_restarts):
        events.append((at(), "redis_restart", {"down": rng.uniform(0, 0.5)}))
    for _ in range(cfg.sim_kills):
        events.append((at(), "sim_kill", {"forget": rng.random() < cfg.forget_share, "down": rng.uniform(0, 0.5)}))
    for _ in range(cfg.socket_cuts):
        events.append((at(), "socket_cut", {}))
    for _ in range(cfg.client_drops):
        events.append((at(), "client_drop", {"user": rng.choice(users)}))
    for g in range(cfg.grants):
        events.append(
            (
                at(),
                "grant",
                {
                    "user": rng.choice(users),
                    "amount": rng.randint(1, 3 * cfg.max_size),
                    "admin": f"chaos-admin-{cfg.seed}-{g}",
                },
            )
        )
    for i in range(cfg.tasks):
        if rng.random() < cfg.cancel_share:
            events.append((i, "cancel", {"user": tasks[i][0], "pick": rng.random()}))
    events.sort(key=lambda e: e[0])  # stable: same-index events keep their seeded order
    return Plan(tasks, events)


@dataclass
class RunStats:
    submitted: int = 0
    accepted: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    answers_lost: int = 0
    cancels: int = 0
    events: dict[str, int] = field(default_factory=dict)


__all__ = ["ChaosConfig", "Plan", "RunStats", "make_plan"]
