"""A client's heart-beat read below Hypercorn (``web._transport.HeartbeatTap``, issue 11: idle connections).

A lone heart-beat frame is taken as it comes off the socket, without Hypercorn's HTTP/1.1 and wsproto layers and
without waking quart's message task; anything else, or a heart-beat that arrives while something is half-way
through those layers, goes the usual way. What a client relies on: its heart-beats keep it connected, and an EOL
that is part of a frame (a frame split over several WebSocket messages) is never mistaken for one.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import parts
from fake_comfyui import FakeComfyUI
from hypothesis import given
from hypothesis import strategies as st
from stomp_client import stomp_connect
from test_stomp_endpoint import until_receipt, wait_until
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol

from web._transport import HeartbeatTap, lone_heartbeat


def masked_frame(payload: bytes, mask: bytes, *, first: int = 0x81) -> bytes:
    """A client-to-server frame (RFC 6455 §5.2) with a payload under 126 bytes."""
    return bytes([first, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_reads(frame: bytes) -> list[Any]:
    """What wsproto, as Hypercorn's server side, makes of ``frame``."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.initiate_upgrade_connection(
        [
            (b"host", b"x"),
            (b"upgrade", b"websocket"),
            (b"connection", b"upgrade"),
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"sec-websocket-version", b"13"),
        ],
        "/ws",
    )
    assert [type(e) for e in ws.events()] == [Request]
    ws.send(AcceptConnection())
    ws.receive_data(frame)
    return list(ws.events())


@given(mask=st.binary(min_size=4, max_size=4), payload=st.binary(max_size=3), first=st.sampled_from([0x81, 0x01, 0x82]))
def test_only_a_whole_masked_eol_frame_is_a_heart_beat(mask: bytes, payload: bytes, first: int) -> None:
    frame = masked_frame(payload, mask, first=first)
    seen = lone_heartbeat(frame)
    if first == 0x81 and payload in (b"\n", b"\r\n"):
        assert seen == payload.decode()
        events = server_reads(frame)  # and wsproto reads the same frame as that very text message, whole
        assert len(events) == 1 and isinstance(events[0], TextMessage)
        assert events[0].data == seen and events[0].message_finished
    else:
        assert seen is None  # another payload, a binary frame, or the first fragment of a message
    assert lone_heartbeat(frame + masked_frame(b"\n", mask)) is None  # two frames in one read: the usual way
    assert lone_heartbeat(frame[:-1]) is None  # a frame cut short


def test_a_heart_beat_from_wsproto_s_own_client_is_recognised() -> None:
    for _ in range(50):  # a fresh random mask each time
        for text in ("\n", "\r\n"):
            frame = bytes(FrameProtocol(client=True, extensions=[]).send_data(text, True))
            assert lone_heartbeat(frame) == text
    assert lone_heartbeat(b"\x81\x01\n") is None  # unmasked: the server's own heart-beat, never a client's
    assert lone_heartbeat(b"") is None


def the_tap(app: Any) -> tuple[Any, HeartbeatTap]:
    conns = list(parts(app)["endpoint"].live.values())
    assert len(conns) == 1
    conn = conns[0]
    tcp = conn.io._found()[1]
    assert isinstance(tcp.stream, HeartbeatTap), "the /ws connection reads its heart-beats the usual way"
    return conn, tcp.stream


@pytest.mark.parametrize("lazy", [True, False])
async def test_heart_beats_keep_a_client_connected_without_reaching_quart(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any], lazy: bool
) -> None:
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 100), "lazy_heartbeats": lazy})
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="c", heartbeat="200,200") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r0"})
        assert await until_receipt(c, "r0") == []
        conn, tap = the_tap(apps[0])
        before = (tap.put, tap.taken, conn.stomp.statistics().heartbeats_received)
        assert before[0] == before[1] == 2  # CONNECT and SUBSCRIBE came the usual way
        start = trio.current_time()
        beats = 0
        with trio.fail_after(10):
            while trio.current_time() - start < 1.0:  # five times the 200 ms the server allows between two
                await c.ws.send_message("\n")  # one every 100 ms: the server's timer reads a resting one's
                beats += 1
                await trio.sleep(0.1)
            assert tap.resting is lazy  # lazy: the socket wakes its reader only for more than a heart-beat
            await wait_until(lambda: conn.stomp.statistics().heartbeats_received == before[2] + beats)
        assert (tap.put, tap.taken) == before[:2], "a heart-beat went through Hypercorn's layers and quart"
        await c.send_frame("SUBSCRIBE", {"id": "t", "destination": "/user/topic/messages", "receipt": "r1"})
        assert await until_receipt(c, "r1") == []  # still connected, still answering
        assert (tap.put, tap.taken) == (before[0] + 1, before[1] + 1)


async def test_a_client_rests_before_its_first_heart_beat(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stompjs sends SUBSCRIBE right after CONNECTED and its first heart-beat a period later: the connection's
    timer lets it rest in between, so not even the first heart-beat wakes its reader."""
    rests: list[bool] = []  # every change of SO_RCVLOWAT: True = rest, False = a reader woke
    real = HeartbeatTap._lowat

    def spy(self: HeartbeatTap, resting: bool) -> None:
        rests.append(resting)
        real(self, resting)

    monkeypatch.setattr(HeartbeatTap, "_lowat", spy)
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 2000)})
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="c", heartbeat="2000,200") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r0"})
        assert await until_receipt(c, "r0") == []
        conn, tap = the_tap(apps[0])
        await wait_until(lambda: tap.resting)  # the timer's next fire, before any heart-beat from the client
        assert conn.stomp.statistics().heartbeats_received == 0
        rested = len(rests)
        for n in (1, 2):
            await c.ws.send_message("\n")
            await wait_until(lambda: conn.stomp.statistics().heartbeats_received == n)  # noqa: B023
        assert rests[rested:] == [], "a heart-beat woke the reader of a resting connection"
        assert tap.put == tap.taken == 2  # CONNECT and SUBSCRIBE


async def test_a_connection_we_send_no_heart_beats_to_never_rests(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any]
) -> None:
    """Resting needs the connection's timer to come by within a period: without our heart-beats it does not, so
    every frame, an empty ping too, is read as it arrives (still below Hypercorn for a heart-beat)."""
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 100)})
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="c", heartbeat="200,0") as c:
        conn, tap = the_tap(apps[0])
        for n in range(1, 6):
            await c.ws.send_message("\n")
            await wait_until(lambda: conn.stomp.statistics().heartbeats_received == n)  # noqa: B023
        assert not tap.lazy and not tap.resting
        assert tap.put == tap.taken == 1  # CONNECT only: the heart-beats were taken below Hypercorn
        with trio.fail_after(0.15):  # less than the 200 ms a timer would take
            await c.ws.ping(b"")


async def test_a_frame_to_a_resting_connection_is_read_at_once_and_a_tiny_one_by_its_timer(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any]
) -> None:
    # heart-beats every 2 s both ways: the connection's timer fires about every 2 s (up to 0.2 s early)
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 2000)})
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="c", heartbeat="2000,2000") as c:
        await c.ws.send_message("\n")
        conn, tap = the_tap(apps[0])
        await wait_until(lambda: tap.resting)
        with trio.fail_after(5):
            while await c.ws.get_message() != "\n":  # the server's heart-beat: its timer has just fired
                pass
        # a SUBSCRIBE: its RECEIPT comes long before the connection's timer (1.8 s or more away) would have read it
        with trio.fail_after(1):
            await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r0"})
            assert await until_receipt(c, "r0") == []
        await c.ws.send_message("\n")
        await wait_until(lambda: tap.resting)
        # an empty ping (6 bytes, less than a wake-up's worth): answered once the timer has read it, and the
        # connection is not taken for silent meanwhile
        timer = conn.armed - 0.2  # the earliest the connection's timer can fire next
        with trio.fail_after(10):
            await c.ws.ping(b"")
        assert trio.current_time() >= timer  # not at once: it waited for the timer
        assert conn.close_after_flush is None


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
async def test_an_eol_inside_a_frame_split_over_messages_is_part_of_the_frame(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any], eol: str
) -> None:
    g = await start_gateway([sim.url])
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="c", heartbeat="0,0") as c:
        for i in range(20):  # the "\n" message ends the headers: taken as a heart-beat, the frame would never end
            await c.ws.send_message(f"SUBSCRIBE{eol}id:s{i}{eol}destination:/user/topic/messages{eol}receipt:r{i}{eol}")
            await c.ws.send_message(eol)
            await c.ws.send_message("\x00")
            assert await until_receipt(c, f"r{i}") == []
        conn, tap = the_tap(apps[0])
        assert conn.stomp.statistics().heartbeats_received == 0
        assert tap.put == tap.taken == 1 + 3 * 20


async def test_a_resting_connection_ends_whichever_side_ends_it(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any]
) -> None:
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 100)})
    endpoint = parts(apps[0])["endpoint"]
    # the client falls silent once resting: the server's heart-beat check ends it (ERROR, close)
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="quiet", heartbeat="200,200") as c:
        await c.ws.send_message("\n")
        await wait_until(lambda: the_tap(apps[0])[1].resting)
        frame = await c.next_frame()
        while frame.command == "MESSAGE":
            frame = await c.next_frame()
        assert frame.command == "ERROR" and frame.headers["message"] == "heart-beat timeout"
    await wait_until(lambda: not endpoint.live)
    # the client's TCP connection drops while it rests: the end of the stream wakes the reader, the server detaches
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="gone", heartbeat="200,200") as c:
        await c.ws.send_message("\n")
        await wait_until(lambda: the_tap(apps[0])[1].resting)
        await c.ws._stream.aclose()  # the socket under trio-websocket, closed without a WebSocket close
    await wait_until(lambda: not endpoint.live)


async def test_a_failing_tap_costs_the_shortcut_not_the_connection(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tap runs in Hypercorn's reader task: a bug there must leave the heart-beat to the usual path."""

    def broken(self: Any, conn: Any, text: str) -> bool:
        raise RuntimeError("a bug in the heart-beat shortcut")

    monkeypatch.setattr("web._ws.StompEndpoint._tapped", broken)
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 100)})
    async with stomp_connect(g.ws_url, token=g.token("tap"), client_id="c", heartbeat="200,0") as c:
        conn, tap = the_tap(apps[0])
        for _ in range(3):
            before = conn.stomp.statistics().heartbeats_received
            await c.ws.send_message("\n")
            await wait_until(lambda: conn.stomp.statistics().heartbeats_received == before + 1)  # noqa: B023
        assert tap.put == tap.taken == 4  # CONNECT and the three heart-beats, through Hypercorn and quart
        assert not tap.resting
        await c.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "r"})
        assert await until_receipt(c, "r") == []
