"""Prometheus metrics: a registry per app (no globals), counters fed by the web layer, gauges filled on scrape
by asking the actors for their statistics."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from actors import NoAnswer, ask_within, registry, scheduler, sessions
from actors.gateway import Handles

from ._outbox import Outbox

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0  # seconds to wait for each actor's statistics


class Metrics:
    def __init__(self, handles: Handles) -> None:
        self.h = handles
        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.ws_opened = Counter("gateway_ws_connections_opened", "WebSocket connections accepted", registry=reg)
        self.ws_closed = Counter("gateway_ws_connections_closed", "WebSocket connections closed", registry=reg)
        self.ws_open = Gauge("gateway_ws_connections", "WebSocket connections open now", registry=reg)
        self.sent = Counter("gateway_messages_sent", "STOMP messages written to clients", ["type"], registry=reg)
        self._sent_by_kind: dict[str, Any] = {}
        self.dropped = Counter(
            "gateway_messages_dropped", "progress/preview messages dropped for full outboxes", registry=reg
        )
        self.slow = Counter("gateway_slow_consumers", "connections closed as slow consumers", registry=reg)
        self.latency = Histogram(
            "gateway_relay_latency_seconds",
            "time from an event reaching its session to its frame being written",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=reg,
        )
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

    def relayed(self, kind: str, latency: float) -> None:
        child = self._sent_by_kind.get(kind)
        if child is None:  # labels() costs a lock and a lookup: once per message type, not per message
            child = self._sent_by_kind[kind] = self.sent.labels(kind)
        child.inc()
        self.latency.observe(latency)

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
