"""A STOMP client for the fault harness that resumes: one (user, clientId) session, reconnecting by itself.

It subscribes to ``/user/topic/messages`` with ``last-seq`` after its first connection, records every message
(with the wall-clock time it arrived and its connection number), and does what a page does on ``resync``:
reload its tasks and balance over HTTP. ``flush`` waits until everything published to the session before it
has arrived. Its own small frame codec: it does not use ``web.stomp``, so the server is checked against
something else than itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

log = logging.getLogger("chaos")


class Gateway(Protocol):
    """What a client needs of the gateway under test (``_chaos_lib.GatewayProcess`` is one)."""

    url: str
    ws_url: str

    async def wait_up(self) -> None: ...

    def issue(self, user: str) -> str: ...

    def headers(self, user: str) -> dict[str, str]: ...


@dataclass
class Frame:
    command: str
    headers: dict[str, str]
    body: bytes


def _parse(buf: bytes) -> tuple[Frame | None, bytes]:
    while buf[:1] in (b"\n", b"\r"):  # heart-beats
        buf = buf[1:]
    end = buf.find(b"\n\n")
    if end < 0:
        return None, buf
    head = buf[:end].decode().split("\n")
    headers: dict[str, str] = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        if head[0] != "CONNECTED":
            v = v.replace("\\c", ":").replace("\\n", "\n").replace("\\r", "\r").replace("\\\\", "\\")
        headers.setdefault(k, v)
    start = end + 2
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(buf) < start + n + 1:
            return None, buf
        return Frame(head[0], headers, buf[start : start + n]), buf[start + n + 1 :]
    nul = buf.find(b"\x00", start)
    if nul < 0:
        return None, buf
    return Frame(head[0], headers, buf[start:nul]), buf[nul + 1 :]


def _frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [command] + [f"{k}:{v}" for k, v in headers.items()]
    if body:
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode() + body + b"\x00"


@dataclass
class Seen:
    """One message as the client got it: wall-clock time, connection number, seq and body."""

    at: float
    conn: int
    seq: int
    body: dict[str, Any]


@dataclass
class ResumingClient:
    """One (user, clientId) session: connects, subscribes with ``last-seq`` after the first time, records."""

    user: str
    client_id: str
    gateway: Gateway
    http: httpx.AsyncClient
    pause: Callable[[], float] = lambda: 0.05  # seconds before a reconnect (seeded by the caller)
    seen: list[Seen] = field(default_factory=list)
    resyncs: list[float] = field(default_factory=list)  # wall-clock times
    reloaded: dict[str, str] = field(default_factory=dict)  # task -> state read over HTTP after a resync
    reloaded_balance: dict[str, int] | None = None
    connections: int = 0
    last_seq: int | None = None
    errors: list[str] = field(default_factory=list)
    stopping: bool = False
    _scope: trio.CancelScope | None = None
    _live: trio.Event = field(default_factory=trio.Event)
    _ws: Any = None
    _markers: dict[str, trio.Event] = field(default_factory=dict)
    _news: trio.Event = field(default_factory=trio.Event)

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], *, timeout: float = 30) -> dict[str, Any]:
        """The first message (already seen or still to come) whose body satisfies ``pred``."""
        checked = 0
        with trio.fail_after(timeout):
            while True:
                for m in self.seen[checked:]:
                    if pred(m.body):
                        return m.body
                checked = len(self.seen)
                await self._news.wait()

    async def wait_live(self, *, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            await self._live.wait()

    def known_tasks(self) -> set[str]:
        return {m.body["taskId"] for m in self.seen if isinstance(m.body.get("taskId"), str)}

    def drop(self) -> bool:
        """Cut this client's connection (it reconnects and resumes by itself). False if it was not connected."""
        if self._scope is None:
            return False
        self._scope.cancel()
        return True

    async def run(self) -> None:
        while not self.stopping:
            await self.gateway.wait_up()
            log.debug("%s: connecting", self.user)
            try:
                await self._connection()
            except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                log.debug("%s: connection ended: %r", self.user, exc)
            else:
                log.debug("%s: connection ended", self.user)
            if self._live.is_set():  # never replace an event someone may wait on before it was set
                self._live = trio.Event()
            self._ws = None
            if not self.stopping:
                await trio.sleep(self.pause())  # seeded reconnect pause (fault injection, not a wait for an outcome)

    async def _connection(self) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await self._session()
            finally:
                self._scope = None

    async def _session(self) -> None:
        # a connect that races a SIGKILL of the gateway can hang until the timeout: keep it short
        async with open_websocket_url(
            self.gateway.ws_url, subprotocols=["v12.stomp"], connect_timeout=3, disconnect_timeout=2
        ) as ws:
            self.connections += 1
            conn = self.connections
            buf = b""
            await ws.send_message(
                _frame(
                    "CONNECT",
                    {
                        "accept-version": "1.2",
                        "heart-beat": "0,0",
                        "clientId": self.client_id,
                        "Authorization": f"Bearer {self.gateway.issue(self.user)}",
                    },
                )
            )
            sub = {"id": "s0", "destination": "/user/topic/messages", "receipt": f"sub-{conn}"}
            if self.last_seq is not None:
                sub["last-seq"] = str(self.last_seq)
            await ws.send_message(_frame("SUBSCRIBE", sub))
            while True:
                frame, buf = _parse(buf)
                if frame is None:
                    data = await ws.get_message()
                    buf += data.encode() if isinstance(data, str) else data
                    continue
                if frame.command == "RECEIPT":
                    self._ws = ws
                    self._live.set()
                elif frame.command == "ERROR":
                    log.debug("%s: ERROR %s", self.user, frame.headers.get("message"))
                    return
                elif frame.command == "MESSAGE":
                    await self._message(conn, frame)

    async def _message(self, conn: int, frame: Frame) -> None:
        body = json.loads(frame.body)
        seq = int(frame.headers["seq"])
        self.last_seq = seq
        self.seen.append(Seen(time.time(), conn, seq, body))
        self._news.set()
        self._news = trio.Event()
        if body.get("type") == "resync":
            self.resyncs.append(time.time())
            await self._reload()
        elif body.get("type") == "rejected":
            for marker, event in self._markers.items():
                if marker in str(body.get("detail", "")):
                    event.set()

    async def _reload(self) -> None:
        """What a page does after ``resync``: reload its tasks and balance over HTTP."""
        headers = self.gateway.headers(self.user)
        try:
            for task_id in sorted(self.known_tasks()):
                r = await self.http.get(f"{self.gateway.url}/api/tasks/{task_id}", headers=headers)
                if r.status_code == 200:
                    self.reloaded[task_id] = r.json()["state"]
            r = await self.http.get(f"{self.gateway.url}/api/balance", headers=headers)
            if r.status_code == 200:
                self.reloaded_balance = r.json()
        except httpx.HTTPError as exc:  # the gateway went away again: the next resync reloads again
            log.debug("%s: reload after resync failed: %r", self.user, exc)

    async def flush(self, marker: str, *, timeout: float = 30) -> None:
        """Wait until everything published to this session before now has arrived: send a cancel of a task that
        does not exist and wait for its ``rejected`` (published after whatever was queued before it)."""
        event = self._markers[marker] = trio.Event()
        with trio.fail_after(timeout):
            while not event.is_set():
                await self._live.wait()
                ws = self._ws
                try:
                    await ws.send_message(
                        _frame("SEND", {"destination": "/app/cancel"}, json.dumps({"taskId": marker}).encode())
                    )
                except (ConnectionClosed, trio.BrokenResourceError, AttributeError):
                    continue
                with trio.move_on_after(5):
                    await event.wait()
