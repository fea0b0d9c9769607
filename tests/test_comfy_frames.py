"""The comfy actor's frame decoder (sans-IO) against frames a real WebSocket server library (wsproto) encodes."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage

from actors.comfy._frames import Close, FrameDecoder, FrameError
from actors.comfy._frames import Ping as GotPing
from actors.comfy._frames import Pong as GotPong

MAX = 1 << 20


def server() -> Connection:
    return Connection(ConnectionType.SERVER)


def feed_in_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Any]:
    got: list[Any] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        got += decoder.feed(data[start:cut])
        start = cut
    return got


# A message is sent whole or in fragments; control frames may come between fragments (RFC 6455 5.4).
messages = st.one_of(
    st.text(max_size=300).map(lambda t: ("text", t)),
    st.binary(max_size=70_000).map(lambda b: ("bytes", b)),
    st.binary(max_size=125).map(lambda b: ("ping", b)),
    st.binary(max_size=125).map(lambda b: ("pong", b)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(messages, st.integers(1, 3)), max_size=12), st.lists(st.integers(0, 10**6), max_size=8))
def test_decodes_what_a_server_encodes_whatever_the_reads(
    plan: list[tuple[tuple[str, Any], int]], cuts: list[int]
) -> None:
    conn, wire, expected = server(), b"", []
    for (kind, value), pieces in plan:
        if kind == "ping":
            wire += conn.send(Ping(payload=value))
            expected.append(GotPing(value))
        elif kind == "pong":
            wire += conn.send(Pong(payload=value))
            expected.append(GotPong(value))
        else:
            size = max(1, len(value) // pieces)
            chunks = [value[i : i + size] for i in range(0, len(value), size)] or [value]
            event: type[Message[Any]] = TextMessage if kind == "text" else BytesMessage
            for n, chunk in enumerate(chunks):
                wire += conn.send(event(data=chunk, message_finished=n == len(chunks) - 1))
                if n == 0 and len(chunks) > 1:
                    wire += conn.send(Ping(payload=b"between"))  # a control frame inside a fragmented message
                    expected.append(GotPing(b"between"))
            expected.append(value)
    wire += conn.send(CloseConnection(code=1001, reason="going"))
    expected.append(Close(1001, "going"))
    assert feed_in_chunks(FrameDecoder(MAX), wire, cuts) == expected


def test_progress_burst_in_one_read() -> None:
    conn = server()
    frames = [f'{{"type": "progress", "data": {{"value": {i}, "max": 500}}}}' for i in range(100)]
    wire = b"".join(conn.send(TextMessage(data=f)) for f in frames)
    assert FrameDecoder(MAX).feed(wire) == frames


def test_close_without_code() -> None:
    assert FrameDecoder(MAX).feed(b"\x88\x00") == [Close(1005, None)]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"\x81\x82abcd\x00\x00", 1002),  # masked: only clients mask
        (b"\xc1\x01a", 1002),  # RSV1 set: no extension was negotiated
        (b"\x81\x02\xff\xfe", 1007),  # text that is not UTF-8
        (b"\x80\x01a", 1002),  # a continuation without a message
        (b"\x01\x01a\x81\x01b", 1002),  # a new message inside a fragmented one
        (b"\x09\x01a", 1002),  # a fragmented ping
        (b"\x89\x7e\x00\x7e" + b"a" * 126, 1002),  # a ping over 125 bytes
        (b"\x88\x01\x03", 1002),  # close with a 1-byte payload
        (b"\x88\x02" + struct.pack(">H", 1006), 1002),  # a code only the local end may use
        (b"\x88\x04\x03\xe8\xff\xfe", 1007),  # close reason not UTF-8
        (b"\x83\x00", 1002),  # an unknown opcode
    ],
)
def test_protocol_errors_name_the_close_code(wire: bytes, code: int) -> None:
    with pytest.raises(FrameError) as err:
        FrameDecoder(MAX).feed(wire)
    assert err.value.code == code


def test_too_big_is_refused_by_its_header_before_its_payload_arrives() -> None:
    decoder = FrameDecoder(1000)
    with pytest.raises(FrameError) as err:
        decoder.feed(b"\x82\x7f" + struct.pack(">Q", 10**9))  # 1 GB announced, nothing of it sent
    assert err.value.code == 1009
    decoder = FrameDecoder(1000)  # fragments count together
    with pytest.raises(FrameError) as err:
        decoder.feed(b"\x02\x7e\x02\x58" + b"a" * 600 + b"\x80\x7e\x02\x58")
    assert err.value.code == 1009


def test_a_big_frame_arriving_in_small_reads() -> None:
    payload = bytes(range(256)) * 4000  # ~1 MB, like a full-size preview
    wire = server().send(BytesMessage(data=payload))
    decoder = FrameDecoder(MAX)
    got = [m for i in range(0, len(wire), 65536) for m in decoder.feed(wire[i : i + 65536])]
    assert got == [payload]


def test_a_fault_keeps_what_came_before_it() -> None:
    wire = server().send(TextMessage(data="before")) + b"\x81\x82abcd\x00\x00"
    with pytest.raises(FrameError) as err:
        FrameDecoder(MAX).feed(wire)
    assert err.value.code == 1002 and err.value.decoded == ["before"]
