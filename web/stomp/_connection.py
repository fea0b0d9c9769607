"""The server side of one STOMP session, sans-IO (h11/wsproto style).

Three verbs: ``receive_data(bytes)`` (``b""`` = the peer closed), ``next_event()`` returning a ``Frame``,
``HEARTBEAT`` or ``NEED_DATA``, and ``send(frame) -> bytes``. The object never does I/O and never imports
trio; the endpoint's loop feeds WebSocket messages in and writes the returned bytes out.

Every state change, in both directions, is a row of ``TRANSITIONS`` (client and server commands are
disjoint, so one dict holds both). Two facts are kept beside it because they are not states: whether a
CONNECT has been received (``version`` is set) and whether we already sent our one ERROR frame.

Parsing is incremental and linear: the buffer is a ``bytearray`` read at an offset with ``bytearray.find``
and compacted only when ``NEED_DATA`` is returned. Every limit is checked as soon as the bytes at hand
prove it broken, so an incomplete frame never holds more than ``max_frame_size`` (+1 for its NUL) bytes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    ALL_COMMANDS,
    CLIENT_COMMANDS,
    HEARTBEAT,
    NEED_DATA,
    SERVER_COMMANDS,
    UNESCAPED_COMMANDS,
    Frame,
    make_error_frame,
    trusted_frame,
)
from ._frames import (
    UNESCAPES_11,
    UNESCAPES_12,
    decode_headers,
    encodable,
    encode_frame,
    make_encodable,
    negotiate_version,
    version_error_frame,
)

__all__ = ["TRANSITIONS", "ConnState", "StompConnection", "StompStatistics"]

MAX_FRAME_SIZE: Final = 64 * 1024  # bytes: command line through the last body byte (the NUL not counted)
MAX_HEADERS: Final = 64  # header lines per frame
MAX_HEADER_LENGTH: Final = 8192  # bytes per header line (the command line too), EOL not counted


class ConnState(enum.Enum):
    CONNECTING = "CONNECTING"  # until we send CONNECTED (a CONNECT may already have been received)
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"  # the client sent DISCONNECT; only RECEIPT (or ERROR) may still be sent
    ERROR = "ERROR"  # sticky: the client sent garbage, or we sent ERROR


_CONNECTING, _CONNECTED, _DISCONNECTED, _ERROR = ConnState

TRANSITIONS: Final[dict[tuple[ConnState, str], ConnState]] = {
    # received from the client (checked only for CLIENT_COMMANDS)
    (_CONNECTING, "CONNECT"): _CONNECTING,  # stays CONNECTING until the endpoint answers
    (_CONNECTING, "STOMP"): _CONNECTING,
    **{
        (_CONNECTED, command): _CONNECTED
        for command in ("SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT")
    },
    (_CONNECTED, "DISCONNECT"): _DISCONNECTED,
    # sent by us (checked only for SERVER_COMMANDS)
    (_CONNECTING, "CONNECTED"): _CONNECTED,  # only once a CONNECT was received
    (_CONNECTING, "ERROR"): _ERROR,
    (_CONNECTED, "MESSAGE"): _CONNECTED,
    (_CONNECTED, "RECEIPT"): _CONNECTED,
    (_CONNECTED, "ERROR"): _ERROR,
    (_DISCONNECTED, "RECEIPT"): _DISCONNECTED,  # the DISCONNECT's receipt, and receipts still queued
    (_DISCONNECTED, "ERROR"): _ERROR,
    (_ERROR, "ERROR"): _ERROR,  # the answer to a RemoteProtocolError; at most one ERROR is ever sent
}

# Headers a client frame must carry, per negotiated version (spec "Client Frames"). ``host`` is left
# out of CONNECT on purpose: stompjs never sends it (STACK-NOTES 5.2).
_TXN = ("transaction",)
REQUIRED_HEADERS: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "1.0": {"SEND": ("destination",), "SUBSCRIBE": ("destination",), "ACK": ("message-id",),
            "NACK": ("message-id",), "BEGIN": _TXN, "COMMIT": _TXN, "ABORT": _TXN},
    "1.1": {"SEND": ("destination",), "SUBSCRIBE": ("destination", "id"), "UNSUBSCRIBE": ("id",),
            "ACK": ("message-id", "subscription"), "NACK": ("message-id", "subscription"),
            "BEGIN": _TXN, "COMMIT": _TXN, "ABORT": _TXN},
    "1.2": {"SEND": ("destination",), "SUBSCRIBE": ("destination", "id"), "UNSUBSCRIBE": ("id",),
            "ACK": ("id",), "NACK": ("id",), "BEGIN": _TXN, "COMMIT": _TXN, "ABORT": _TXN},
}  # fmt: skip

_COMMAND_BY_BYTES: Final = {command.encode("ascii"): command for command in ALL_COMMANDS}
_LONGEST_COMMAND: Final = max(map(len, ALL_COMMANDS))
_EOL_RUN: Final = re.compile(rb"(?:\r?\n)+")
_IDLE, _HEAD, _BODY = 0, 1, 2  # parser phases


@dataclass(frozen=True, slots=True)
class StompStatistics:
    state: ConnState
    version: str | None
    buffered_bytes: int  # received but not yet consumed; at most max_frame_size + 1 after NEED_DATA
    frames_received: int
    heartbeats_received: int
    frames_sent: int


class StompConnection:
    """The server side of one STOMP 1.0-1.2 session. Keyword-only limits, all in bytes or counts."""

    def __init__(
        self,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_headers: int = MAX_HEADERS,
        max_header_length: int = MAX_HEADER_LENGTH,
    ) -> None:
        for name, value in (("max_frame_size", max_frame_size), ("max_headers", max_headers),
                            ("max_header_length", max_header_length)):  # fmt: skip
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        self.max_frame_size = max_frame_size
        self.max_headers = max_headers
        self.max_header_length = max_header_length
        self.state = ConnState.CONNECTING
        self.version: str | None = None
        self._error: RemoteProtocolError | None = None  # the remote error that put us in ERROR
        self._error_sent = False
        self._eof = False
        self._frames_received = self._heartbeats_received = self._frames_sent = 0
        # parser: the current frame starts at _pos; the other offsets are absolute indexes into _buf
        self._buf = bytearray()
        self._pos = 0
        self._phase = _IDLE
        self._line_start = 0  # HEAD: start of the line being read
        self._find_from = 0  # HEAD: where the next search for LF resumes; BODY: for NUL
        self._header_lines = -1  # HEAD: header lines seen so far (-1 while reading the command line)
        self._headers_start = 0
        self._command = ""
        self._headers: tuple[tuple[str, str], ...] = ()
        self._receipt: str | None = None
        self._body_start = 0
        self._content_length: int | None = None
        self._next_state = self.state
        self._next_version: str | None = None

    def __repr__(self) -> str:
        return (f"<StompConnection state={self.state.name} version={self.version!r} "
                f"buffered={len(self._buf) - self._pos}>")  # fmt: skip

    def statistics(self) -> StompStatistics:
        return StompStatistics(
            state=self.state,
            version=self.version,
            buffered_bytes=len(self._buf) - self._pos,
            frames_received=self._frames_received,
            heartbeats_received=self._heartbeats_received,
            frames_sent=self._frames_sent,
        )

    # ---- receiving ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("received data after the end of the stream (b'' was passed before)")
            return
        if not data:
            self._eof = True
        elif self.state is not ConnState.ERROR:  # after an error the session is over: drop, don't buffer
            self._buf += data

    def take_heartbeat(self, data: bytes | str) -> bool:
        """Consume ``data`` at once if it is exactly one heart-beat (an EOL alone) that arrives between frames of a
        connected session with nothing buffered: the common case of an idle connection, with no buffering and no
        parse. False (nothing consumed): pass ``data`` to ``receive_data`` as usual."""
        if (
            (data == b"\n" or data == "\n" or data == b"\r\n" or data == "\r\n")
            and self.state is ConnState.CONNECTED
            and self._phase == _IDLE
            and self._pos >= len(self._buf)
            and not self._eof
        ):
            self._heartbeats_received += 1
            return True
        return False

    def next_event(self) -> Frame | type[HEARTBEAT] | type[NEED_DATA]:
        """The next complete event, or ``NEED_DATA``. Raises RemoteProtocolError, then again on every call."""
        if self.state is ConnState.ERROR:
            raise self._sticky_error()
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self.state = ConnState.ERROR
            self._error = RemoteProtocolError(str(exc), error_frame=exc.error_frame)  # kept without a traceback
            self._buf = bytearray()
            self._pos = 0
            raise

    def _sticky_error(self) -> RemoteProtocolError:
        if self._error is not None:
            return RemoteProtocolError(str(self._error), error_frame=self._error.error_frame)
        return RemoteProtocolError("connection is in state ERROR: an ERROR frame was sent")

    def _parse(self) -> Frame | type[HEARTBEAT] | type[NEED_DATA]:
        buf = self._buf
        while True:
            if self._phase == _IDLE:
                pos = self._pos
                if pos >= len(buf):
                    return self._need_data()
                byte = buf[pos]
                if byte == 10 or byte == 13:  # LF or CR: a heart-beat, or the start of one
                    if self.state is ConnState.CONNECTED:
                        if byte == 10:
                            self._pos = pos + 1
                        elif pos + 1 >= len(buf):
                            return self._need_data()
                        elif buf[pos + 1] == 10:
                            self._pos = pos + 2
                        else:
                            self._start_frame(pos)  # a frame starting with CR: rejected as a command
                            continue
                        self._heartbeats_received += 1
                        return HEARTBEAT
                    match = _EOL_RUN.match(buf, pos)  # not connected: skip every EOL at once
                    if match is not None:
                        self._pos = match.end()
                        continue
                    if pos + 1 >= len(buf):  # a lone CR at the end: wait for what follows
                        return self._need_data()
                self._start_frame(pos)
            if self._phase == _HEAD and not self._parse_head():
                return self._need_data()
            frame = self._parse_body()
            if frame is None:
                return self._need_data()
            return frame

    def _start_frame(self, pos: int) -> None:
        self._phase = _HEAD
        self._line_start = self._find_from = pos
        self._header_lines = -1
        self._receipt = None  # known once the headers are decoded; echoed in ERROR frames from then on

    def _need_data(self) -> type[NEED_DATA]:
        if self._eof and (self._phase != _IDLE or self._pos < len(self._buf)):
            raise self._remote("connection closed mid-frame",
                               f"the stream ended inside a {self._command or 'partial'} frame")  # fmt: skip
        pos = self._pos
        if pos:  # compact: drop what was consumed (deleting a bytearray's head is cheap in CPython)
            del self._buf[:pos]
            self._pos = 0
            self._line_start -= pos
            self._find_from -= pos
            self._headers_start -= pos
            self._body_start -= pos
        return NEED_DATA

    def _parse_head(self) -> bool:
        """Read header lines; False when more data is needed. Leaves the frame in phase BODY."""
        buf = self._buf
        n = len(buf)
        line_start, find_from = self._line_start, self._find_from
        max_line = self.max_header_length
        while True:
            lf = buf.find(b"\n", find_from)
            if lf < 0:
                if self._header_lines < 0 and n - line_start > _LONGEST_COMMAND + 1:
                    raise self._remote("unknown command", f"unknown command {bytes(buf[line_start:n])[:40]!r}...")
                if n - line_start > max_line + 1:  # +1: the line may still end with CR LF
                    raise self._remote("header line too long",
                                       f"a header line exceeds {max_line} bytes")  # fmt: skip
                self._check_size(n)
                self._line_start, self._find_from = line_start, n
                return False
            end = lf - 1 if lf > line_start and buf[lf - 1] == 13 else lf
            if end - line_start > max_line:
                raise self._remote("header line too long",
                                   f"a header line of {end - line_start} bytes exceeds {max_line} bytes")  # fmt: skip
            if self._header_lines < 0:
                command = _COMMAND_BY_BYTES.get(bytes(buf[line_start:end]))
                if command is None:
                    raise self._remote("unknown command", f"unknown command {bytes(buf[line_start:end])[:40]!r}")
                self._command = command
                self._header_lines = 0
                self._headers_start = lf + 1
            elif end == line_start:  # the blank line ends the headers
                self._check_size(lf + 1)
                self._finish_head(line_start, lf + 1)
                return True
            else:
                self._header_lines += 1
                if self._header_lines > self.max_headers:
                    raise self._remote("too many headers",
                                       f"{self._command} has more than {self.max_headers} headers")  # fmt: skip
            line_start = find_from = lf + 1

    def _check_size(self, frame_end: int) -> None:
        if frame_end - self._pos > self.max_frame_size:
            raise self._remote("frame too large",
                               f"a {self._command or 'STOMP'} frame exceeds {self.max_frame_size} bytes")  # fmt: skip

    def _finish_head(self, headers_end: int, body_start: int) -> None:
        """The headers are complete: decode them, then check state, version, content-length, required headers."""
        command = self._command
        try:
            text = self._buf[self._headers_start : headers_end].decode("utf-8")
        except UnicodeDecodeError:
            raise self._remote("invalid UTF-8 in headers", f"{command} headers are not valid UTF-8") from None
        version = self.version
        if command in UNESCAPED_COMMANDS or version is None or version == "1.0":
            table = None
        else:
            table = UNESCAPES_12 if version == "1.2" else UNESCAPES_11
        headers, problem = decode_headers(command, text, table)
        first = dict(reversed(headers))  # the first repeat wins
        self._headers = headers
        self._receipt = first.get("receipt")
        if problem is not None:  # raised only now, so that the ERROR frame can carry the receipt
            raise self._remote(*problem)

        state = self.state
        new_state = TRANSITIONS.get((state, command))
        if new_state is None or command not in CLIENT_COMMANDS:
            raise self._remote(f"unexpected {command} frame in state {state.name}",
                               f"a client cannot send {command} while the session is {state.name}")  # fmt: skip
        if command == "CONNECT" or command == "STOMP":
            if version is not None:
                raise self._remote(f"unexpected {command} frame in state {state.name}",
                                   "a CONNECT was already received; wait for CONNECTED")  # fmt: skip
            version = negotiate_version(first.get("accept-version"))
            if version is None:
                raise RemoteProtocolError("unsupported STOMP version",
                                          error_frame=version_error_frame(first.get("accept-version", "")))  # fmt: skip
        self._next_state = new_state
        self._next_version = version

        length = first.get("content-length")
        self._content_length = None if length is None else self._parse_content_length(length, body_start)

        assert version is not None  # TRANSITIONS let nothing but CONNECT/STOMP in before a version is set
        for name in REQUIRED_HEADERS[version].get(command, ()):
            if name not in first:
                raise self._remote(f"missing header {name!r} in {command}", f"{command} requires a {name!r} header")
        if command == "UNSUBSCRIBE" and version == "1.0" and "id" not in first and "destination" not in first:
            raise self._remote("missing header 'id' in UNSUBSCRIBE",
                               "UNSUBSCRIBE requires an 'id' or 'destination' header")  # fmt: skip

        self._phase = _BODY
        self._body_start = self._find_from = body_start

    def _parse_content_length(self, value: str, body_start: int) -> int:
        if not value.isdigit() or not value.isascii():
            raise self._remote("invalid content-length", f"content-length {value[:40]!r} is not a byte count")
        digits = value.lstrip("0")  # int() of thousands of digits is slow (and refused past 4300)
        if len(digits) > 18 or body_start - self._pos + int(digits or "0") > self.max_frame_size:
            raise self._remote("frame too large",
                               f"content-length {value[:40]} exceeds the {self.max_frame_size}-byte frame limit")  # fmt: skip
        return int(digits or "0")

    def _parse_body(self) -> Frame | None:
        buf = self._buf
        body_start = self._body_start
        length = self._content_length
        if length is not None:
            end = body_start + length
            if end >= len(buf):
                return None  # the size was checked against the limit already
            if buf[end] != 0:
                raise self._remote("missing NUL terminator",
                                   f"{self._command} body is not followed by NUL after {length} bytes")  # fmt: skip
        else:
            end = buf.find(b"\0", self._find_from)
            if end < 0:
                self._check_size(len(buf))
                self._find_from = len(buf)
                return None
            self._check_size(end)
        frame = trusted_frame(self._command, self._headers, bytes(buf[body_start:end]))
        self._pos = end + 1
        self._phase = _IDLE
        self._command = ""
        self._headers = ()  # the frame has them: an idle connection keeps nothing of its last frame
        self._receipt = None
        self.state = self._next_state
        self.version = self._next_version
        self._frames_received += 1
        return frame

    def _remote(self, message: str, detail: str) -> RemoteProtocolError:
        """A RemoteProtocolError whose ERROR frame echoes the offending frame's receipt, if encodable."""
        receipt = self._receipt if self._phase == _HEAD or self._phase == _BODY else None
        if receipt is not None and not encodable(receipt, self.version):
            receipt = None
        return RemoteProtocolError(message, error_frame=make_error_frame(message, detail, receipt_id=receipt))

    # ---- sending --------------------------------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Encode a server frame for the negotiated version and advance the state. LocalProtocolError on misuse."""
        if not isinstance(frame, Frame):
            raise TypeError(f"send() takes a Frame, not {type(frame).__name__}")
        command = frame.command
        state = self.state
        if command not in SERVER_COMMANDS:
            raise LocalProtocolError(f"can't send client command {command} (in state {state.name})")
        new_state = TRANSITIONS.get((state, command))
        if new_state is None or self._error_sent:
            why = "an ERROR frame was already sent" if self._error_sent else "not allowed"
            raise LocalProtocolError(f"can't send {command} in state {state.name}: {why}")
        if command == "CONNECTED" and self.version is None:
            raise LocalProtocolError("can't send CONNECTED before a CONNECT frame was received")
        if frame.body and (command == "CONNECTED" or command == "RECEIPT"):
            raise LocalProtocolError(f"a {command} frame must not have a body")
        version = self.version
        if command == "CONNECTED" or version == "1.0":
            escape = False
        else:
            escape = True
            if version == "1.1":  # 1.1 has no \r escape
                for name, value in frame.headers:
                    if "\r" in name or "\r" in value:
                        raise LocalProtocolError(f"can't encode CR in header {name!r}: {value!r} in STOMP 1.1")
        data = encode_frame(command, frame.headers, frame.body, escape=escape,
                            content_length=command == "MESSAGE" or command == "ERROR")  # fmt: skip
        self.state = new_state
        self._frames_sent += 1
        if command == "ERROR":
            self._error_sent = True
            self._buf = bytearray()  # nothing more will be read
            self._pos = 0
        return data

    def error(self, message: str, detail: str = "", *, receipt_id: str | None = None) -> bytes:
        """Encode an ERROR frame (``message`` header, text/plain ``detail`` body) and enter state ERROR."""
        message = make_encodable(message, self.version)
        if receipt_id is not None:
            receipt_id = make_encodable(receipt_id, self.version)
        return self.send(make_error_frame(message, detail, receipt_id=receipt_id))
