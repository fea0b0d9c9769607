"""SockJS framing and session state (web/sockjs/_protocol.py), byte for byte, with no I/O: the frames
sockjs-client 1.x parses, the payloads it sends, and the session rules of sockjs-protocol 0.3.3."""

from __future__ import annotations

import json

import pytest

from web.sockjs import PayloadError, SessionState, close_frame, decode_payload, message_frame
from web.sockjs._protocol import (
    OPEN_FRAME,
    STREAMING_PRELUDE,
    Attached,
    Refused,
    State,
    frame_for,
    info,
    valid_session_part,
)


def test_frames_are_exact() -> None:
    assert OPEN_FRAME == "o"
    assert message_frame(["a"]) == 'a["a"]'
    assert message_frame(["x", "y z"]) == 'a["x","y z"]'
    assert close_frame(3000, "Go away!") == 'c[3000,"Go away!"]'
    assert close_frame(2010, "Another connection still open") == 'c[2010,"Another connection still open"]'
    assert STREAMING_PRELUDE == "h" * 2048 + "\n"


def test_stomp_frame_survives_framing() -> None:
    # a STOMP MESSAGE with its NUL terminator, a newline heart-beat and non-ASCII text
    stomp = 'MESSAGE\ndestination:/user/topic/messages\n\n{"t":"é✓"}\x00\n'
    frame = message_frame([stomp])
    assert "\x00" not in frame and "\n" not in frame  # one line: xhr transports split frames on "\n"
    assert frame.startswith("a[") and json.loads(frame[1:]) == [stomp]


def test_characters_browsers_mangle_are_escaped() -> None:
    # sockjs-protocol "escapable_by_server": U+2028/2029 (JS line terminators), U+FFFx, zero-width marks
    for ch in ("\u2028", "\u2029", "\u200c", "\ufeff", "\ufff0", "\uffff", "\x7f"):
        frame = message_frame([f"<{ch}>"])
        assert ch not in frame, repr(ch)
        assert json.loads(frame[1:]) == [f"<{ch}>"]


@pytest.mark.parametrize(
    ("transport", "wire"),
    [
        ("xhr", 'a["m"]\n'),
        ("xhr_streaming", 'a["m"]\n'),
        ("eventsource", 'data: a["m"]\r\n\r\n'),
        ("websocket", 'a["m"]'),
    ],
)
def test_frame_per_transport(transport: str, wire: str) -> None:
    assert frame_for(transport, message_frame(["m"])) == wire


def test_decode_payload() -> None:
    assert decode_payload('["a","b"]') == ["a", "b"]
    assert decode_payload("[]") == []
    assert decode_payload('"lone"') == ["lone"]
    assert decode_payload('["\\u0000CONNECT"]') == ["\x00CONNECT"]
    with pytest.raises(PayloadError, match=r"Payload expected\."):
        decode_payload("")
    for broken in ('["x', "{", "[1]", '{"a":1}', "null"):
        with pytest.raises(PayloadError, match=r"Broken JSON encoding\."):
            decode_payload(broken)


def test_session_path_parts() -> None:
    assert all(valid_session_part(s) for s in ("000", "a", "_", "abcdefgh_i-j%20"))
    assert not any(valid_session_part(s) for s in ("", "a.", ".", "a/b"))


def test_info_body() -> None:
    assert info(7) == {"websocket": True, "origins": ["*:*"], "cookie_needed": False, "entropy": 7}


def test_new_session_opens_then_delivers_in_order() -> None:
    s = SessionState(now=0.0)
    assert s.attach(0.0) == Attached(OPEN_FRAME)
    assert s.take(0.0) is None  # nothing yet
    s.detach(0.0)
    s.push("one")
    s.push("two")
    assert s.pending_bytes == 6
    assert s.attach(1.0) == Attached(None)
    assert s.take(1.0) == 'a["one","two"]'
    assert s.pending_bytes == 0 and s.take(1.0) is None


def test_one_receiver_at_a_time() -> None:
    s = SessionState(now=0.0)
    s.attach(0.0)
    assert s.attach(0.1) == Refused('c[2010,"Another connection still open"]')
    s.detach(0.2)
    assert s.attach(0.3) == Attached(None)


def test_heartbeat_when_idle() -> None:
    s = SessionState(now=0.0, heartbeat=25.0)
    s.attach(0.0)
    assert s.heartbeat_at() == 25.0
    assert s.take(24.9) is None
    assert s.take(25.0) == "h"
    assert s.heartbeat_at() == 50.0
    s.push("m")
    assert s.take(30.0) == 'a["m"]'
    assert s.heartbeat_at() == 55.0  # any write restarts the heart-beat period


def test_expiry_counts_only_time_without_a_receiver() -> None:
    s = SessionState(now=0.0, disconnect_delay=5.0)
    assert s.expires_at() == 5.0  # made by a receiving request that has not attached yet
    s.attach(1.0)
    assert s.expires_at() == float("inf") and not s.expired(100.0)
    s.detach(100.0)
    assert not s.expired(104.9)
    assert s.expired(105.0)


def test_close_delivers_pending_then_close_frame_until_expiry() -> None:
    s = SessionState(now=0.0, disconnect_delay=5.0)
    s.attach(0.0)
    s.detach(0.0)
    s.push("last")
    s.close(1000, "disconnect")
    s.push("dropped")  # queued after the close: never sent
    assert s.state is State.CLOSED
    assert s.attach(1.0) == Attached(None)
    assert s.take(1.0) == 'a["last"]'
    assert s.take(1.0) == 'c[1000,"disconnect"]'
    s.detach(1.0)
    for t in (2.0, 3.0):  # every later receiving request gets the close frame
        assert s.attach(t) == Refused('c[1000,"disconnect"]')
    assert s.expires_at() == 8.0


def test_close_with_discard_drops_what_is_pending() -> None:
    s = SessionState(now=0.0)
    s.attach(0.0)
    s.detach(0.0)
    s.push("x" * 1000)
    s.close(1008, "slow consumer", discard=True)
    assert s.pending_bytes == 0
    assert s.attach(1.0) == Refused('c[1008,"slow consumer"]')


def test_bad_timer_values_are_refused() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        SessionState(now=0.0, heartbeat=0)
