"""Prometheus metrics: a registry per app (no globals), counters fed by the web layer, gauges filled on scrape
by asking the actors for their statistics."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from actors import NoAnswer, ask_within, registry, scheduler, sessions
from actors.gateway import Handles

from ._outbox import Outbox

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0  # seconds to wait for each actor's statistics
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RelayStats(Collector):
    """What the connection writers count per message: ``gateway_messages_sent_total{type}`` and the
    ``gateway_relay_latency_seconds`` histogram, the same series as a prometheus-client ``Counter`` and
    ``Histogram`` would give, kept in plain ints and floats. Every message to every client passes here, and the
    library's metrics take a lock per update (~0.8 µs per message for the two, against ~0.15 µs here); the writers
    and the scrape all run in the one trio thread, so nothing needs a lock."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.sent: dict[str, int] = {}
        self.created: dict[str, float] = {}  # when each type was first counted (the library's ``_created``)
        self.since = time.time()
        self.buckets = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.total = 0.0

    def relayed(self, kind: str, latency: float) -> None:
        sent = self.sent
        if kind in sent:
            sent[kind] += 1
        else:
            sent[kind] = 1
            self.created[kind] = time.time()
        self.buckets[bisect_left(self.bounds, latency)] += 1  # le: a latency equal to a bound is in its bucket
        self.total += latency

    def collect(self) -> Iterator[Metric]:
        sent = CounterMetricFamily("gateway_messages_sent", "STOMP messages written to clients", labels=["type"])
        for kind, n in self.sent.items():
            sent.add_metric([kind], n, created=self.created[kind])
        yield sent
        latency = HistogramMetricFamily(
            "gateway_relay_latency_seconds", "time from an event reaching its session to its frame being written"
        )
        cumulative, buckets = 0, []
        for le, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.buckets, strict=True):
            cumulative += n
            buckets.append((le, cumulative))
        latency.add_metric([], buckets, self.total)
        latency.add_sample("gateway_relay_latency_seconds_created", {}, self.since)
        yield latency


class Metrics:
    def __init__(self, handles: Handles) -> None:
        self.h = handles
        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.ws_opened = Counter("gateway_ws_connections_opened", "WebSocket connections accepted", registry=reg)
        self.ws_closed = Counter("gateway_ws_connections_closed", "WebSocket connections closed", registry=reg)
        self.ws_open = Gauge("gateway_ws_connections", "WebSocket connections open now", registry=reg)
        self.relay = RelayStats()
        reg.register(self.relay)
        self.relayed = self.relay.relayed  # the writers call it once per message
        self.dropped = Counter(
            "gateway_messages_dropped", "progress/preview messages dropped for full outboxes", registry=reg
        )
        self.slow = Counter("gateway_slow_consumers", "connections closed as slow consumers", registry=reg)
        self.sessions = Gauge("gateway_sessions", "live sessions", registry=reg)
        self.sockjs_sessions = Gauge(
            "gateway_sockjs_sessions", "live SockJS sessions on HTTP transports", registry=reg
        )  # fed by web.sockjs (set_function)
        self.tasks = Gauge("gateway_tasks", "non-terminal tasks by state", ["state"], registry=reg)
        self.queue = Gauge("gateway_queue_depth", "tasks waiting for dispatch", registry=reg)
        self.inflight = Gauge("gateway_backend_inflight", "prompts inside ComfyUI", ["backend"], registry=reg)
        self.up = Gauge("gateway_backend_up", "1 when the backend's socket is connected", ["backend"], registry=reg)
        self.reconnects = Gauge(
            "gateway_backend_reconnects", "socket reconnects per backend", ["backend"], registry=reg
        )

    def connections_opened(self) -> None:
        self.ws_opened.inc()
        self.ws_open.inc()

    def connections_closed(self, outbox: Outbox) -> None:
        self.ws_closed.inc()
        self.ws_open.dec()
        if outbox.dropped:
            self.dropped.inc(outbox.dropped)

    def slow_consumer(self) -> None:
        self.slow.inc()

    async def _ask(self, target: Any, build: Any) -> Any:
        try:
            return await ask_within(target, build, SCRAPE_TIMEOUT)
        except NoAnswer:
            return None

    async def render(self) -> tuple[bytes, str]:
        hub = await self._ask(self.h.sessions, lambda r: sessions.GetStats(r))
        if hub is not None:
            self.sessions.set(hub.sessions)
        reg = await self._ask(self.h.registry, lambda r: registry.GetStats(r))
        if reg is not None:
            for state, n in reg.by_state.items():
                self.tasks.labels(state).set(n)
        sched = await self._ask(self.h.scheduler, lambda r: scheduler.GetStats(r))
        if sched is not None:
            self.queue.set(sched.waiting)
            for name, n in sched.inflight.items():
                self.inflight.labels(name).set(n)
        for name, st in self.h.comfy_stats.items():
            snap = st.statistics()
            self.up.labels(name).set(1 if snap.connected else 0)
            self.reconnects.labels(name).set(snap.reconnects)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
