"""Poison input at the door (issue 10): one validator for HTTP and STOMP; every refusal names the problem, nothing
is frozen, the process stays up. Ledger bounds for admin grants."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import GatewayUnderTest, workflow
from hypothesis import given, settings
from hypothesis import strategies as st
from stomp_client import stomp_connect
from test_e2e_skeleton import TERMINAL, subscribed

from actors.validate import WorkflowLimits, _fine, _first_problem, check_json, decode_json, validate_workflow

LONE = '{"3": {"class_type": "KSampler", "inputs": {"text": "a \\ud800 b"}}}'


# ---- the pure validator --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (LONE, "lone surrogate U+D800"),
        ('{"\\udc00x": {"class_type": "A", "inputs": {}}}', "lone surrogate U+DC00"),  # in a node id (a key)
        ('{"1": {"class_type": "A", "inputs": {"\\ud83d": 1}}}', "lone surrogate U+D83D"),  # in an input key
        ('{"1": {"class_type": "A", "inputs": {"x": NaN}}}', "not acceptable JSON"),
        ('{"1": {"class_type": "A", "inputs": {"x": 1e999}}}', "not finite"),
        ("[" * 5000 + "]" * 5000, "nested deeper than 32"),  # RecursionError inside json never escapes
        ("[" * 40 + "]" * 40, "nested deeper than 32"),
        ('{"a": ' + "1" * 5000 + "}", "not acceptable JSON"),  # int with too many digits: a ValueError, caught
        ('{"a": 1', "not JSON"),
    ],
)
def test_decode_json_names_the_problem(text: str, needle: str) -> None:
    value, problem = decode_json(text.encode(), WorkflowLimits())
    assert value is None and problem is not None and needle in problem.detail, problem


def test_decode_json_refuses_invalid_utf8_and_accepts_real_unicode() -> None:
    _, problem = decode_json(b'{"a": "\xff\xfe"}', WorkflowLimits())
    assert problem is not None and "not valid UTF-8 (byte 7" in problem.detail
    value, problem = decode_json('{"emoji": "\\ud83d\\ude00 ✓"}'.encode(), WorkflowLimits())
    assert problem is None and value == {"emoji": "😀 ✓"}


_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=6) | st.sampled_from(["\ud800", "a\udfff"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=30,
)
_LIMITS = st.builds(
    WorkflowLimits,
    max_depth=st.integers(1, 5),
    max_items=st.integers(1, 40),
    max_key_length=st.integers(1, 6),
    max_string_length=st.integers(1, 6),
)


@settings(max_examples=600, deadline=None)
@given(_JSON, _LIMITS)
def test_the_cheap_walk_says_fine_exactly_when_the_naming_walk_finds_nothing(
    value: Any, limits: WorkflowLimits
) -> None:
    """check_json's cheap first walk (no paths) agrees with the walk that names the problem, for any JSON value (lone
    surrogates, NaN and infinities, deep nesting, many values) under any limits; so check_json answers as before."""
    first = _first_problem(value, limits, "body")
    assert _fine(value, limits) == (first is None)
    assert check_json(value, limits) == first


def test_validate_workflow_limits_each_named() -> None:
    limits = WorkflowLimits(max_nodes=3, max_key_length=12, max_string_length=10, max_items=50)
    node = {"class_type": "A", "inputs": {}}
    assert validate_workflow(workflow("txt2img"), WorkflowLimits()) is None
    assert "4 nodes (limit 3)" in validate_workflow({str(i): node for i in range(4)}, limits).detail
    assert "longer than 12" in validate_workflow({"1234567890123": node}, limits).detail
    long_text = {"1": {"class_type": "A", "inputs": {"t": "x" * 11}}}
    assert "longer than 10 characters" in validate_workflow(long_text, limits).detail
    many = {"1": {"class_type": "A", "inputs": {"l": list(range(60))}}}
    assert "more than 50 JSON values" in validate_workflow(many, limits).detail
    assert "no class_type" in validate_workflow({"1": {"inputs": {}}}, limits).detail
    big = {str(i): node for i in range(10_000)}  # the 10,000-node workflow is refused at once (default 1,000)
    assert validate_workflow(big, WorkflowLimits()).detail == "workflow has 10000 nodes (limit 1000)"


# ---- over HTTP and STOMP ---------------------------------------------------------------------------------------


async def post_raw(g: GatewayUnderTest, user: str, body: bytes, path: str = "/api/tasks") -> Any:
    return await g.http.post(
        f"{g.url}{path}", content=body, headers=g.auth(user) | {"content-type": "application/json"}
    )


async def test_poison_bodies_over_http_get_400_naming_the_problem(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    cases = [
        (('{"clientId": "c1", "workflow": ' + LONE + "}").encode(), "lone surrogate"),
        (b'{"clientId": "c1", "workflow": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nested deeper"),
        (b'{"clientId": "c1", "workflow": {"1": "\xc3\x28"}}', "not valid UTF-8"),
        (b'{"clientId": "c1", "workflow": {"1": {"class_type": "A", "inputs": {"x": Infinity}}}}', "JSON"),
    ]
    for body, needle in cases:
        r = await post_raw(g, "alice", body)
        assert r.status_code == 400, (body[:60], r.status_code, r.text)
        assert r.json()["error"] in ("bad_json", "bad_workflow") and needle in r.json()["detail"], r.json()
    assert (await g.balance("alice"))["frozen"] == 0  # nothing frozen
    done = await g.submit("alice", workflow("txt2img"))  # and the gateway still serves
    assert done["state"] == "queued"


async def test_poison_workflow_over_stomp_is_rejected_and_the_connection_lives(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    async with stomp_connect(g.ws_url, token=g.token("bob"), client_id="c1") as c:
        await subscribed(c)
        bodies = [
            ('{"workflow": ' + LONE + "}").encode(),
            b'{"workflow": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
            b'{"workflow": "\xff"}',
        ]
        for body in bodies:
            await c.send_frame("SEND", {"destination": "/app/tasks"}, body)
            _, msg = await c.next_message()
            assert msg["type"] == "rejected" and msg["error"] in ("bad_json", "bad_workflow"), msg
        await c.send_frame("SEND", {"destination": "/app/tasks"}, json.dumps({"workflow": workflow("txt2img")}))
        msgs = await c.collect_until(lambda m: m.get("type") in TERMINAL)
        assert msgs[-1][1]["type"] == "completed"
        await c.leave()
    assert (await g.balance("bob"))["balance"] == g.initial_credits - g.price


# ---- ledger bounds -----------------------------------------------------------------------------------------------


async def test_admin_grants_are_bounded_and_negative_needs_asking(sim: Any, start_gateway: Any) -> None:
    g: GatewayUnderTest = await start_gateway([sim.url])
    admin = {"Authorization": f"Bearer {g.token('root', admin=True)}"}
    url = f"{g.url}/api/admin/credits"
    for amount in (2**63, -(2**63), 2**53 + 1, 10**30):
        r = await g.http.post(url, json={"userId": "carol", "amount": amount}, headers=admin)
        assert r.status_code == 400 and r.json()["error"] == "bad_amount" and "2^53" in r.json()["detail"], r.text
    r = await g.http.post(url, json={"userId": "carol", "amount": 2**53 - 100}, headers=admin)
    assert r.status_code == 200, r.text
    r = await g.http.post(url, json={"userId": "carol", "amount": 200}, headers=admin)  # would pass 2^53
    assert r.status_code == 400 and r.json()["error"] == "bad_amount", r.text
    r = await g.http.post(url, json={"userId": "dave", "amount": -101}, headers=admin)
    assert r.status_code == 400 and "allowNegative" in r.json()["detail"], r.text
    assert (await g.balance("dave"))["balance"] == g.initial_credits
    r = await g.http.post(url, json={"userId": "dave", "amount": -101, "allowNegative": True}, headers=admin)
    assert r.status_code == 200 and r.json()["available"] == -1, r.text
    assert (await g.http.get(f"{g.url}/healthz")).status_code == 200
