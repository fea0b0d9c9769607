"""A lean HTTP/1.1 client for one ComfyUI (plain ``http://``), for the request every task makes: ``POST /prompt``.

httpx costs ~1.1 ms of CPU per request on this path (its request and response models, httpcore's pool and its
locks); this client is h11 over a trio ``SocketStream`` on keep-alive connections, ~0.4 ms. It behaves as the
gateway's ``httpx.AsyncClient`` does for such a request:

* keep-alive: idle connections are reused, newest first; one idle longer than ``keepalive_expiry`` (httpx's
  default, 5 s) or that has become readable while idle (the server closed it, or sent something unasked) is closed
  and the next one tried, else a new connection is opened; a request is never sent twice;
* the body is JSON encoded as httpx encodes ``json=`` (compact, ``ensure_ascii=False``, no NaN); redirects are not
  followed; a response that ends its connection (``Connection: close``, HTTP/1.0) closes it;
* failures raise httpx's own exceptions (``ConnectError``, ``WriteError``, ``ReadError``, ``RemoteProtocolError``,
  ``DecodingError``), so ``_commands.request`` maps them to ``HTTPFailed`` exactly as before; the deadline is still
  ``_commands.request``'s, over the whole exchange; a connection whose exchange did not end cleanly (an error,
  a cancellation) is closed, never reused.

``usable(url)`` says whether it may stand in for httpx: plain http and no proxy configured in the environment
(httpx would go through it); anything else keeps httpx.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import httpx
import trio

__all__ = ["Http11Client", "Response"]

KEEPALIVE_EXPIRY: Final = 5.0  # httpx's default (Limits.keepalive_expiry)
MAX_IDLE: Final = 20  # httpx's default max_keepalive_connections
READ_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class Response:
    """What ``_commands`` reads of an answer: as httpx's ``Response`` gives it."""

    status_code: int
    headers: tuple[tuple[bytes, bytes], ...]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        charset = "utf-8"  # httpx's default_encoding
        for name, value in self.headers:
            if name == b"content-type":
                for param in value.decode("latin-1").split(";")[1:]:
                    key, _, val = param.strip().partition("=")
                    if key.lower() == "charset" and val:
                        charset = val.strip("'\"")
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:  # an unknown charset
            return self.content.decode("utf-8", errors="replace")


@dataclass(eq=False, slots=True)
class _Conn:
    stream: trio.SocketStream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        self.stream.socket.close()


class Http11Client:
    def __init__(self, base_url: str, *, keepalive_expiry: float = KEEPALIVE_EXPIRY, max_idle: int = MAX_IDLE) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"Http11Client takes a plain http:// URL, not {base_url!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.authority = url.netloc.rpartition("@")[2].encode("ascii")  # the Host header, as httpx writes it
        self.prefix = url.path.rstrip("/")
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self.connects = 0  # connections opened (tests, stats)

    @staticmethod
    def usable(base_url: str) -> bool:
        """Plain http, and no proxy in the environment that httpx would use for it."""
        proxies = urllib.request.getproxies()
        return urllib.parse.urlsplit(base_url).scheme == "http" and not (proxies.get("http") or proxies.get("all"))

    async def request(self, method: str, path: str, *, json_body: Any = None) -> Response:
        body = b""
        headers = [(b"Host", self.authority), (b"Accept", b"*/*"), (b"Accept-Encoding", b"gzip, deflate")]
        if json_body is not None:
            body = json.dumps(json_body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers += [(b"Content-Length", str(len(body)).encode()), (b"Content-Type", b"application/json")]
        elif method not in ("GET", "HEAD"):
            headers.append((b"Content-Length", b"0"))
        conn = self._checkout() or await self._connect()
        reusable = False
        try:
            response = await self._exchange(
                conn, h11.Request(method=method, target=self.prefix + path, headers=headers), body
            )
            reusable = conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
        finally:
            if reusable and len(self._idle) < self.max_idle:
                conn.h11.start_next_cycle()
                conn.idle_since = trio.current_time()
                self._idle.append(conn)
            else:
                conn.close()
        return response

    def close(self) -> None:
        """Close the idle connections (one in use is closed when its request ends)."""
        while self._idle:
            self._idle.pop().close()

    # -- connections

    def _checkout(self) -> _Conn | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since <= self.keepalive_expiry and not conn.stream.socket.is_readable():
                return conn
            conn.close()  # expired, or closed by the server (readable: EOF) while idle
        return None

    async def _connect(self) -> _Conn:
        try:
            stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        self.connects += 1
        return _Conn(stream)

    async def _exchange(self, conn: _Conn, request: h11.Request, body: bytes) -> Response:
        h = conn.h11
        try:
            data = h.send(request) or b""
            if body:
                data += h.send(h11.Data(data=body)) or b""
            data += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:  # pragma: no cover - our own request is well formed
            raise httpx.LocalProtocolError(str(exc)) from exc
        try:
            await conn.stream.send_all(data)
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        status, chunks = 0, []
        headers: tuple[tuple[bytes, bytes], ...] = ()
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is h11.NEED_DATA:
                try:
                    h.receive_data(await conn.stream.receive_some(READ_SIZE))
                except (OSError, trio.BrokenResourceError) as exc:
                    raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, tuple(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, _decode(headers, b"".join(chunks)))
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            # an InformationalResponse (1xx) is passed over


def _decode(headers: tuple[tuple[bytes, bytes], ...], content: bytes) -> bytes:
    """Undo a Content-Encoding we offered (gzip, deflate), as httpx does."""
    for name, value in headers:
        if name == b"content-encoding":
            for coding in reversed([c.strip().lower() for c in value.split(b",")]):
                try:
                    if coding == b"gzip":
                        content = zlib.decompress(content, zlib.MAX_WBITS | 16)
                    elif coding == b"deflate":
                        try:
                            content = zlib.decompress(content)
                        except zlib.error:
                            content = zlib.decompress(content, -zlib.MAX_WBITS)
                    elif coding not in (b"identity", b""):
                        raise httpx.DecodingError(f"unsupported Content-Encoding {coding!r}")
                except zlib.error as exc:
                    raise httpx.DecodingError(str(exc)) from exc
    return content
