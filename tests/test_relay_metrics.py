"""The writers' per-message counters (``web._metrics.RelayStats``) expose what prometheus-client's own ``Counter``
and ``Histogram`` would for the same messages: a dashboard or alert built on ``gateway_messages_sent_total`` and
``gateway_relay_latency_seconds`` reads the same series."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from web._metrics import LATENCY_BUCKETS, RelayStats

KINDS = st.sampled_from(["progress", "preview", "completed", "queued", "balance"])
LATENCIES = st.one_of(
    st.sampled_from(LATENCY_BUCKETS),  # on a bound: counted in that bucket (Prometheus "le")
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
)


def _exposition(registry: CollectorRegistry) -> list[str]:
    """The exposition's lines without the ``_created`` timestamps (wall-clock times, which differ)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(st.lists(st.tuples(KINDS, LATENCIES), max_size=60))
def test_relay_stats_expose_what_a_prometheus_counter_and_histogram_would(messages: list[tuple[str, float]]) -> None:
    ours = CollectorRegistry()
    stats = RelayStats()
    ours.register(stats)
    theirs = CollectorRegistry()
    sent = Counter("gateway_messages_sent", "STOMP messages written to clients", ["type"], registry=theirs)
    latency = Histogram(
        "gateway_relay_latency_seconds",
        "time from an event reaching its session to its frame being written",
        buckets=LATENCY_BUCKETS,
        registry=theirs,
    )
    for kind, seconds in messages:
        stats.relayed(kind, seconds)
        sent.labels(kind).inc()
        latency.observe(seconds)
    assert _exposition(ours) == _exposition(theirs)
    created = [line for line in generate_latest(ours).decode().splitlines() if line.startswith("gateway_")]
    assert sum("_created" in line for line in created) == len({kind for kind, _ in messages}) + 1
