"""The wire format of requests from edges to the core and of their answers (sans-IO): every request the web layer
makes crosses with its fields, every answer comes back as the same type, and anything else is refused."""

from __future__ import annotations

import pytest
import trio

from actors import ledger, registry
from actors.bridge import WireError, decode_answer, decode_request, encode_answer, encode_request
from actors.store import Account, ImageRef, InsufficientCredits, NegativeBalance


def test_requests_cross_with_their_fields_but_not_their_reply_channel() -> None:
    send, recv = trio.open_memory_channel[object](1)
    with send, recv:
        msgs = [
            ("registry", registry.Submit("alice", "c1", {"1": {"class_type": "X", "inputs": {"a": [1, 2]}}}, 2, send,
                                         cost=5, template="t", params={"seed": 7})),
            ("registry", registry.GetTask("alice", "t1", send)),
            ("registry", registry.Cancel("alice", "t1", send)),
            ("registry", registry.ListTasks("alice", "active", 10, None, send)),
            ("registry", registry.ImageLocation("alice", "t1", 0, send)),
            ("ledger", ledger.Grant("alice", -3, "admin root", send, allow_negative=True)),
            ("ledger", ledger.GetAccount("alice", send)),
        ]
        for target, msg in msgs:
            got_target, cls, fields = decode_request(encode_request(target, msg))
            assert (got_target, cls) == (target, type(msg))
            assert cls(**fields, reply=send) == msg
        with pytest.raises(WireError):
            encode_request("ledger", ledger.Freeze("alice", "t1", 3, send))  # the core's own business
        with pytest.raises(WireError):
            decode_request('{"target": "registry", "kind": "Nope", "fields": {}}')


def test_answers_come_back_as_the_same_types() -> None:
    answers = [
        registry.Accepted("t1", 3, 5), registry.Refused("too_many_tasks", "x"), None, "cancelling",
        ([{"taskId": "t1", "urls": ["u"]}], 17), ("http://b0", ImageRef("b0", "f.png", "", "output")),
        registry.RegistryStats({"queued": 1}, 1, 2), Account("alice", 10, 2),
    ]
    for value in answers:
        assert decode_answer(encode_answer(value)) == value
    for exc in (InsufficientCredits("alice", 1, 5), NegativeBalance("would go below zero")):
        back = decode_answer(encode_answer(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    with pytest.raises(WireError):
        encode_answer(object())
