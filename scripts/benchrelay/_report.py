"""The results table."""

from __future__ import annotations

from typing import Any

from ._procs import Result


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def fmt_rate(rate: float) -> str:
    return "max" if rate == 0 else f"{rate:g}"


LABELS = {"hub": "gateway, hub → client", "comfy": "gateway, ComfyUI → client", "bare": "bare Hypercorn relay"}


def table(results: list[Result], setup: dict[str, dict[str, Any]]) -> str:
    bare = {r.rate: r for r in results if r.path == "bare"}
    head = (
        "path",
        "target/s",
        "sent/s",
        "delivered/sent",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "srv CPU",
        "µs/msg",
        "frames/WS",
        "cli CPU",
        "others",
        "× bare msgs/s",
        "× bare p99",
    )
    rows = [head]
    for r in results:
        b = bare.get(r.rate)
        wall = max(r.wall, 1e-9)
        ratio_t = f"{r.throughput / b.throughput:.2f}" if b and b.throughput and r.path != "bare" else ""
        ratio_p = f"{r.p99 / b.p99:.2f}" if b and b.p99 and r.p99 is not None and r.path != "bare" else ""
        rows.append(
            (
                LABELS[r.path],
                fmt_rate(r.rate),
                f"{r.offered:,.0f}",
                f"{r.delivered}/{r.sent}",
                f"{r.throughput:,.0f}",
                fmt_ms(r.p50),
                fmt_ms(r.p99),
                fmt_ms(r.max),
                f"{100 * r.server_cpu / wall:.0f}%",
                f"{r.server_us_per_msg:.1f}" if r.server_us_per_msg else "-",
                f"{(r.delivered + r.other) / r.ws_messages:.2f}" if r.ws_messages else "-",
                f"{100 * (r.client_cpu + (r.driver_cpu if r.path == 'comfy' else 0)) / wall:.0f}%",
                (
                    f"{100 * r.other_cpu / wall:.0f}%"
                    if r.other_cpu_server_core is None
                    else f"{100 * r.other_cpu_server_core / wall:.0f}% / {100 * r.other_cpu / wall:.0f}%"
                ),
                ratio_t,
                ratio_p,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        "msgs/s = delivered / (last arrival - first send); latency = arrival - send time, same host clock.",
        "srv CPU = server process CPU / phase wall time (100% = its core saturated); µs/msg = server CPU per delivered",
        "message; frames/WS = messages per WebSocket message (the gateway's coalescing); cli CPU = Node clients",
        "(+ the simulators for ComfyUI → client); others = CPU used by processes that are not part of the benchmark,",
        "on the server's core / on both cores (should be ~0%: otherwise the figures are disturbed).",
    ]
    for r in results:
        sv = r.server
        lines.append(
            f"{LABELS[r.path]} at {fmt_rate(r.rate)}: server RSS {sv['rss_kb'] / 1024:.0f} MB after the phase, "
            f"{sv['gc_objects']:,} objects tracked by the GC (most: "
            f"{', '.join(f'{k} {v:,}' for k, v in sv['gc_top_types'][:3])}), {sv['gc_full']} full "
            f"collection(s) (longest {sv['gc_full_max_ms']} ms), longest collection of any generation "
            f"{sv.get('gc_max_ms', 0.0)} ms" + (f"; {r.note}" if r.note else "")
        )
    for name, st in setup.items():
        lines.append(
            f"{name}: {st['rss_before_mb']} -> {st['rss_connected_mb']} MB RSS with the clients connected "
            f"({st['kb_per_connection']} KB per connection; {st['kb_per_connection_after_idle']} KB after idling), "
            f"idle CPU {st['idle_cpu_percent']}% over {st['idle_seconds']:g}s, {st['closed_while_idle']} closed "
            f"while idle, {st['idle_gc_full']} full GC (longest collection {st['idle_gc_max_ms']} ms; GC "
            f"{st.get('idle_gc_total_ms', 0.0)} ms in all), others {st.get('idle_others_server_core_percent')}% of "
            f"the server core, json.dumps(100 B) {st['calibration_us']} µs on the server core"
        )
    if "floor" in setup and "gateway" in setup:
        floor = max(setup["floor"]["idle_cpu_percent"], 0.1)
        lines.append(
            "idle CPU against the trio floor (trio's least for the same connections and heart-beats): "
            + ", ".join(
                f"{name} {st['idle_cpu_percent'] / floor:.2f}x" for name, st in setup.items() if name != "floor"
            )
            + f" of the floor's {setup['floor']['idle_cpu_percent']}%"
        )

    def share(r: Result) -> float:  # what disturbs the server: others on its core (on any core when not pinned)
        other = r.other_cpu if r.other_cpu_server_core is None else r.other_cpu_server_core
        return other / max(r.wall, 1e-9)

    noisy = [r for r in results if share(r) > 0.10]
    if noisy:
        lines.append(
            f"WARNING: other processes used > 10% of the server's core during {len(noisy)} phase(s) "
            f"({', '.join(f'{r.path} at {fmt_rate(r.rate)}' for r in noisy)}): rerun on a quiet machine."
        )
    busy_clients = [r for r in results if r.other_cpu / max(r.wall, 1e-9) > 0.10 and r not in noisy]
    if busy_clients:
        lines.append(
            f"note: other processes shared the clients' core during {len(busy_clients)} phase(s); that only "
            "matters if the clients could not keep up (cli CPU + others near 100%)."
        )
    return "\n".join(lines)
