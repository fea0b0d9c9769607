"""STOMP on the wire: header (un)escaping, the encoder, and the two header values a session negotiates (version,
heart-beat). Pure functions, no state. The ``Frame`` event and the sentinels are in ``_events``.

Wire format (STOMP 1.2)::

    COMMAND EOL  *(name ":" value EOL)  EOL  body NUL        EOL = [CR] LF

Header escaping (``\\r \\n \\c \\\\``) exists since 1.1 (1.1 lacks ``\\r``); 1.0 has none, and CONNECT,
STOMP and CONNECTED are never escaped. ``encode_frame`` is the writer's fast path: it knows nothing about
connection state, it only refuses what cannot be put on the wire unambiguously.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import ALL_COMMANDS, SUPPORTED_VERSIONS, Frame, make_error_frame

__all__ = [
    "decode_headers",
    "encodable",
    "encode_frame",
    "make_encodable",
    "negotiate_heartbeat",
    "negotiate_version",
    "version_error_frame",
]

# ---- escaping -----------------------------------------------------------------------------------------

UNESCAPES_12: Final = {"\\": "\\", "r": "\r", "n": "\n", "c": ":"}
UNESCAPES_11: Final = {"\\": "\\", "n": "\n", "c": ":"}


def escape(text: str) -> str:
    """Escape a header name or value per STOMP 1.2 (the backslash first, so it is not doubled twice)."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\r" in text:
        text = text.replace("\r", "\\r")
    if "\n" in text:
        text = text.replace("\n", "\\n")
    if ":" in text:
        text = text.replace(":", "\\c")
    return text


ESCAPE_SEQUENCE: Final = re.compile(r"\\(.?)", re.DOTALL)


def decode_headers(
    command: str, text: str, table: dict[str, str] | None
) -> tuple[tuple[tuple[str, str], ...], tuple[str, str] | None]:
    """Split decoded header lines into (name, value) pairs, unescaping with ``table`` unless it is None.

    Returns the pairs and the first problem found as ``(message, detail)``, or None. Lines end in LF or
    CR LF; a CR anywhere else is refused (spec grammar), which also keeps every received value encodable
    again in the same version (1.0 and 1.1 cannot carry CR).
    """
    if not text:
        return (), None
    problem: tuple[str, str] | None = None
    lines = text.split("\n")
    lines.pop()  # the text ends with the last header's LF
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        for line in lines:
            if "\r" in line:
                problem = ("malformed header", f"{command} header line {line[:80]!r} contains a CR")
                break
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name:
            problem = problem or ("malformed header", f"{command} header line {line[:80]!r} has no name:value")
            continue
        if table is not None and "\\" in line:
            try:
                name = unescape(name, table)
                value = unescape(value, table)
            except KeyError as exc:
                problem = problem or ("invalid header escape", f"undefined escape sequence {exc.args[0]!r}")
        headers.append((name, value))
    return tuple(headers), problem


def unescape(text: str, table: dict[str, str]) -> str:
    """Undo header escaping; KeyError(sequence) for an undefined escape (a fatal error per the spec)."""

    def replace(match: re.Match[str]) -> str:
        try:
            return table[match.group(1)]
        except KeyError:
            raise KeyError(match.group(0)) from None

    return ESCAPE_SEQUENCE.sub(replace, text)


def encodable(value: str, version: str | None) -> bool:
    """Whether a header value can be written in ``version`` (None: not negotiated yet, 1.2 rules)."""
    if version == "1.0":
        return "\r" not in value and "\n" not in value
    if version == "1.1":
        return "\r" not in value
    return True


def make_encodable(value: str, version: str | None) -> str:
    """``value`` with CR/LF turned into spaces where ``version`` cannot carry them (for ERROR messages)."""
    if not encodable(value, version):
        value = value.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return value


def _needs_escape(text: str) -> bool:
    return "\\" in text or ":" in text or "\n" in text or "\r" in text


# "MESSAGE" -> "MESSAGE\n": the command line, ready to concatenate.
_COMMAND_LINES: Final = {command: command + "\n" for command in ALL_COMMANDS}


def encode_frame(
    command: str,
    headers: Iterable[tuple[str, str]],
    body: bytes = b"",
    *,
    escape: bool = True,
    content_length: bool = True,
) -> bytes:
    """Encode one frame to bytes, with no state checks (the writer's path for every MESSAGE).

    ``escape=True`` escapes header names and values per STOMP 1.2; ``escape=False`` writes them raw (1.0,
    CONNECTED) and refuses CR/LF anywhere and ``:`` in names. ``content_length=True`` appends
    ``content-length`` (in bytes) unless the headers already carry one; without it the body must not contain
    NUL. A given ``content-length`` must match the body. Raises LocalProtocolError for what cannot be encoded.
    """
    try:
        parts = [_COMMAND_LINES[command]]
    except (KeyError, TypeError):
        raise LocalProtocolError(f"cannot encode unknown command {command!r}") from None
    given_length: str | None = None
    append = parts.append
    for name, value in headers:
        if not name:
            raise LocalProtocolError(f"cannot encode an empty header name (value {value!r}) in {command}")
        if name == "content-length" and given_length is None:
            given_length = value
        if escape:
            if _needs_escape(name):
                name = _escape(name)
            if _needs_escape(value):
                value = _escape(value)
        elif "\n" in name or "\r" in name or ":" in name or "\n" in value or "\r" in value:
            raise LocalProtocolError(f"cannot encode header {name!r}: {value!r} in {command} without escaping")
        append(name)
        append(":")
        append(value)
        append("\n")
    body_length = len(body)
    if given_length is not None:
        if given_length != str(body_length):
            raise LocalProtocolError(
                f"content-length {given_length!r} does not match the {body_length}-byte body of {command}"
            )
    elif content_length:
        append(f"content-length:{body_length}\n")
    elif b"\0" in body:
        raise LocalProtocolError(f"{command} body contains NUL: it needs a content-length header")
    append("\n")
    try:
        head = "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"cannot encode {command} headers as UTF-8: {exc.reason}") from None
    return b"".join((head, body, b"\0"))


_escape = escape  # encode_frame's ``escape`` parameter shadows the function inside it


# ---- header values the session negotiates ------------------------------------------------------------


def version_error_frame(accept_version: str) -> Frame:
    """The ERROR frame for a CONNECT with no common version: the spec asks for a ``version`` header."""
    ours = list(reversed(SUPPORTED_VERSIONS))
    detail = f"Supported protocol versions are {' '.join(ours)}; the client accepts {accept_version[:80]!r}"
    return Frame("ERROR", (("message", "unsupported STOMP version"), ("version", ",".join(ours)),
                           ("content-type", "text/plain")), detail.encode())  # fmt: skip


def negotiate_version(accept_version: str | None) -> str | None:
    """The best version both sides speak; a CONNECT without ``accept-version`` is STOMP 1.0."""
    if accept_version is None:
        return "1.0"
    offered = {item.strip() for item in accept_version.split(",")}
    for version in SUPPORTED_VERSIONS:
        if version in offered:
            return version
    return None


def negotiate_heartbeat(client_header: str | None, server: tuple[int, int]) -> tuple[int, int]:
    """Heart-beat periods in ms: ``(server_sends_every, server_expects_every)``; 0 means never.

    ``client_header`` is CONNECT's ``heart-beat: cx,cy`` (cx: what the client can send, cy: what it wants);
    ``server`` is ``(sx, sy)`` likewise for us. We send every ``max(sx, cy)`` unless either is 0, and expect
    the client every ``max(cx, sy)`` unless either is 0 (spec 1.2 "Heart-beating").
    """
    if (len(server) != 2 or not all(type(ms) is int and ms >= 0 for ms in server)):  # fmt: skip
        raise ValueError(f"server heart-beat must be two non-negative ints (ms), not {server!r}")
    sx, sy = server
    if not client_header:
        cx = cy = 0
    else:
        parts = [part.strip() for part in client_header.split(",")]
        if len(parts) != 2 or not all(part.isascii() and part.isdigit() and len(part) <= 12 for part in parts):
            detail = f"heart-beat must be two comma-separated non-negative integers, not {client_header[:80]!r}"
            raise RemoteProtocolError("invalid heart-beat header",
                                      error_frame=make_error_frame("invalid heart-beat header", detail))  # fmt: skip
        cx, cy = int(parts[0]), int(parts[1])
    send = 0 if sx == 0 or cy == 0 else max(sx, cy)
    expect = 0 if cx == 0 or sy == 0 else max(cx, sy)
    return send, expect
