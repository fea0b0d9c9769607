"""The task state machine (actors/task_machine.py), without trio: every allowed transition, every refused one."""

from __future__ import annotations

import itertools

import pytest

from actors.task_machine import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Reason,
    State,
    TimerKind,
    allowed,
    check_outcome,
    transition,
)

S, E = State, Event
# The whole machine, written out: what each event does in each state ("-" = refused).
EXPECTED: dict[State, dict[Event, State | str]] = {
    S.QUEUED: {E.SUBMIT: S.SUBMITTED, E.START: "-", E.SUCCEED: "-", E.FAIL: S.FAILED, E.CANCEL: S.CANCELLED},
    S.SUBMITTED: {
        E.SUBMIT: S.SUBMITTED,
        E.START: S.RUNNING,
        E.SUCCEED: S.SUCCEEDED,
        E.FAIL: S.FAILED,
        E.CANCEL: S.CANCELLED,
    },
    S.RUNNING: {
        E.SUBMIT: S.RUNNING,
        E.START: S.RUNNING,
        E.SUCCEED: S.SUCCEEDED,
        E.FAIL: S.FAILED,
        E.CANCEL: S.CANCELLED,
    },
    S.SUCCEEDED: dict.fromkeys(Event, "-"),
    S.FAILED: dict.fromkeys(Event, "-"),
    S.CANCELLED: dict.fromkeys(Event, "-"),
}
ALLOWED = [(s, e, nxt) for s, row in EXPECTED.items() for e, nxt in row.items() if nxt != "-"]
REFUSED = [(s, e) for s, row in EXPECTED.items() for e, nxt in row.items() if nxt == "-"]


def test_the_expected_table_covers_every_state_and_event() -> None:
    assert set(EXPECTED) == set(State)
    assert all(set(row) == set(Event) for row in EXPECTED.values())
    assert len(ALLOWED) + len(REFUSED) == len(State) * len(Event)
    assert {(s, e): n for s, e, n in ALLOWED} == dict(TRANSITIONS)


@pytest.mark.parametrize(("state", "event", "nxt"), ALLOWED)
def test_an_allowed_event_moves_the_task_on(state: State, event: Event, nxt: State) -> None:
    assert allowed(state, event)
    assert transition(state, event) is nxt
    assert transition(str(state), event) is nxt  # task records hold the plain string


@pytest.mark.parametrize(("state", "event"), REFUSED)
def test_a_refused_event_raises_and_changes_nothing(state: State, event: Event) -> None:
    assert not allowed(state, event)
    with pytest.raises(IllegalTransition) as info:
        transition(state, event)
    assert (info.value.state, info.value.event) == (state, event)
    assert str(state) in str(info.value) and str(event) in str(info.value)


def test_terminal_states_accept_nothing_and_active_ones_can_always_fail_or_be_cancelled() -> None:
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} == TERMINAL_STATES
    assert set(State) == ACTIVE_STATES | TERMINAL_STATES and not ACTIVE_STATES & TERMINAL_STATES
    for state in ACTIVE_STATES:
        assert transition(state, E.FAIL) is S.FAILED and transition(state, E.CANCEL) is S.CANCELLED
    assert not any(allowed(s, e) for s, e in itertools.product(TERMINAL_STATES, Event))


def test_a_task_cannot_succeed_before_it_was_submitted() -> None:
    with pytest.raises(IllegalTransition):
        check_outcome("queued", S.SUCCEEDED, None)
    assert check_outcome("submitted", S.SUCCEEDED, None) is S.SUCCEEDED
    assert check_outcome("running", S.SUCCEEDED, None) is S.SUCCEEDED


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_failed_goes_with_a_reason_and_only_failed(state: State, reason: Reason) -> None:
    assert check_outcome(state, S.FAILED, reason) is S.FAILED
    with pytest.raises(ValueError, match="reason"):
        check_outcome(state, S.FAILED, None)
    with pytest.raises(ValueError, match="reason"):
        check_outcome(state, S.CANCELLED, reason)
    assert check_outcome(state, S.CANCELLED, None) is S.CANCELLED


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_an_ended_task_cannot_end_again(state: State) -> None:
    for outcome, reason in ((S.SUCCEEDED, None), (S.FAILED, Reason.INTERNAL), (S.CANCELLED, None)):
        with pytest.raises(IllegalTransition):
            check_outcome(state, outcome, reason)


def test_an_outcome_must_be_terminal() -> None:
    with pytest.raises(ValueError, match="not a terminal state"):
        check_outcome("running", S.RUNNING, None)


def test_the_vocabulary_is_the_wire_vocabulary() -> None:
    assert [s.value for s in State] == ["queued", "submitted", "running", "succeeded", "failed", "cancelled"]
    assert [r.value for r in Reason] == [
        "validation",
        "execution_error",
        "interrupted",
        "backend_lost",
        "timeout",
        "internal",
    ]
    assert {k for k in TimerKind if k.per_backend} == {TimerKind.VERIFY, TimerKind.RECONCILE, TimerKind.BACKEND_LOST}
    assert "queued" in ACTIVE_STATES and State.QUEUED == "queued"  # records and the store use the plain strings
