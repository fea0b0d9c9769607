"""``encode_body``: every message to a user is encoded there once, with orjson, falling back to ``json``.

What a frontend relies on: the JSON it receives is the JSON the gateway meant, for any body; and what ``json``
refused before (a lone surrogate) is still refused, so the callers' handling of it does not change."""

from __future__ import annotations

import json
import math
import tracemalloc
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors._outgoing import encode_body


def old(body: Any) -> bytes:
    """What encode_body gave before orjson."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


_text = st.text(st.characters(blacklist_categories=("Cs",)))  # any Unicode but lone surrogates
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | _text
_floats = st.floats(allow_nan=False, allow_infinity=False)
_json = st.recursive(
    _scalars | _floats, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4)
)
_json_no_floats = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4)
)


@given(st.dictionaries(_text, _json, max_size=6))
def test_any_body_arrives_as_the_same_json(body: dict[str, Any]) -> None:
    encoded = encode_body(body)
    assert json.loads(encoded) == json.loads(old(body)) == body


@given(st.dictionaries(_text, _json_no_floats, max_size=6))
def test_without_floats_the_bytes_are_the_same_as_before(body: dict[str, Any]) -> None:
    assert encode_body(body) == old(body)


def test_the_gateway_s_own_bodies_are_byte_for_byte_as_before() -> None:
    bodies = [
        {"type": "progress", "taskId": "t-1", "promptId": "p-1", "value": 137, "max": 500, "node": "3"},
        {"type": "balance", "credits": 97, "frozen": 3},
        {"type": "imageResult", "taskId": "t", "urls": ["/api/images/t/0?exp=1&sig=a%2Fb"]},
        {"type": "failed", "taskId": "t", "error": {"message": 'Ünïcödé \n\t"quoted" \\ </script>', "code": None}},
        {"type": "status", "backends": [{"name": "gpu-1", "up": True, "queue": 0}], "ratio": 0.5},
    ]
    for body in bodies:
        assert encode_body(body) == old(body)


def outcome(encode: Any, body: Any) -> Any:
    try:
        return encode(body)
    except Exception as exc:  # the type of what was raised, compared below
        return type(exc)


def test_what_orjson_refuses_goes_through_json_as_before() -> None:
    for body in (
        {1: "an int key", None: "a null key"},  # keys json writes as strings
        {"big": 2**70, "small": -(2**70)},  # past 64 bits: json writes them
        MappingProxyType({"a": 1}),  # not a dict: json refuses it (TypeError), and still does
        {"nested": MappingProxyType({"a": 1})},
        {"text": "\ud800"},  # a lone surrogate: refused (UnicodeEncodeError), never sent half-encoded
        {"object": object()},
    ):
        assert outcome(encode_body, body) == outcome(old, body), body
    with pytest.raises(UnicodeEncodeError):
        encode_body({"text": "\ud800"})


def test_what_json_wrote_as_invalid_json_is_now_null() -> None:
    assert json.loads(encode_body({"x": math.nan, "y": math.inf})) == {"x": None, "y": None}


def test_an_encoded_body_holds_no_more_memory_than_its_bytes() -> None:
    """Replay buffers keep encoded bodies (up to replay_max per session): each must cost about its length, not the
    encoder's 4 KB write buffer."""
    body = {"type": "progress", "taskId": "t" * 36, "promptId": "p" * 36, "value": 137, "max": 500, "node": "3"}
    size = len(old(body))
    tracemalloc.start()
    try:
        kept = [encode_body(body) for _ in range(1000)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000 and held / 1000 < size + 100  # the bytes object's header is ~33 bytes
