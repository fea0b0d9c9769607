"""How actor requests and their answers cross Redis: JSON with a little typing, sans-IO.

A request is an actor message minus its ``reply`` channel: ``(target, kind, fields)``, e.g. ``("registry",
"Submit", {...})``. An answer is any value the actors reply with: JSON values, tuples, the frozen dataclasses
below and ledger errors, each tagged so that it comes back as the same type.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import ledger, registry
from ..store import (
    Account,
    HoldConflict,
    ImageRef,
    InsufficientCredits,
    InvalidAmount,
    LedgerError,
    LedgerFault,
    NegativeBalance,
    UnknownHold,
)

# what an edge may ask the core for (the web layer's requests); anything else is refused
REQUESTS: dict[tuple[str, str], type] = {
    ("registry", "Submit"): registry.Submit,
    ("registry", "GetTask"): registry.GetTask,
    ("registry", "Cancel"): registry.Cancel,
    ("registry", "ListResults"): registry.ListResults,
    ("registry", "ListTasks"): registry.ListTasks,
    ("registry", "ImageLocation"): registry.ImageLocation,
    ("registry", "GetStats"): registry.GetStats,
    ("ledger", "GetAccount"): ledger.GetAccount,
    ("ledger", "Grant"): ledger.Grant,
}
_VALUES: dict[str, type] = {c.__name__: c for c in (registry.Accepted, registry.Refused, registry.RegistryStats,
                                                       ImageRef, Account)}
_ERRORS: dict[str, type[LedgerError]] = {c.__name__: c for c in (
    LedgerError, InsufficientCredits, HoldConflict, UnknownHold, InvalidAmount, NegativeBalance, LedgerFault)}


class WireError(ValueError):
    """A request or answer that cannot be encoded or decoded (a programming error, or a foreign writer)."""


def encode_request(target: str, msg: object) -> str:
    kind = type(msg).__name__
    if REQUESTS.get((target, kind)) is not type(msg):
        raise WireError(f"{target}.{kind} cannot be asked remotely")
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "reply"}  # type: ignore[arg-type]
    return json.dumps({"target": target, "kind": kind, "fields": _enc(fields)}, separators=(",", ":"))


def decode_request(text: str) -> tuple[str, type, dict[str, Any]]:
    """-> (target, message class, fields without ``reply``)."""
    try:
        data = json.loads(text)
        cls = REQUESTS[(data["target"], data["kind"])]
        return data["target"], cls, _dec(data["fields"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad request {text[:200]!r}: {exc!r}") from None


def encode_answer(value: object) -> str:
    return json.dumps(_enc(value), separators=(",", ":"))


def decode_answer(text: str) -> Any:
    try:
        return _dec(json.loads(text))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad answer {text[:200]!r}: {exc!r}") from None


def _enc(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"$t": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {"$d": {str(k): _enc(x) for k, x in v.items()}}
    if isinstance(v, LedgerError) and type(v).__name__ in _ERRORS:
        return {"$e": type(v).__name__, "msg": str(v)}
    if dataclasses.is_dataclass(v) and type(v).__name__ in _VALUES:
        return {"$c": type(v).__name__, "f": {f.name: _enc(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if hasattr(v, "items"):  # a read-only mapping (a workflow, a task view)
        return {"$d": {str(k): _enc(x) for k, x in v.items()}}
    raise WireError(f"cannot send a {type(v).__name__} across processes")


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "$t" in v:
        return tuple(_dec(x) for x in v["$t"])
    if "$d" in v:
        return {k: _dec(x) for k, x in v["$d"].items()}
    if "$e" in v:
        exc = _ERRORS[v["$e"]].__new__(_ERRORS[v["$e"]])
        Exception.__init__(exc, v["msg"])
        return exc
    if "$c" in v:
        return _VALUES[v["$c"]](**{k: _dec(x) for k, x in v["f"].items()})
    raise WireError(f"untagged object {v!r}")
