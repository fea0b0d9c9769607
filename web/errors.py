"""Domain error codes and what the web layer answers for them: one table.

An actor refuses in the domain's words (``actors.wire.DomainError``: a code and a detail, e.g. the registry's
``Refused``); it never chooses an HTTP status. Over HTTP the code becomes ``HTTP_STATUS[code]`` with the body
``{"error": code, "detail": text}``; over STOMP a refused ``SEND /app/tasks`` becomes a ``rejected`` message with the
same code and detail (``actors.wire.Rejected``), so both doors say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping

from actors.wire import DomainError, Rejected

__all__ = ["HTTP_STATUS", "http_status", "rejected"]

HTTP_STATUS: Mapping[str, int] = {
    # the body or the task it describes
    "bad_json": 400,
    "bad_workflow": 400,
    "bad_request": 400,
    "bad_params": 400,
    "bad_amount": 400,
    "unknown_template": 400,
    "node_not_allowed": 400,
    # who asks
    "unauthorized": 401,
    "raw_workflow_forbidden": 403,
    "forbidden": 403,
    "not_found": 404,
    # the user's account and limits
    "insufficient_credits": 402,
    "ledger_conflict": 409,
    "finished": 409,
    "too_large": 413,
    "too_many_tasks": 429,
    "too_many_submits": 429,
    # the gateway itself
    "internal": 500,
    "unavailable": 503,
    "busy": 503,
}


def http_status(code: str) -> int:
    """The HTTP status for a domain error code; an unknown code is the gateway's fault (500)."""
    return HTTP_STATUS.get(code, 500)


def rejected(error: DomainError, task_id: str | None = None) -> Rejected:
    """The STOMP answer to a refused SEND: a ``rejected`` message with the error's code and detail."""
    return Rejected(error.code, error.detail, task_id)
