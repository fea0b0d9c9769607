"""A task's life as a pure state machine (sans-IO: no trio, no store; the registry actor drives it).

    queued --submit--> submitted --start--> running --succeed--> succeeded
       |                   |                   |
       |                   '------ succeed -----'  (a prompt can end before its execution_start is seen)
       '-- fail / cancel --'-- fail / cancel ---'--> failed(reason) / cancelled

``failed`` always carries a ``Reason``; the other states none. ``transition(state, event)`` is the one place that
says whether ``event`` may happen in ``state`` and what follows: everything not in ``TRANSITIONS`` is refused
(``IllegalTransition``); ``allowed`` asks without raising. Terminal states accept nothing. ``submit`` in
``submitted`` or ``running`` and ``start`` in ``running`` are allowed no-ops: ComfyUI's events and the HTTP answer
that both prove a dispatch arrive in either order, and reconciliation may report what is already known.

The values are ``StrEnum`` members, so they equal the strings stored in task records and sent on the wire.
This module is a leaf (the store and the registry both import it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "ACTIVE_STATES",
    "INFLIGHT_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Event",
    "IllegalTransition",
    "Reason",
    "State",
    "TimerKind",
    "allowed",
    "check_outcome",
    "transition",
]


class State(enum.StrEnum):
    QUEUED = "queued"  # accepted and charged (frozen); waiting in the gateway's fair queue
    SUBMITTED = "submitted"  # sent to a ComfyUI backend (or being sent): it holds a scheduler permit
    RUNNING = "running"  # ComfyUI started executing it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Reason(enum.StrEnum):
    """Why a task ``failed``."""

    VALIDATION = "validation"  # ComfyUI refused the prompt (HTTP 400 on POST /prompt)
    EXECUTION_ERROR = "execution_error"  # a node raised
    INTERRUPTED = "interrupted"  # interrupted on ComfyUI by someone else
    BACKEND_LOST = "backend_lost"  # its backend lost it, or stayed unreachable too long
    TIMEOUT = "timeout"  # it ran longer than the task timeout and was interrupted
    INTERNAL = "internal"  # the gateway failed while handling it (crash isolation, quarantine, ledger fault)


class Event(enum.StrEnum):
    SUBMIT = "submit"  # ComfyUI accepted it (HTTP answer, an event of its prompt, or reconciliation)
    START = "start"  # execution_start (or any sign that it executes)
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"


class TimerKind(enum.StrEnum):
    """The registry's timers, keyed by a task id (the first four) or a backend name (the last three)."""

    TIMEOUT = "timeout"  # the task ran too long: interrupt it
    TIMEOUT_GRACE = "timeout_grace"  # the interrupt was not obeyed: give up on the prompt
    CANCEL = "cancel"  # retry a cancel once the task's backend is known
    CHECK = "check"  # ask the task's backend where its prompt is
    VERIFY = "verify"  # ask a backend about reloaded queued prompts again
    RECONCILE = "reconcile"  # a queue_remaining cross-check that had to wait
    BACKEND_LOST = "backend_lost"  # the backend stayed unreachable for backend_lost_after

    @property
    def per_backend(self) -> bool:
        return self in (TimerKind.VERIFY, TimerKind.RECONCILE, TimerKind.BACKEND_LOST)


ACTIVE_STATES: frozenset[State] = frozenset({State.QUEUED, State.SUBMITTED, State.RUNNING})
INFLIGHT_STATES: frozenset[State] = frozenset({State.SUBMITTED, State.RUNNING})  # inside ComfyUI, holding a permit
TERMINAL_STATES: frozenset[State] = frozenset(State) - ACTIVE_STATES

# The one transition table: (state, event) -> next state. Anything absent is refused.
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.QUEUED, Event.SUBMIT): State.SUBMITTED,
    (State.QUEUED, Event.FAIL): State.FAILED,
    (State.QUEUED, Event.CANCEL): State.CANCELLED,
    (State.SUBMITTED, Event.SUBMIT): State.SUBMITTED,
    (State.SUBMITTED, Event.START): State.RUNNING,
    (State.SUBMITTED, Event.SUCCEED): State.SUCCEEDED,
    (State.SUBMITTED, Event.FAIL): State.FAILED,
    (State.SUBMITTED, Event.CANCEL): State.CANCELLED,
    (State.RUNNING, Event.SUBMIT): State.RUNNING,
    (State.RUNNING, Event.START): State.RUNNING,
    (State.RUNNING, Event.SUCCEED): State.SUCCEEDED,
    (State.RUNNING, Event.FAIL): State.FAILED,
    (State.RUNNING, Event.CANCEL): State.CANCELLED,
}

_OUTCOME_EVENT = {State.SUCCEEDED: Event.SUCCEED, State.FAILED: Event.FAIL, State.CANCELLED: Event.CANCEL}


class IllegalTransition(ValueError):
    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}")
        self.state = state
        self.event = event


def allowed(state: str, event: Event) -> bool:
    return (State(state), event) in TRANSITIONS


def transition(state: str, event: Event) -> State:
    """The state after ``event`` in ``state``; raises ``IllegalTransition`` when the table does not allow it."""
    nxt = TRANSITIONS.get((State(state), event))
    if nxt is None:
        raise IllegalTransition(state, event)
    return nxt


def check_outcome(state: str, outcome: State, reason: Reason | None) -> State:
    """The terminal ``outcome`` a task in ``state`` ends with, checked: reached by the table from ``state``, and a
    reason exactly when it failed. Raises ``IllegalTransition`` (or ``ValueError`` for a wrong reason)."""
    event = _OUTCOME_EVENT.get(outcome)
    if event is None:
        raise ValueError(f"{outcome!r} is not a terminal state")
    nxt = transition(state, event)
    if (reason is None) != (nxt is not State.FAILED):
        raise ValueError(f"state {nxt!r} with reason {reason!r}: a reason goes with 'failed' and only with it")
    return nxt
