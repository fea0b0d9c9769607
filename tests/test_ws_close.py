"""Malformed WebSocket frames close with the RFC 6455 code (web/_ws_close.py), on a raw socket."""

from __future__ import annotations

import base64
import os
import struct
from typing import Any

import pytest
import trio
from conftest import GatewayUnderTest


async def open_raw(g: GatewayUnderTest) -> trio.SocketStream:
    port = int(g.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: v12.stomp\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


def frame(first: int, payload: bytes, *, masked: bool = True) -> bytes:
    assert len(payload) < 126
    if not masked:
        return bytes([first, len(payload)]) + payload
    mask = os.urandom(4)
    return bytes([first, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def close_code(stream: trio.SocketStream) -> int | None:
    """The code of the close frame the server sends (None: the connection ended without one)."""
    data = b""
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            data += chunk
            while len(data) >= 2:
                length = data[1] & 0x7F
                if len(data) < 2 + length:
                    break
                if data[0] & 0x0F == 0x8:
                    return struct.unpack("!H", data[2:4])[0]
                data = data[2 + length :]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(0x81, b"CONNECT\n\n\xff\x00"), 1007),  # a text frame that is not UTF-8
        (frame(0xC1, b"x"), 1002),  # RSV1 without an extension
        (frame(0x81, b"x", masked=False), 1002),  # a client frame must be masked
        (frame(0x83, b"x"), 1002),  # reserved opcode
    ],
)
async def test_malformed_frames_close_with_their_rfc6455_code(
    sim: Any, start_gateway: Any, bad: bytes, code: int
) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    stream = await open_raw(g)
    await stream.send_all(bad)
    assert await close_code(stream) == code
    await stream.aclose()
    assert (await g.http.get(f"{g.url}/healthz")).status_code == 200


async def test_a_message_over_the_limit_closes_with_1009(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])  # Hypercorn's limit: max(4 x frame size, 1 MiB)
    stream = await open_raw(g)
    payload = b"x" * ((1 << 20) + 10)
    mask = b"\x00\x00\x00\x00"
    await stream.send_all(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", len(payload)) + mask + payload)
    assert await close_code(stream) == 1009
    await stream.aclose()
