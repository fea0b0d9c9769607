"""The wire contract (actors/wire.py): one class per message type in docs/CONTRACT.md, each building the shape the
document gives; message shapes are written nowhere else; every domain error code has its HTTP status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors import wire
from web.errors import HTTP_STATUS, http_status, rejected

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = (ROOT / "docs" / "CONTRACT.md").read_text()


def contract_messages() -> dict[str, set[str]]:
    """type -> its fields (without "?"), from the "Message bodies" table and the broadcast line under it."""
    section = CONTRACT.split("### Message bodies", 1)[1]
    paragraphs = section.split("\n\n")
    table = next(p for p in paragraphs if p.startswith("| type |"))
    rest = paragraphs[paragraphs.index(table) + 1]
    out: dict[str, set[str]] = {}
    for row in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", table, re.M):
        described = re.sub(r"\([^)]*\)", "", row[2])  # "(`validation`, …)" lists values, not fields
        out[row[1]] = set(re.findall(r"`(\w+)`", described))
    for name, body in re.findall(r'`\{"type": "(\w+)", ([^`]*)\}`', rest):
        out[name] = set(re.findall(r'"(\w+)"', re.sub(r"\{[^}]*\}", "", body)))
    return out


def test_every_documented_message_has_exactly_one_class_and_vice_versa() -> None:
    documented = contract_messages()
    assert len(documented) >= 12, documented
    classes = [
        c for c in vars(wire).values() if isinstance(c, type) and issubclass(c, wire.WireMessage) and "type" in vars(c)
    ]
    names = [c.type for c in classes]
    assert sorted(names) == sorted(set(names)), "two classes for one message type"
    assert set(names) == set(documented) == set(wire.MESSAGE_TYPES)


EXAMPLES: list[wire.WireMessage] = [
    wire.Queued("t", 2, 3, "txt2img", {"seed": 1}),
    wire.Started("t", "p"),
    wire.ProgressMsg("t", "p", 1, 20, "3"),
    wire.Preview("t", "p", "image/jpeg", "AAAA"),
    wire.ImageResult("t", "p", ("u0",)),
    wire.Completed("t", "p", ("u0", "u1")),
    wire.ExecutionErrorMsg("t", "p", "KSampler 3: boom", "execution_error", True, "3", "KSampler"),
    wire.Cancelled("t", True),
    wire.Balance(10, 2, 8),
    wire.Rejected("too_many_tasks", "32 tasks already queued", "t"),
    wire.Resync(),
    wire.Status(1, 2, 1, 2),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.type)
def test_each_message_has_the_documented_fields(msg: wire.WireMessage) -> None:
    fields = contract_messages()[msg.type]
    body = msg.to_wire()
    assert body["type"] == msg.type
    assert set(body) - {"type"} == fields, (msg.type, body)


def test_optional_fields_are_left_out_when_absent() -> None:
    assert wire.Queued("t", 1, 1).to_wire() == {"type": "queued", "taskId": "t", "position": 1, "cost": 1}
    assert wire.ExecutionErrorMsg("t", "p", "lost", "backend_lost", True).to_wire() == {
        "type": "execution_error",
        "taskId": "t",
        "prompt_id": "p",
        "error": "lost",
        "reason": "backend_lost",
        "refunded": True,
    }
    assert wire.Rejected("bad_json", "no").to_wire() == {"type": "rejected", "error": "bad_json", "detail": "no"}


def test_message_shapes_are_written_only_in_the_wire_module() -> None:
    literal = re.compile(r"""["']type["']\s*:\s*["']({})["']""".format("|".join(wire.MESSAGE_TYPES)))
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for top in ("actors", "web")
        for path in sorted((ROOT / top).rglob("*.py"))
        if path != ROOT / "actors" / "wire.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert offenders == []


def test_domain_error_codes_map_to_statuses_in_one_table() -> None:
    assert http_status("insufficient_credits") == 402
    assert http_status("too_many_submits") == 429 and http_status("raw_workflow_forbidden") == 403
    assert http_status("no_such_code") == 500  # an unknown code is the gateway's fault, never a 2xx
    assert all(400 <= s < 600 for s in HTTP_STATUS.values())
    refused = wire.DomainError("insufficient_credits", "need 3, have 1")
    assert rejected(refused).to_wire() == {
        "type": "rejected",
        "error": "insufficient_credits",
        "detail": "need 3, have 1",
    }
