"""Hostile users for ``scripts/chaos.py`` (issue 10), and the check that well-behaved users did not feel them.

* a **poisoner** sends workflows that must be refused at the door (lone surrogates in a value, a key and a node
  id, nesting 1,000 deep, invalid UTF-8, NaN, 10,000 nodes) over HTTP (each must get 400) and over STOMP (each
  must get a ``rejected``);
* a **session flooder** connects, subscribes and leaves with a new clientId each time (far more than the per-user
  session limit), with submit/cancel cycles in between (balance fan-out to every session it ever made);
* a **replay stormer** re-subscribes with ``last-seq: 0`` in a loop until it is cut with ERROR "too many replays".

Their refusals are counted; a wrong answer (a 202 or 5xx for poison, a storm never cut) is a problem. Answers
lost while the gateway is being killed are not. ``queued_latency`` measures, for well-behaved users, the time from
their POST to their ``queued`` message, leaving out submissions that overlapped a gateway restart.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import trio
from _chaos_client import _frame, _parse
from _chaos_lib import GatewayProcess, make_workflow
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

LONE_VALUE = b'{"clientId": "%s", "workflow": {"3": {"class_type": "KSampler", "inputs": {"text": "a \\ud800"}}}}'
LONE_KEY = b'{"clientId": "%s", "workflow": {"3": {"class_type": "KSampler", "inputs": {"\\udc00": 1}}}}'
LONE_NODE = b'{"clientId": "%s", "workflow": {"\\ud83d": {"class_type": "KSampler", "inputs": {}}}}'
DEEP = b'{"clientId": "%s", "workflow": ' + b"[" * 1000 + b"]" * 1000 + b"}"
BAD_UTF8 = b'{"clientId": "%s", "workflow": {"3": {"class_type": "\xff\xfe", "inputs": {}}}}'
NAN = b'{"clientId": "%s", "workflow": {"3": {"class_type": "KSampler", "inputs": {"cfg": NaN}}}}'
HUGE = json.dumps(
    {"clientId": "%s", "workflow": {str(i): {"class_type": "Note", "inputs": {}} for i in range(10_000)}}
).encode()
POISONS = (LONE_VALUE, LONE_KEY, LONE_NODE, DEEP, BAD_UTF8, NAN, HUGE)
MAX_FRAME = 64 * 1024  # the gateway's default --max-frame-size
STOMP_ERRORS = (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError, trio.TooSlowError)


@dataclass
class HostileStats:
    poison_http: int = 0
    poison_http_refused: int = 0
    poison_stomp: int = 0
    poison_stomp_rejected: int = 0
    flood_sessions: int = 0
    flood_refused: int = 0
    flood_submits: int = 0  # POSTs sent (a lost answer may still have made a task)
    flood_cycles: int = 0  # accepted (then cancelled)
    storms: int = 0  # storms that ran to an answer (cut, or not cut: a problem)
    storms_cut: int = 0
    storms_interrupted: int = 0  # cut short by a gateway kill or a dropped socket: tried again
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "problems"}


async def _stomp(gw: GatewayProcess, user: str, client_id: str) -> Any:
    ws_cm = open_websocket_url(gw.ws_url, subprotocols=["v12.stomp"], connect_timeout=3, disconnect_timeout=2)
    ws = await ws_cm.__aenter__()
    await ws.send_message(
        _frame(
            "CONNECT",
            {
                "accept-version": "1.2",
                "heart-beat": "0,0",
                "clientId": client_id,
                "Authorization": f"Bearer {gw.issue(user)}",
            },
        )
    )
    return ws_cm, ws


async def _next(ws: Any, buf: list[bytes], timeout: float = 10) -> Any:
    with trio.fail_after(timeout):
        while True:
            frame, rest = _parse(buf[0])
            buf[0] = rest
            if frame is not None:
                return frame
            data = await ws.get_message()
            buf[0] += data.encode() if isinstance(data, str) else data


async def poisoner(
    gw: GatewayProcess, http: httpx.AsyncClient, rng: random.Random, rounds: int, stats: HostileStats
) -> None:
    user = "hostile-poison"
    for i in range(rounds):
        await gw.wait_up()
        body = rng.choice(POISONS).replace(b"%s", b"p1")
        stats.poison_http += 1
        try:
            r = await http.post(
                gw.url + "/api/tasks", content=body, headers=gw.headers(user) | {"content-type": "application/json"}
            )
        except httpx.HTTPError:
            continue  # the gateway is being killed
        if r.status_code == 400 and r.json().get("error") in ("bad_json", "bad_workflow"):
            stats.poison_http_refused += 1
        elif r.status_code != 503:
            stats.problems.append(f"poison over HTTP answered {r.status_code} {r.text[:150]}")
        if i % 4 == 0:
            await _poison_stomp(gw, user, rng, stats)
        await trio.sleep(rng.expovariate(1 / 0.05))  # seeded pacing


async def _poison_stomp(gw: GatewayProcess, user: str, rng: random.Random, stats: HostileStats) -> None:
    try:
        ws_cm, ws = await _stomp(gw, user, "p1")
    except STOMP_ERRORS:
        return
    try:
        buf = [b""]
        await ws.send_message(_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "sub"}))
        while (await _next(ws, buf)).command != "RECEIPT":
            pass
        body = rng.choice(POISONS).replace(b"%s", b"p1")
        stats.poison_stomp += 1
        await ws.send_message(_frame("SEND", {"destination": "/app/tasks"}, body))
        while True:
            frame = await _next(ws, buf)
            if frame.command == "MESSAGE" and json.loads(frame.body).get("type") == "rejected":
                stats.poison_stomp_rejected += 1
                return
            if frame.command == "ERROR":  # a body over --max-frame-size is refused by the codec, as it must be
                if len(body) > MAX_FRAME and frame.headers.get("message") == "frame too large":
                    stats.poison_stomp_rejected += 1
                else:
                    stats.problems.append(f"poison over STOMP got ERROR {frame.headers}")
                return
    except STOMP_ERRORS:
        return
    finally:
        await ws_cm.__aexit__(None, None, None)


async def flooder(
    gw: GatewayProcess, http: httpx.AsyncClient, rng: random.Random, sessions: int, stats: HostileStats
) -> None:
    user = "hostile-flood"
    for i in range(sessions):
        await gw.wait_up()
        stats.flood_sessions += 1
        try:
            ws_cm, ws = await _stomp(gw, user, f"flood-{i}")
            try:
                buf = [b""]
                frame = await _next(ws, buf)
                if frame.command == "ERROR":
                    stats.flood_refused += 1
                else:
                    await ws.send_message(
                        _frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
                    )
                    await _next(ws, buf)
            finally:
                await ws_cm.__aexit__(None, None, None)
        except STOMP_ERRORS:
            continue
        if i % 20 == 0:  # a submit/cancel cycle: every balance change goes to the user's sessions
            stats.flood_submits += 1
            try:
                r = await http.post(
                    gw.url + "/api/tasks",
                    headers=gw.headers(user),
                    json={"clientId": f"flood-{i}", "workflow": make_workflow("ok", seed=i)},
                )
                if r.status_code == 202:
                    stats.flood_cycles += 1
                    await http.delete(f"{gw.url}/api/tasks/{r.json()['taskId']}", headers=gw.headers(user))
            except httpx.HTTPError:
                pass


async def stormer(gw: GatewayProcess, rounds: int, max_replays: int, stats: HostileStats) -> None:
    """``rounds`` storms that run to an answer. One cut short by a gateway kill proves nothing either way, so it
    is counted apart and tried again (at most ``5 × rounds`` attempts in all)."""
    user = "hostile-storm"
    for _ in range(5 * rounds):
        if stats.storms >= rounds:
            return
        await gw.wait_up()
        try:
            ws_cm, ws = await _stomp(gw, user, "storm")
        except STOMP_ERRORS:
            continue
        try:
            buf = [b""]
            await _next(ws, buf)  # CONNECTED
            for i in range(max_replays + 5):
                await ws.send_message(
                    _frame(
                        "SUBSCRIBE",
                        {"id": "s", "destination": "/user/topic/messages", "last-seq": "0", "receipt": f"r{i}"},
                    )
                )
                frame = await _next(ws, buf)
                while frame.command == "MESSAGE":
                    frame = await _next(ws, buf)
                if frame.command == "ERROR":
                    stats.storms += 1
                    if frame.headers.get("message") == "too many replays":
                        stats.storms_cut += 1
                    else:
                        stats.problems.append(f"replay storm got ERROR {frame.headers}")
                    break
                await ws.send_message(_frame("UNSUBSCRIBE", {"id": "s"}))
            else:
                stats.storms += 1
                stats.problems.append(f"a replay storm of {max_replays + 5} was never cut")
        except STOMP_ERRORS:
            stats.storms_interrupted += 1
        finally:
            await ws_cm.__aexit__(None, None, None)


def queued_latency(
    submits: list[tuple[str, str, float]],
    seen: dict[str, list[Any]],
    restarts: list[tuple[float, float]],
    settle: float = 2.0,
) -> list[float]:
    """Seconds from POST to ``queued`` for well-behaved users' accepted tasks ((user, taskId, wall time) each),
    leaving out those whose window overlaps a gateway kill/restart plus ``settle`` seconds (a restarted gateway
    first reloads and reconciles its backlog)."""
    arrival: dict[str, float] = {}
    for messages in seen.values():
        for m in messages:
            if m.body.get("type") == "queued":
                arrival.setdefault(m.body["taskId"], m.at)
    out = []
    for _, task_id, t0 in submits:
        t1 = arrival.get(task_id)
        if t1 is None or any(t0 <= end + settle and t1 >= start for start, end in restarts):
            continue
        out.append(t1 - t0)
    return out


LEASE_LOST = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) WARNING actors\.lease: lease: \S+ stopped its core")


def failovers_in_logs(paths: list[Path], ttl: float) -> list[tuple[float, float]]:
    """Wall-clock windows of the failovers nobody planned: a core that stopped its actors because its lease was
    lost (renewals failed for ``ttl`` seconds: Redis slow, or the process starved of CPU), found in the gateways'
    logs. Each window starts ``ttl`` before the core gave up (its renewals were failing) and ends 2 s after, as
    for the harness's own kills: a submit in it waits for the next core like one after a SIGKILL."""
    out = []
    for path in paths:
        if path.exists():
            for line in path.read_bytes().splitlines():
                if m := LEASE_LOST.match(line):
                    at = datetime.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time
                    out.append((at - ttl, at + 2.0))
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def now() -> float:
    return time.time()
