"""Tests for the sans-IO STOMP codec (web/stomp). Plain sync pytest plus hypothesis.

The recorded stompjs frames come from docs/STACK-NOTES.md section 5.1. Every wire string is fed whole,
in fixed-size steps and split at every single position (h11/tests/test_io.py style), and must give the
same events. The hypothesis properties at the bottom are shared with scripts/fuzz_stomp.py, which runs
them with far more examples: ``check_round_trip``/``check_fuzz`` plus the strategies ``sessions()``,
``fuzz_inputs()``.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import web.stomp
from web.stomp import (
    HEARTBEAT,
    NEED_DATA,
    ConnState,
    Frame,
    LocalProtocolError,
    RemoteProtocolError,
    StompConnection,
    StompProtocolError,
    encode_frame,
    negotiate_heartbeat,
)

# ---- helpers --------------------------------------------------------------------------------------------

Event = Frame | type[HEARTBEAT]


def drain(conn: StompConnection) -> list[Event]:
    """next_event() until NEED_DATA, answering CONNECT/STOMP with CONNECTED as the endpoint would."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, Frame) and event.command in ("CONNECT", "STOMP"):
            assert conn.version is not None
            conn.send(Frame("CONNECTED", (("version", conn.version),)))
    return events


def feed_chunks(conn: StompConnection, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
    return events


def steps(wire: bytes, step: int) -> list[bytes]:
    return [wire[i : i + step] for i in range(0, len(wire), step)]


def cut(wire: bytes, positions: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted({min(max(p, 0), len(wire)) for p in positions}), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def connected(version: str = "1.2", **limits: int) -> StompConnection:
    conn = StompConnection(**limits)
    accept = b"" if version == "1.0" else b"accept-version:" + version.encode() + b"\n"
    conn.receive_data(b"CONNECT\n" + accept + b"\n\0")
    [connect] = drain(conn)
    assert connect.command == "CONNECT" and conn.version == version and conn.state is ConnState.CONNECTED
    return conn


def parse(wire: bytes, version: str = "1.2", **limits: int) -> list[Event]:
    return feed_chunks(connected(version, **limits), [wire])


def remote_error(conn: StompConnection, wire: bytes) -> RemoteProtocolError:
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    assert conn.state is ConnState.ERROR
    return info.value


def connect_wire(version: str = "1.2") -> bytes:
    return b"CONNECT\naccept-version:" + version.encode() + b"\n\n\0"


# ---- STACK-NOTES 5.1: the recorded stompjs session --------------------------------------------------------

CLIENT_WIRE: list[tuple[bytes, Event]] = [
    (
        b"CONNECT\nlogin:guest\npasscode:secret\nclientId:client-123\nx-custom:a:b\n"
        b"accept-version:1.2,1.1,1.0\nheart-beat:1000,1000\n\n\0",
        Frame("CONNECT", (("login", "guest"), ("passcode", "secret"), ("clientId", "client-123"),
                          ("x-custom", "a:b"), ("accept-version", "1.2,1.1,1.0"), ("heart-beat", "1000,1000"))),
    ),
    (
        b"SUBSCRIBE\nack:client-individual\nx-sub-custom:yes\nid:sub-0\ndestination:/topic/prices\n\n\0",
        Frame("SUBSCRIBE", (("ack", "client-individual"), ("x-sub-custom", "yes"), ("id", "sub-0"),
                            ("destination", "/topic/prices"))),
    ),
    (b"ACK\nid:ack-m-1\nsubscription:sub-0\n\n\0", Frame("ACK", (("id", "ack-m-1"), ("subscription", "sub-0")))),
    (b"NACK\nid:ack-m-2\nsubscription:sub-0\n\n\0", Frame("NACK", (("id", "ack-m-2"), ("subscription", "sub-0")))),
    (
        b"SEND\ndestination:/topic/prices\nx-colon:a\\cb\nx-nl:l1\\nl2\ncontent-type:text/plain\n"
        b"content-length:11\n\nfrom client\0",
        Frame("SEND", (("destination", "/topic/prices"), ("x-colon", "a:b"), ("x-nl", "l1\nl2"),
                       ("content-type", "text/plain"), ("content-length", "11")), b"from client"),
    ),
    (
        b"SEND\ndestination:/topic/prices\n\nno content-length\0",
        Frame("SEND", (("destination", "/topic/prices"),), b"no content-length"),
    ),
    (
        b"SEND\ndestination:/topic/prices\nreceipt:r-send-1\ncontent-length:12\n\nwith receipt\0",
        Frame("SEND", (("destination", "/topic/prices"), ("receipt", "r-send-1"), ("content-length", "12")),
              b"with receipt"),
    ),
    (b"\n", HEARTBEAT),
    (b"UNSUBSCRIBE\nid:sub-0\n\n\0", Frame("UNSUBSCRIBE", (("id", "sub-0"),))),
    (b"DISCONNECT\nreceipt:close-1\n\n\0", Frame("DISCONNECT", (("receipt", "close-1"),))),
]  # fmt: skip
SESSION_WIRE = b"".join(wire for wire, _ in CLIENT_WIRE)
SESSION_EVENTS = [event for _, event in CLIENT_WIRE]


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(SESSION_WIRE)])
def test_recorded_session_any_step(step: int) -> None:
    conn = StompConnection()
    assert feed_chunks(conn, steps(SESSION_WIRE, step)) == SESSION_EVENTS
    assert conn.state is ConnState.DISCONNECTED and conn.version == "1.2"
    assert conn.statistics().buffered_bytes == 0


def test_recorded_session_every_split_position() -> None:
    for position in range(len(SESSION_WIRE) + 1):
        conn = StompConnection()
        assert feed_chunks(conn, cut(SESSION_WIRE, [position])) == SESSION_EVENTS, position


@pytest.mark.parametrize(
    ("wire", "expected"),
    CLIENT_WIRE[1:],
    ids=[f"{i}-{w.decode().split()[0]}" if w.strip() else f"{i}-EOL" for i, (w, _) in enumerate(CLIENT_WIRE[1:])],
)
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_each_recorded_client_frame(wire: bytes, expected: Event, step: int) -> None:
    assert feed_chunks(connected(), steps(wire, step)) == [expected]


def test_recorded_session_as_one_message_per_frame() -> None:
    conn = StompConnection()
    assert feed_chunks(conn, [wire for wire, _ in CLIENT_WIRE]) == SESSION_EVENTS
    stats = conn.statistics()
    assert (stats.frames_received, stats.heartbeats_received, stats.frames_sent) == (9, 1, 1)


def _message(n: int, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("destination", "/topic/prices"), ("subscription", "sub-0"), ("message-id", f"m-{n}"),
            ("ack", f"ack-m-{n}"), *extra)  # fmt: skip


def test_recorded_server_frames_byte_exact() -> None:
    conn = StompConnection()
    conn.receive_data(CLIENT_WIRE[0][0])
    assert conn.next_event() == CLIENT_WIRE[0][1]
    connected_frame = Frame("CONNECTED", (("version", "1.2"), ("heart-beat", "1000,1000"), ("server", "spike/0.1"),
                                          ("session", "sess-1")))  # fmt: skip
    assert (
        conn.send(connected_frame)
        == b"CONNECTED\nversion:1.2\nheart-beat:1000,1000\nserver:spike/0.1\nsession:sess-1\n\n\0"
    )
    assert conn.state is ConnState.CONNECTED
    assert conn.send(Frame("MESSAGE", _message(1, ("content-type", "text/plain")), b"hello 1")) == (
        b"MESSAGE\ndestination:/topic/prices\nsubscription:sub-0\nmessage-id:m-1\nack:ack-m-1\n"
        b"content-type:text/plain\ncontent-length:7\n\nhello 1\0"
    )
    assert encode_frame("MESSAGE", _message(2), b"no content-length", content_length=False) == (
        b"MESSAGE\ndestination:/topic/prices\nsubscription:sub-0\nmessage-id:m-2\nack:ack-m-2\n\nno content-length\0"
    )
    utf8 = "héllo ✓ utf8".encode()
    assert conn.send(Frame("MESSAGE", _message(3, ("content-type", "text/plain;charset=utf-8")), utf8)).endswith(
        b"message-id:m-3\nack:ack-m-3\ncontent-type:text/plain;charset=utf-8\ncontent-length:15\n\n" + utf8 + b"\0"
    )
    coalesced = encode_frame("MESSAGE", _message(4), b"first of two") + encode_frame(
        "MESSAGE", _message(5), b"second of two"
    )
    assert coalesced == (
        b"MESSAGE\ndestination:/topic/prices\nsubscription:sub-0\nmessage-id:m-4\nack:ack-m-4\ncontent-length:12\n\n"
        b"first of two\0"
        b"MESSAGE\ndestination:/topic/prices\nsubscription:sub-0\nmessage-id:m-5\nack:ack-m-5\ncontent-length:13\n\n"
        b"second of two\0"
    )
    assert conn.send(Frame("MESSAGE", _message(6, ("x-note", "a:b\nc")), b"x")).endswith(
        b"message-id:m-6\nack:ack-m-6\nx-note:a\\cb\\nc\ncontent-length:1\n\nx\0"
    )
    assert conn.send(Frame("MESSAGE", _message(7, ("content-type", "application/octet-stream")), b"bin\0ary")).endswith(
        b"message-id:m-7\nack:ack-m-7\ncontent-type:application/octet-stream\ncontent-length:7\n\nbin\0ary\0"
    )
    assert conn.send(Frame("RECEIPT", (("receipt-id", "r-send-1"),))) == b"RECEIPT\nreceipt-id:r-send-1\n\n\0"
    conn.receive_data(b"\nUNSUBSCRIBE\nid:sub-0\n\n\0DISCONNECT\nreceipt:close-1\n\n\0")
    assert drain(conn) == SESSION_EVENTS[-3:]
    assert conn.state is ConnState.DISCONNECTED
    assert conn.send(Frame("RECEIPT", (("receipt-id", "close-1"),))) == b"RECEIPT\nreceipt-id:close-1\n\n\0"
    assert conn.statistics().frames_sent == 7


# ---- escaping ---------------------------------------------------------------------------------------------


def test_escape_round_trip_12() -> None:
    headers = (("destination", "/q"), ("we:ird\nname", "a:b\nc\rd\\e"), ("plain", "x"))
    wire = encode_frame("SEND", headers, b"body")
    assert b"we\\cird\\nname:a\\cb\\nc\\rd\\\\e\n" in wire
    assert parse(wire) == [Frame("SEND", (*headers, ("content-length", "4")), b"body")]


def test_escape_11_has_no_cr_escape() -> None:
    assert parse(b"SEND\ndestination:/q\nx:a\\cb\\nc\\\\d\n\n\0", "1.1")[0].get("x") == "a:b\nc\\d"
    error = remote_error(connected("1.1"), b"SEND\ndestination:/q\nreceipt:r-1\nx:a\\rb\n\n\0")
    assert str(error) == "invalid header escape"
    assert error.error_frame.get("receipt-id") == "r-1"


def test_escape_10_is_literal() -> None:
    assert parse(b"SEND\ndestination:/q\nx:a\\cb\\nc\\t\n\n\0", "1.0")[0].get("x") == "a\\cb\\nc\\t"


@pytest.mark.parametrize("value", [b"a\\tb", b"a\\", b"\\C", b"\\\\\\"])
def test_undefined_escape_is_an_error_in_12(value: bytes) -> None:
    assert str(remote_error(connected(), b"SEND\ndestination:/q\nx:" + value + b"\n\n\0")) == "invalid header escape"


def test_connect_headers_are_raw() -> None:
    conn = StompConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\nx-custom:a:b\nx-esc:a\\cb\\n\n\n\0")
    [frame] = drain(conn)
    assert frame.get("x-custom") == "a:b" and frame.get("x-esc") == "a\\cb\\n"


def test_colons_in_values_of_any_frame() -> None:
    [frame] = parse(b"SEND\ndestination:/q\nurl:http://h:80/p\n\n\0")
    assert frame.get("url") == "http://h:80/p"


def test_send_escapes_per_version() -> None:
    message = Frame("MESSAGE", (("destination", "/q"), ("x", "a:b\nc\rd")))
    assert b"x:a\\cb\\nc\\rd\n" in connected("1.2").send(message)
    with pytest.raises(LocalProtocolError, match=r"1\.1"):
        connected("1.1").send(message)
    assert b"x:a\\cb\\nc\n" in connected("1.1").send(Frame("MESSAGE", (("x", "a:b\nc"),)))
    assert b"x:a:b\n" in connected("1.0").send(Frame("MESSAGE", (("x", "a:b"),)))
    with pytest.raises(LocalProtocolError, match="without escaping"):
        connected("1.0").send(Frame("MESSAGE", (("x", "a\nb"),)))
    with pytest.raises(LocalProtocolError):
        connected("1.0").send(Frame("MESSAGE", (("x:y", "ab"),)))


def test_connected_is_never_escaped() -> None:
    conn = StompConnection()
    conn.receive_data(connect_wire())
    assert conn.next_event().command == "CONNECT"  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        conn.send(Frame("CONNECTED", (("server", "a\nb"),)))
    assert conn.state is ConnState.CONNECTING
    assert (
        conn.send(Frame("CONNECTED", (("version", "1.2"), ("server", "gw:1"))))
        == b"CONNECTED\nversion:1.2\nserver:gw:1\n\n\0"
    )


# ---- headers, bodies, line ends, heart-beats ----------------------------------------------------------------


def test_repeated_headers_first_wins() -> None:
    [frame] = parse(b"SEND\ndestination:/a\ndestination:/b\nfoo:1\nfoo:2\n\n\0")
    assert frame.headers == (("destination", "/a"), ("destination", "/b"), ("foo", "1"), ("foo", "2"))
    assert (frame.get("destination"), frame.get("foo"), frame.get("bar"), frame.get("bar", "-")) == (
        "/a",
        "1",
        None,
        "-",
    )


def test_repeated_content_length_first_wins() -> None:
    [frame] = parse(b"SEND\ndestination:/q\ncontent-length:3\ncontent-length:10\n\nabc\0")
    assert frame.body == b"abc"


@pytest.mark.parametrize("body", [b"bin\0ary", b"\0", b"\0\0\0", "héllo ✓ utf8".encode(), bytes(range(256)), b""])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_content_length_counts_bytes(body: bytes, step: int) -> None:
    wire = b"SEND\ndestination:/q\ncontent-length:%d\n\n%b\0SEND\ndestination:/q\n\nnext\0" % (len(body), body)
    events = feed_chunks(connected(), steps(wire, step))
    assert [frame.body for frame in events] == [body, b"next"]  # type: ignore[union-attr]


def test_body_without_content_length_ends_at_first_nul() -> None:
    wire = b"SEND\ndestination:/q\n\nab\0SEND\ndestination:/q\n\n\0"
    assert [f.body for f in parse(wire)] == [b"ab", b""]  # type: ignore[union-attr]


def test_utf8_headers() -> None:
    [frame] = parse("SEND\ndestination:/q/é\nnäme:✓\n\n\0".encode())
    assert frame.headers == (("destination", "/q/é"), ("näme", "✓"))


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_crlf_line_ends(step: int) -> None:
    wire = (b"CONNECT\r\naccept-version:1.2\r\nheart-beat:0,0\r\n\r\n\0\r\n"
            b"SEND\r\ndestination:/q\r\ncontent-length:2\r\n\r\nhi\0\r\n"
            b"SEND\ndestination:/q\r\nx:y\n\r\nmixed\0")  # fmt: skip
    events = feed_chunks(StompConnection(), steps(wire, step))
    assert events == [
        Frame("CONNECT", (("accept-version", "1.2"), ("heart-beat", "0,0"))),
        HEARTBEAT,
        Frame("SEND", (("destination", "/q"), ("content-length", "2")), b"hi"),
        HEARTBEAT,
        Frame("SEND", (("destination", "/q"), ("x", "y")), b"mixed"),
    ]


def test_heartbeats_between_frames() -> None:
    wire = b"\n\r\n\nSEND\ndestination:/q\n\n\0\n\nSEND\ndestination:/q\n\n\0\r\n"
    events = parse(wire)
    assert [e if e is HEARTBEAT else e.command for e in events] == (  # type: ignore[union-attr]
        [HEARTBEAT] * 3 + ["SEND"] + [HEARTBEAT] * 2 + ["SEND", HEARTBEAT]
    )
    for position in range(len(wire) + 1):
        assert feed_chunks(connected(), cut(wire, [position])) == events


def test_take_heartbeat_consumes_a_lone_eol_between_frames_only() -> None:
    """The endpoint's idle fast path: a message that is one heart-beat, between frames, is counted and gone; an EOL
    that belongs to a frame (or comes before CONNECTED, or after a partial frame) is left to receive_data."""
    fresh = StompConnection()
    assert not fresh.take_heartbeat(b"\n")  # before CONNECTED an EOL is not a heart-beat
    conn = connected()
    assert conn.take_heartbeat(b"\n") and conn.take_heartbeat("\r\n") and conn.take_heartbeat("\n")
    assert not conn.take_heartbeat(b"\n\n") and not conn.take_heartbeat(b"SEND")  # more than one EOL: parse it
    assert conn.statistics().heartbeats_received == 3
    conn.receive_data(b"SEND\ndestination:/q\n")  # a frame split across messages: the next EOL ends its headers
    assert conn.next_event() is NEED_DATA
    assert not conn.take_heartbeat(b"\n")
    conn.receive_data(b"\n")
    conn.receive_data(b"body\0")
    assert conn.next_event() == Frame("SEND", (("destination", "/q"),), b"body")
    assert conn.next_event() is NEED_DATA
    assert conn.take_heartbeat(b"\n") and conn.statistics().heartbeats_received == 4


def test_heartbeat_split_between_cr_and_lf() -> None:
    conn = connected()
    conn.receive_data(b"\r")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\n")
    assert conn.next_event() is HEARTBEAT
    assert conn.next_event() is NEED_DATA
    assert conn.statistics().heartbeats_received == 1


def test_eols_before_connect_and_after_disconnect_are_skipped() -> None:
    conn = StompConnection()
    events = feed_chunks(conn, [b"\n\r\n\n" * 1000, connect_wire(), b"DISCONNECT\n\n\0", b"\n\r\n"])
    assert [e.command for e in events] == ["CONNECT", "DISCONNECT"]  # type: ignore[union-attr]
    assert conn.state is ConnState.DISCONNECTED


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA" and repr(HEARTBEAT) == "HEARTBEAT"
    assert type(HEARTBEAT) is HEARTBEAT and type(NEED_DATA) is NEED_DATA  # usable as dispatch-dict keys


# ---- limits ---------------------------------------------------------------------------------------------------


def test_frame_size_limit_exact() -> None:
    head = b"SEND\ndestination:/q\n\n"
    ok = head + b"x" * (100 - len(head))
    assert [f.body for f in parse(ok + b"\0", max_frame_size=100)] == [ok[len(head) :]]  # type: ignore[union-attr]
    error = remote_error(connected(max_frame_size=100), ok + b"x\0")
    assert str(error) == "frame too large"
    assert error.error_frame.get("message") == "frame too large"


def test_frame_too_large_without_nul_is_rejected_before_the_end() -> None:
    conn = connected(max_frame_size=100)
    head = b"SEND\ndestination:/q\n\n"
    conn.receive_data(head + b"x" * (100 - len(head)))
    assert conn.next_event() is NEED_DATA
    assert conn.statistics().buffered_bytes == 100
    conn.receive_data(b"x")
    with pytest.raises(RemoteProtocolError, match="frame too large"):
        conn.next_event()


def test_content_length_over_limit_is_rejected_immediately() -> None:
    conn = connected(max_frame_size=100)
    conn.receive_data(b"SEND\ndestination:/q\nreceipt:r-big\ncontent-length:1000000\n\n")
    with pytest.raises(RemoteProtocolError, match="frame too large") as info:
        conn.next_event()
    assert info.value.error_frame.get("receipt-id") == "r-big"


@pytest.mark.parametrize("length", [b"9" * 30, b"0" * 30 + b"99999"])
def test_huge_content_length(length: bytes) -> None:
    error = remote_error(connected(max_frame_size=100), b"SEND\ndestination:/q\ncontent-length:" + length + b"\n\n")
    assert str(error) == "frame too large"


def test_frame_too_large_while_headers_accumulate() -> None:
    conn = connected(max_frame_size=100, max_headers=1000)
    conn.receive_data(b"SEND\ndestination:/q\n")

    def add_header_lines() -> None:
        for _ in range(20):
            conn.receive_data(b"x-filler:abcdefgh\n")
            assert conn.next_event() is NEED_DATA

    with pytest.raises(RemoteProtocolError, match="frame too large"):
        add_header_lines()


def test_too_many_headers() -> None:
    assert len(parse(b"SEND\ndestination:/q\na:1\nb:2\n\n\0", max_headers=3)) == 1
    conn = connected(max_headers=3)
    conn.receive_data(b"SEND\ndestination:/q\na:1\nb:2\nc:3\n")  # no blank line yet: caught while it streams
    with pytest.raises(RemoteProtocolError, match="too many headers"):
        conn.next_event()


def test_header_line_too_long() -> None:
    line = b"x:" + b"y" * 18  # 20 bytes
    assert parse(b"SEND\ndestination:/q\n" + line + b"\r\n\n\0", max_header_length=20)[0].get("x") == "y" * 18
    error = remote_error(connected(max_header_length=20), b"SEND\ndestination:/q\n" + line + b"y\n\n\0")
    assert str(error) == "header line too long"
    conn = connected(max_header_length=20)
    conn.receive_data(b"SEND\ndestination:/q\n" + line + b"y")  # incomplete: CR LF may still come
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"y")
    with pytest.raises(RemoteProtocolError, match="header line too long"):
        conn.next_event()


@pytest.mark.parametrize("value", [b"abc", b"-1", b"", b"1.5", b" 3", b"3 ", b"+3", "١".encode(), b"0x10"])
def test_bad_content_length(value: bytes) -> None:
    error = remote_error(connected(), b"SEND\ndestination:/q\ncontent-length:" + value + b"\n\nabc\0")
    assert str(error) == "invalid content-length"


def test_content_length_zero_and_leading_zeros() -> None:
    assert [f.body for f in parse(b"SEND\ndestination:/q\ncontent-length:0\n\n\0")] == [b""]  # type: ignore[union-attr]
    assert [f.body for f in parse(b"SEND\ndestination:/q\ncontent-length:003\n\nabc\0")] == [b"abc"]  # type: ignore[union-attr]


def test_invalid_utf8_in_headers() -> None:
    assert str(remote_error(connected(), b"SEND\ndestination:/q\nx:\xff\xfe\n\n\0")) == "invalid UTF-8 in headers"


def test_missing_nul_after_content_length_body() -> None:
    error = remote_error(connected(), b"SEND\ndestination:/q\ncontent-length:2\n\nabc\0")
    assert str(error) == "missing NUL terminator"


@pytest.mark.parametrize("wire", [b"FOO\n\n\0", b"send\ndestination:/q\n\n\0", b"\rSEND\n\n\0", b"SEND \n\n\0",
                                  b"GET / HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xaa\xbb"])  # fmt: skip
def test_unknown_command(wire: bytes) -> None:
    assert str(remote_error(connected(), wire)) == "unknown command"


@pytest.mark.parametrize("line", [b"nocolon", b":empty-name", b"x:a\rb", b"x\r:y"])
def test_malformed_header(line: bytes) -> None:
    assert str(remote_error(connected(), b"SEND\ndestination:/q\n" + line + b"\n\n\0")) == "malformed header"


def test_eof() -> None:
    conn = connected()
    conn.receive_data(b"SEND\ndestination:/q\n\nabc\0\n")
    conn.receive_data(b"")
    assert len(drain(conn)) == 2
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")  # idempotent
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    conn = connected()
    conn.receive_data(b"SEND\ndestination:/q\nreceipt:r-1\n\nab")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed mid-frame") as info:
        conn.next_event()
    assert info.value.error_frame.get("receipt-id") == "r-1"


@pytest.mark.parametrize("limit", ["max_frame_size", "max_headers", "max_header_length"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "10"])
def test_limits_are_validated(limit: str, value: object) -> None:
    with pytest.raises(ValueError, match=limit):
        StompConnection(**{limit: value})  # type: ignore[arg-type]


# ---- state machine --------------------------------------------------------------------------------------------


def test_send_before_connect() -> None:
    error = remote_error(StompConnection(), b"SEND\ndestination:/q\nreceipt:r-0\n\n\0")
    assert "SEND" in str(error) and "CONNECTING" in str(error)
    assert error.error_frame.get("receipt-id") == "r-0"


def test_connect_twice() -> None:
    error = remote_error(connected(), connect_wire())
    assert "CONNECT" in str(error) and "CONNECTED" in str(error)


def test_connect_twice_before_the_answer() -> None:
    conn = StompConnection()
    conn.receive_data(connect_wire() + b"STOMP\naccept-version:1.2\n\n\0")
    assert conn.next_event().command == "CONNECT"  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError, match=r"STOMP.*CONNECTING"):
        conn.next_event()


def test_frames_pipelined_before_connected_are_refused() -> None:
    conn = StompConnection()
    conn.receive_data(connect_wire() + b"SEND\ndestination:/q\n\n\0")
    assert conn.next_event().command == "CONNECT"  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError, match=r"SEND.*CONNECTING"):
        conn.next_event()


def test_pipelined_frames_are_fine_once_answered() -> None:
    conn = StompConnection()
    conn.receive_data(connect_wire() + b"SEND\ndestination:/q\n\n\0")
    assert [e.command for e in drain(conn)] == ["CONNECT", "SEND"]  # type: ignore[union-attr]


def test_stomp_command_connects() -> None:
    conn = StompConnection()
    conn.receive_data(b"STOMP\naccept-version:1.1\nhost:x\n\n\0")
    assert [e.command for e in drain(conn)] == ["STOMP"]  # type: ignore[union-attr]
    assert (conn.version, conn.state) == ("1.1", ConnState.CONNECTED)


@pytest.mark.parametrize("wire", [b"SEND\ndestination:/q\n\n\0", b"DISCONNECT\n\n\0", connect_wire()])
def test_frames_after_disconnect(wire: bytes) -> None:
    conn = connected()
    conn.receive_data(b"DISCONNECT\nreceipt:close-1\n\n\0")
    assert drain(conn)[0].command == "DISCONNECT"  # type: ignore[union-attr]
    error = remote_error(conn, wire)
    assert "DISCONNECTED" in str(error)


@pytest.mark.parametrize("command", [b"MESSAGE", b"RECEIPT", b"ERROR", b"CONNECTED"])
def test_server_commands_from_the_client(command: bytes) -> None:
    error = remote_error(connected(), command + b"\ndestination:/q\n\n\0")
    assert command.decode() in str(error) and "CONNECTED" in str(error)


@pytest.mark.parametrize(
    ("version", "wire", "missing"),
    [
        ("1.2", b"SEND\n\n\0", "destination"),
        ("1.2", b"SUBSCRIBE\nid:0\n\n\0", "destination"),
        ("1.2", b"SUBSCRIBE\ndestination:/q\n\n\0", "id"),
        ("1.1", b"SUBSCRIBE\ndestination:/q\n\n\0", "id"),
        ("1.2", b"UNSUBSCRIBE\ndestination:/q\n\n\0", "id"),
        ("1.1", b"UNSUBSCRIBE\n\n\0", "id"),
        ("1.0", b"UNSUBSCRIBE\n\n\0", "id"),
        ("1.2", b"ACK\nmessage-id:1\n\n\0", "id"),
        ("1.1", b"ACK\nmessage-id:1\n\n\0", "subscription"),
        ("1.2", b"BEGIN\n\n\0", "transaction"),
    ],
)
def test_missing_required_headers(version: str, wire: bytes, missing: str) -> None:
    error = remote_error(connected(version), wire)
    assert f"missing header {missing!r}" in str(error)


@pytest.mark.parametrize(
    ("version", "wire"),
    [("1.0", b"SUBSCRIBE\ndestination:/q\n\n\0"), ("1.0", b"UNSUBSCRIBE\ndestination:/q\n\n\0"),
     ("1.2", b"SUBSCRIBE\nid:0\ndestination:/q\n\n\0"), ("1.2", b"BEGIN\ntransaction:t\n\n\0"),
     ("1.1", b"NACK\nmessage-id:1\nsubscription:0\n\n\0")],
)  # fmt: skip
def test_required_headers_present(version: str, wire: bytes) -> None:
    assert len(parse(wire, version)) == 1


def test_connect_does_not_require_host() -> None:
    conn = StompConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\n\n\0")
    assert drain(conn)[0].get("host") is None


@pytest.mark.parametrize(
    ("accept", "version"),
    [(b"1.2,1.1,1.0", "1.2"), (b"1.1", "1.1"), (None, "1.0"), (b"1.0,1.1", "1.1"), (b" 1.1 , 1.2 ", "1.2"),
     (b"1.0", "1.0"), (b"2.0,1.1", "1.1")],
)  # fmt: skip
def test_version_negotiation(accept: bytes | None, version: str) -> None:
    conn = StompConnection()
    assert conn.version is None
    conn.receive_data(b"CONNECT\n" + (b"" if accept is None else b"accept-version:" + accept + b"\n") + b"\n\0")
    drain(conn)
    assert conn.version == version


@pytest.mark.parametrize("accept", [b"2.0", b"", b"1.3,0.9"])
def test_no_common_version(accept: bytes) -> None:
    error = remote_error(StompConnection(), b"CONNECT\naccept-version:" + accept + b"\n\n\0")
    assert str(error) == "unsupported STOMP version"
    assert error.error_frame.get("version") == "1.0,1.1,1.2"
    assert b"Supported protocol versions are 1.0 1.1 1.2" in error.error_frame.body


@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        (None, (1000, 1000), (0, 0)),
        ("", (1000, 1000), (0, 0)),
        ("0,0", (1000, 1000), (0, 0)),
        ("1000,1000", (1000, 1000), (1000, 1000)),
        ("1000,0", (1000, 1000), (0, 1000)),
        ("0,5000", (1000, 1000), (5000, 0)),
        ("500,2000", (1000, 0), (2000, 0)),
        ("10000,10000", (0, 1000), (0, 10000)),
        ("100,100", (1000, 2000), (1000, 2000)),
        (" 300 , 400 ", (100, 100), (400, 300)),
        ("1000,1000", (0, 0), (0, 0)),
    ],
)
def test_negotiate_heartbeat(client: str | None, server: tuple[int, int], expected: tuple[int, int]) -> None:
    assert negotiate_heartbeat(client, server) == expected


@pytest.mark.parametrize("client", ["1000", "a,b", "1000,1000,1000", "-1,0", "1.5,2", ",", "1000,"])
def test_negotiate_heartbeat_malformed(client: str) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid heart-beat header") as info:
        negotiate_heartbeat(client, (1000, 1000))
    assert info.value.error_frame.command == "ERROR"
    assert client.encode() in info.value.error_frame.body


@pytest.mark.parametrize("server", [(-1, 0), (0,), (1.5, 0)])
def test_negotiate_heartbeat_bad_server_values(server: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="server heart-beat"):
        negotiate_heartbeat("0,0", server)  # type: ignore[arg-type]


# ---- ERROR frames and the sticky ERROR state --------------------------------------------------------------------


def test_error_frame_content() -> None:
    conn = connected()
    assert conn.error("bad token", "the token expired", receipt_id="r-1") == (
        b"ERROR\nmessage:bad token\nreceipt-id:r-1\ncontent-type:text/plain\ncontent-length:17\n\nthe token expired\0"
    )
    assert conn.state is ConnState.ERROR
    with pytest.raises(LocalProtocolError, match="already sent"):
        conn.error("again")
    with pytest.raises(LocalProtocolError):
        conn.send(Frame("MESSAGE", (("destination", "/q"),)))
    conn.receive_data(b"SEND\ndestination:/q\n\n\0")  # dropped: the session is over
    assert conn.statistics().buffered_bytes == 0
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_error_before_connect_and_escaping() -> None:
    conn = StompConnection()
    assert conn.error("denied: no token") == (
        b"ERROR\nmessage:denied\\c no token\ncontent-type:text/plain\ncontent-length:0\n\n\0"
    )
    assert connected("1.0").error("a:b\nc", receipt_id="r\n1").startswith(b"ERROR\nmessage:a:b c\nreceipt-id:r 1\n")


def test_remote_error_carries_ready_error_frame() -> None:
    conn = connected()
    error = remote_error(conn, b"SEND\nreceipt:r-9\n\nbody\0")
    assert error.error_frame.command == "ERROR"
    assert error.error_frame.get("message") == str(error) == "missing header 'destination' in SEND"
    assert error.error_frame.get("receipt-id") == "r-9"
    assert error.error_frame.get("content-type") == "text/plain"
    assert error.error_frame.body == b"SEND requires a 'destination' header"
    wire = conn.send(error.error_frame)  # the one ERROR frame may still be sent in state ERROR
    assert wire.startswith(b"ERROR\nmessage:missing header 'destination' in SEND\nreceipt-id:r-9\n")
    with pytest.raises(LocalProtocolError):
        conn.send(error.error_frame)


def test_error_receipt_is_not_taken_from_an_earlier_frame() -> None:
    conn = connected(max_headers=2)
    conn.receive_data(b"SEND\ndestination:/q\nreceipt:r-1\n\n\0")
    drain(conn)
    error = remote_error(conn, b"SEND\ndestination:/q\na:1\nb:2\n\n\0")
    assert str(error) == "too many headers" and error.error_frame.get("receipt-id") is None


def test_sticky_error() -> None:
    conn = connected()
    first = remote_error(conn, b"BOGUS\n\n\0")
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            conn.next_event()
        assert str(again.value) == str(first) and again.value.error_frame == first.error_frame
    conn.receive_data(b"SEND\ndestination:/q\n\n\0")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is ConnState.ERROR


def test_remote_error_default_frame_and_hierarchy() -> None:
    error = RemoteProtocolError("boom")
    assert error.error_frame == Frame("ERROR", (("message", "boom"), ("content-type", "text/plain")))
    assert isinstance(error, StompProtocolError) and issubclass(LocalProtocolError, StompProtocolError)
    with pytest.raises(TypeError):
        StompProtocolError("never raised itself")


# ---- send() misuse ----------------------------------------------------------------------------------------------


def test_send_misuse() -> None:
    conn = StompConnection()
    with pytest.raises(LocalProtocolError, match=r"MESSAGE.*CONNECTING"):
        conn.send(Frame("MESSAGE", (("destination", "/q"),)))
    with pytest.raises(LocalProtocolError, match="before a CONNECT"):
        conn.send(Frame("CONNECTED", (("version", "1.2"),)))
    with pytest.raises(LocalProtocolError, match="client command SEND"):
        conn.send(Frame("SEND", (("destination", "/q"),)))
    with pytest.raises(TypeError):
        conn.send(b"MESSAGE\n\n\0")  # type: ignore[arg-type]
    conn = connected()
    with pytest.raises(LocalProtocolError, match="CONNECTED in state CONNECTED"):
        conn.send(Frame("CONNECTED", (("version", "1.2"),)))
    with pytest.raises(LocalProtocolError, match="body"):
        conn.send(Frame("RECEIPT", (("receipt-id", "1"),), b"x"))
    with pytest.raises(LocalProtocolError, match="UTF-8"):
        conn.send(Frame("MESSAGE", (("x", "\udcff"),)))
    with pytest.raises(LocalProtocolError, match="content-length"):
        conn.send(Frame("MESSAGE", (("content-length", "5"),), b"abc"))
    assert conn.state is ConnState.CONNECTED  # failed sends change nothing
    conn.receive_data(b"DISCONNECT\nreceipt:close-1\n\n\0")
    drain(conn)
    with pytest.raises(LocalProtocolError, match="MESSAGE in state DISCONNECTED"):
        conn.send(Frame("MESSAGE", (("destination", "/q"),)))
    assert conn.send(Frame("RECEIPT", (("receipt-id", "close-1"),))) == b"RECEIPT\nreceipt-id:close-1\n\n\0"


def test_encode_frame_refusals() -> None:
    with pytest.raises(LocalProtocolError, match="unknown command"):
        encode_frame("PING", ())
    with pytest.raises(LocalProtocolError, match="NUL"):
        encode_frame("MESSAGE", (), b"a\0b", content_length=False)
    with pytest.raises(LocalProtocolError, match="empty header name"):
        encode_frame("MESSAGE", (("", "x"),))
    with pytest.raises(LocalProtocolError, match="without escaping"):
        encode_frame("MESSAGE", (("x", "a\rb"),), escape=False)
    assert encode_frame("MESSAGE", iter([("a", "1")]), content_length=False) == b"MESSAGE\na:1\n\n\0"
    assert encode_frame("MESSAGE", [("content-length", "2")], b"hi") == b"MESSAGE\ncontent-length:2\n\nhi\0"


def test_frame_validation() -> None:
    with pytest.raises(ValueError, match="'PING'"):
        Frame("PING")
    with pytest.raises(TypeError, match="1"):
        Frame("SEND", (("a", 1),))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Frame("SEND", "destination:/q")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Frame("SEND", (("a", "b", "c"),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="body"):
        Frame("SEND", (), "text")  # type: ignore[arg-type]
    frame = Frame("SEND", [["a", "1"], ("a", "2")], bytearray(b"x"))  # type: ignore[arg-type]
    assert frame == Frame("SEND", (("a", "1"), ("a", "2")), b"x") and type(frame.body) is bytes
    assert frame.get("a") == "1" and hash(frame) == hash(Frame("SEND", (("a", "1"), ("a", "2")), b"x"))
    with pytest.raises(AttributeError):
        frame.command = "ACK"  # type: ignore[misc]


def test_codec_is_sans_io() -> None:
    package = Path(web.stomp.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not {m.split(".")[0] for m in modules} & {"trio", "anyio", "asyncio", "socket"}, path


def test_repr_and_statistics() -> None:
    conn = connected()
    conn.receive_data(b"SEND\ndestination:/q\n\nab")
    assert conn.next_event() is NEED_DATA
    assert repr(conn) == "<StompConnection state=CONNECTED version='1.2' buffered=23>"
    assert conn.statistics().buffered_bytes == 23


# ---- hypothesis: strategies and properties (shared with scripts/fuzz_stomp.py) -----------------------------------

VERSIONS = ("1.0", "1.1", "1.2")
_RESERVED_NAMES = {"content-length", "accept-version"}


@cache  # building strategies is what costs time in hypothesis: build each once
def header_text(version: str, *, name: bool = False, raw: bool = False) -> st.SearchStrategy[str]:
    """Header names/values a client may send in ``version`` (``raw``: CONNECT, never escaped)."""
    excluded = ""
    if raw or version == "1.0":
        excluded = "\r\n:" if name else "\r\n"
    elif version == "1.1":
        excluded = "\r"
    alphabet = st.characters(codec="utf-8", exclude_characters=excluded)
    text = st.text(alphabet, min_size=1 if name else 0, max_size=12)
    return text.filter(_not_reserved) if name else text


def _not_reserved(name: str) -> bool:  # a def, not a lambda: hypothesis parses a lambda's source per draw
    return name not in _RESERVED_NAMES


@cache
def headers_for(version: str, raw: bool = False) -> st.SearchStrategy[list[tuple[str, str]]]:
    return st.lists(st.tuples(header_text(version, name=True, raw=raw), header_text(version, raw=raw)), max_size=5)


_REQUIRED = {
    "SEND": ("destination",), "SUBSCRIBE": ("destination", "id"), "UNSUBSCRIBE": ("id",),
    "ACK": ("id", "message-id", "subscription"), "NACK": ("id", "message-id", "subscription"),
    "BEGIN": ("transaction",), "COMMIT": ("transaction",), "ABORT": ("transaction",), "DISCONNECT": (),
}  # fmt: skip


_FRAME_COMMANDS = st.sampled_from(sorted(set(_REQUIRED) - {"DISCONNECT"}))
_BODIES = st.binary(max_size=40)


@st.composite
def client_frame(draw: st.DrawFn, version: str) -> tuple[bytes, Frame]:
    """One valid post-CONNECT client frame: its wire bytes (via encode_frame) and the Frame it parses to."""
    command = draw(_FRAME_COMMANDS)
    headers = [(name, draw(header_text(version))) for name in _REQUIRED[command]]
    headers += draw(headers_for(version))
    with_length = draw(st.booleans())
    body = draw(_BODIES)
    if not with_length:
        body = body.replace(b"\0", b"")
    wire = encode_frame(command, headers, body, escape=version != "1.0", content_length=with_length)
    if with_length:
        headers.append(("content-length", str(len(body))))
    return wire, Frame(command, tuple(headers), body)


_FRAME_LISTS = {version: st.lists(client_frame(version), max_size=6) for version in VERSIONS}
_ACCEPT = {version: st.sampled_from([version, f"1.0,{version}", f"{version},1.0"]) for version in VERSIONS}
_BEATS = st.lists(st.sampled_from([b"\n", b"\r\n"]), max_size=2)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A whole valid client session: CONNECT, frames with heart-beats between them, maybe DISCONNECT."""
    version = draw(st.sampled_from(VERSIONS))
    connect_headers = draw(headers_for(version, raw=True))
    if version != "1.0" or draw(st.booleans()):
        connect_headers.insert(0, ("accept-version", draw(_ACCEPT[version])))
    command = draw(st.sampled_from(["CONNECT", "STOMP"]))
    parts = [encode_frame(command, connect_headers, escape=False, content_length=False)]
    events: list[Event] = [Frame(command, tuple(connect_headers))]
    for wire, frame in draw(_FRAME_LISTS[version]):
        beats = draw(_BEATS)
        parts += [*beats, wire]
        events += [HEARTBEAT] * len(beats) + [frame]
    if draw(st.booleans()):
        disconnect = draw(headers_for(version))
        parts.append(encode_frame("DISCONNECT", disconnect, escape=version != "1.0", content_length=False))
        events.append(Frame("DISCONNECT", tuple(disconnect)))
    return b"".join(parts), events


def check_round_trip(session: tuple[bytes, list[Event]], cuts: Sequence[int]) -> None:
    """Property (a): a valid session parses to exactly its frames, however the bytes are split."""
    wire, expected = session
    conn = StompConnection()
    assert feed_chunks(conn, cut(wire, cuts)) == expected
    conn.receive_data(b"")
    assert drain(conn) == []
    assert conn.statistics().buffered_bytes == 0


_MUTANT_BYTES = st.sampled_from(b"\0\n\r:\\9\xff") | st.integers(0, 255)
_MUTATIONS = st.sampled_from(["flip", "insert", "delete", "truncate"])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid session with up to 3 bytes flipped, inserted or deleted, or the tail cut off."""
    wire = bytearray(draw(sessions())[0])
    for _ in range(draw(st.integers(0, 3))):
        if not wire:
            break
        at = draw(st.integers(0, len(wire) - 1))
        byte = draw(_MUTANT_BYTES)
        match draw(_MUTATIONS):
            case "flip":
                wire[at] = byte
            case "insert":
                wire.insert(at, byte)
            case "delete":
                del wire[at]
            case "truncate":
                del wire[at:]
    return bytes(wire)


_VERSION = st.sampled_from(VERSIONS)
_FUZZ_BYTES = st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b"CONNECT?" + b),
                        mutated(), mutated(), mutated())  # fmt: skip
_DEFAULT_LIMITS = {"max_frame_size": 64 * 1024, "max_headers": 64, "max_header_length": 8192}
_LIMITS = st.sampled_from([_DEFAULT_LIMITS] * 3) | st.fixed_dictionaries({  # small ones hit every limit
    "max_frame_size": st.sampled_from([16, 100, 300, 64 * 1024]),
    "max_headers": st.sampled_from([2, 8, 64]),
    "max_header_length": st.sampled_from([16, 40, 8192]),
})  # fmt: skip


@st.composite
def fuzz_inputs(draw: st.DrawFn) -> tuple[bytes, list[int], dict[str, int]]:
    """Bytes to throw at a connection (random, random after a valid CONNECT, or a mutated session),
    cut positions, and limits (small ones too, so every limit is reached)."""
    version = draw(_VERSION)
    wire = draw(_FUZZ_BYTES)
    if wire.startswith(b"CONNECT?"):
        wire = b"CONNECT\naccept-version:" + version.encode() + b"\n\n\0" + wire[8:]
    cuts = draw(st.lists(st.integers(0, len(wire)), max_size=20))
    limits = draw(_LIMITS)
    return wire, cuts, limits


def check_fuzz(case: tuple[bytes, list[int], dict[str, int]]) -> None:
    """Property (b): garbage only ever raises RemoteProtocolError, whose ERROR frame can always be sent,
    receipts can always be echoed, and the buffer stays bounded by the frame limit."""
    wire, cuts, limits = case
    conn = StompConnection(**limits)
    bound = limits["max_frame_size"] + 1
    try:
        for chunk in [*cut(wire, cuts), b""]:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Frame):
                    if event.command in ("CONNECT", "STOMP"):
                        conn.send(Frame("CONNECTED", (("version", conn.version or ""), ("x", event.get("x", "")))))
                    elif (receipt := event.get("receipt")) is not None:
                        conn.send(Frame("RECEIPT", (("receipt-id", receipt),)))
                    if conn.state is ConnState.CONNECTED:  # whatever was parsed can be echoed
                        conn.send(Frame("MESSAGE", event.headers, event.body))
            assert conn.statistics().buffered_bytes <= bound
    except RemoteProtocolError as exc:
        error = exc
    else:
        return
    assert conn.state is ConnState.ERROR
    assert conn.send(error.error_frame).startswith(b"ERROR\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.statistics().buffered_bytes == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session=sessions(), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_property_round_trip(session: tuple[bytes, list[Event]], cuts: list[int]) -> None:
    check_round_trip(session, cuts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_inputs())
def test_property_fuzz(case: tuple[bytes, list[int], dict[str, int]]) -> None:
    check_fuzz(case)
