"""A deliberately small, independent STOMP client for tests (it does not use web.stomp, so the codec is
checked against something else than itself; the Node test checks against the real @stomp/stompjs)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

DEFAULT_TIMEOUT = 15.0


@dataclass
class Received:
    command: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append({"n": "\n", "r": "\r", "c": ":", "\\": "\\"}[value[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class StompClient:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.buf = b""
        self.heartbeats = 0
        self.connected: Received | None = None

    async def send_frame(self, command: str, headers: dict[str, str] | None = None, body: bytes | str = b"") -> None:
        if isinstance(body, str):
            body = body.encode()
        lines = [command] + [f"{k}:{v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"content-length:{len(body)}")
        await self.ws.send_message(("\n".join(lines) + "\n\n").encode() + body + b"\x00")

    def _parse_one(self) -> Received | None:
        while self.buf[:1] in (b"\n", b"\r"):
            self.buf = self.buf[2:] if self.buf[:2] == b"\r\n" else self.buf[1:]
            self.heartbeats += 1
        end = self.buf.find(b"\n\n")
        if end < 0:
            return None
        head = self.buf[:end].decode().split("\n")
        headers: dict[str, str] = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(_unescape(k), _unescape(v) if head[0] != "CONNECTED" else v)
        start = end + 2
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(self.buf) < start + n + 1:
                return None
            body, rest = self.buf[start:start + n], self.buf[start + n + 1:]
        else:
            nul = self.buf.find(b"\x00", start)
            if nul < 0:
                return None
            body, rest = self.buf[start:nul], self.buf[nul + 1:]
        self.buf = rest
        return Received(head[0], headers, body)

    async def next_frame(self, timeout: float = DEFAULT_TIMEOUT) -> Received:
        with trio.fail_after(timeout):
            while True:
                frame = self._parse_one()
                if frame is not None:
                    return frame
                data = await self.ws.get_message()
                self.buf += data.encode() if isinstance(data, str) else data

    async def leave(self) -> None:
        """DISCONNECT and read up to its RECEIPT, so nothing is left unread when the client closes (an unread message
        leaves trio-websocket's reader stuck, and the close waits for it: 60 s)."""
        await self.send_frame("DISCONNECT", {"receipt": "bye"})
        while not ((frame := await self.next_frame()).command == "RECEIPT" and frame.headers["receipt-id"] == "bye"):
            pass

    async def subscribe(self, destination: str = "/user/topic/messages", sub_id: str = "sub-0", **extra: str) -> None:
        await self.send_frame("SUBSCRIBE", {"id": sub_id, "destination": destination, **extra})

    async def next_message(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[dict[str, str], dict[str, Any]]:
        while True:
            frame = await self.next_frame(timeout)
            if frame.command == "MESSAGE":
                return frame.headers, frame.json()
            if frame.command == "ERROR":
                raise AssertionError(f"ERROR frame: {frame.headers} {frame.body!r}")

    async def collect_until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = DEFAULT_TIMEOUT
    ) -> list[tuple[dict[str, str], dict[str, Any]]]:
        """Messages until (and including) the first whose body satisfies ``done``."""
        got = []
        with trio.fail_after(timeout):
            while True:
                headers, body = await self.next_message()
                got.append((headers, body))
                if done(body):
                    return got


@asynccontextmanager
async def stomp_connect(
    ws_url: str, *, token: str | None = None, client_id: str | None = None, heartbeat: str = "0,0",
    extra: dict[str, str] | None = None, expect_connected: bool = True,
) -> AsyncIterator[StompClient]:
    async with open_websocket_url(ws_url, subprotocols=["v12.stomp", "v11.stomp", "v10.stomp"]) as ws:
        client = StompClient(ws)
        headers = {"accept-version": "1.2,1.1,1.0", "heart-beat": heartbeat}
        if client_id is not None:
            headers["clientId"] = client_id
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(extra or {})
        await client.send_frame("CONNECT", headers)
        if expect_connected:
            frame = await client.next_frame()
            assert frame.command == "CONNECTED", (frame.command, frame.headers, frame.body)
            client.connected = frame
        try:
            yield client
        finally:
            # a test that stops reading while the gateway still sends leaves trio-websocket's reader blocked on its
            # full message queue, and the close below would wait for that reader for ever: drop what is unread
            ws._recv_channel.close()
            try:
                await ws._stream.aclose()  # trio-websocket leaves it open after a server close (STACK-NOTES 2.9)
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
