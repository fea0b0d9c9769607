"""Server-to-client WebSocket frames (RFC 6455 section 5) -> messages and control frames. Sans-IO: no trio here.

Why not wsproto's parser: at full speed ComfyUI sends two frames per sampler step, and wsproto's generic frame
machinery (a generator per buffer, a header object, an extension hook and a UTF-8 incremental decoder per frame)
was the comfy actor's biggest cost (BENCHMARKS.md, "Issue 11: ComfyUI ingest"). The client side is simple: frames
from a server are never masked, no extension is negotiated (the handshake offers none), so a frame is a 2-10 byte
header and its payload. wsproto still does the handshake and encodes what we send (``_wsclient``).

``feed(data)`` returns what the bytes completed, in order: ``str`` (a text message), ``bytes`` (a binary message),
``Ping``/``Pong`` (their payload) and ``Close`` (code, reason). Anything that breaks the protocol raises
``FrameError`` with the close code to send (1002 protocol error, 1007 bad UTF-8, 1009 message too big) and what the
same ``feed`` completed before the fault (``decoded``); the decoder is then unusable. A message over ``max_message`` bytes is refused as soon as its header announces it.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = ["Close", "FrameDecoder", "FrameError", "Ping", "Pong"]

PROTOCOL_ERROR: Final = 1002
INVALID_PAYLOAD: Final = 1007
MESSAGE_TOO_BIG: Final = 1009
NO_STATUS: Final = 1005  # a close frame without a code

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0, 1, 2, 8, 9, 10


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    code: int
    reason: str | None


class FrameError(Exception):
    """The server broke the protocol; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.decoded: list[str | bytes | Ping | Pong | Close] = []  # what the same feed completed before the fault


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4): not below 1000, not the local-only 1005/1006/1015, not unassigned."""
    if 3000 <= code <= 4999:
        return True
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006)


def _close(payload: bytes) -> Close:
    if not payload:
        return Close(NO_STATUS, None)
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return Close(code, reason or None)


class FrameDecoder:
    __slots__ = ("_buf", "_kind", "_max", "_parts", "_size")

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._buf = bytearray()  # the start of a frame that has not fully arrived
        self._kind = 0  # opcode of the fragmented message being assembled (0: none)
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[str | bytes | Ping | Pong | Close]:
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        out: list[str | bytes | Ping | Pong | Close] = []
        view = memoryview(buf)
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                if b1 & 0x80:
                    raise FrameError(PROTOCOL_ERROR, "masked frame from the server")
                if b0 & 0x70:
                    raise FrameError(PROTOCOL_ERROR, "reserved bits set, no extension was negotiated")
                length, head = b1, 2  # (b1 & 0x7F: the mask bit is 0)
                if length == 126:
                    if end - pos < 4:
                        break
                    length, head = (buf[pos + 2] << 8) | buf[pos + 3], 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    length, head = int.from_bytes(view[pos + 2 : pos + 10], "big"), 10
                if b0 == 0x81 and not self._kind and length <= self._max:  # a whole text message: most frames
                    start = pos + head
                    if end - start < length:
                        break
                    try:
                        out.append(str(view[start : start + length], "utf-8"))  # no intermediate bytes
                    except UnicodeDecodeError:
                        raise FrameError(INVALID_PAYLOAD, "text message is not UTF-8") from None
                    pos = start + length
                    continue
                opcode, fin = b0 & 0x0F, b0 & 0x80
                if opcode >= _CLOSE:
                    if not fin or length > 125:
                        raise FrameError(PROTOCOL_ERROR, "fragmented or oversized control frame")
                elif self._size + length > self._max:
                    raise FrameError(MESSAGE_TOO_BIG, f"message over {self._max} bytes")
                if end - pos < head + length:
                    break
                payload = bytes(view[pos + head : pos + head + length])
                pos += head + length
                if opcode in (_TEXT, _BINARY):
                    if self._kind:
                        raise FrameError(PROTOCOL_ERROR, "a new message inside a fragmented one")
                    if fin:
                        out.append(self._message(opcode, payload))
                    else:
                        self._kind, self._parts, self._size = opcode, [payload], length
                elif opcode == _CONTINUATION:
                    if not self._kind:
                        raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
                    self._parts.append(payload)
                    self._size += length
                    if fin:
                        out.append(self._message(self._kind, b"".join(self._parts)))
                        self._kind, self._parts, self._size = 0, [], 0
                elif opcode == _PING:
                    out.append(Ping(payload))
                elif opcode == _PONG:
                    out.append(Pong(payload))
                elif opcode == _CLOSE:
                    out.append(_close(payload))
                else:
                    raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        except FrameError as exc:
            exc.decoded = out
            raise
        finally:
            view.release()
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(buf[pos:])
        return out

    @staticmethod
    def _message(opcode: int, payload: bytes) -> str | bytes:
        if opcode == _BINARY:
            return payload
        try:
            return payload.decode()
        except UnicodeDecodeError:
            raise FrameError(INVALID_PAYLOAD, "text message is not UTF-8") from None
