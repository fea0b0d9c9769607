"""The registry actor: every task's state machine, the prompt_id -> task map, and what users are told.

The task's life is the pure machine in ``actors/task_machine.py`` (states, reasons, timer kinds, the one transition
table). The gateway chooses each task's prompt_id itself and persists it with the task before anything is sent to
ComfyUI, so events that arrive before the POST /prompt answer, and a submit whose answer was lost, can be matched
(reconciled) by prompt_id. Every transition is persisted before it is acted on. On a terminal state the registry
returns the scheduler permit, asks the ledger (a leaf actor) to settle or release the task's credit hold, and
publishes the outcome to the task's session once the ledger has answered.

Modules: ``_api`` (config, constants, requests), ``_table`` (the live tasks, counted by state and user and indexed
by backend, so no event's work grows with the number of live tasks), ``_base`` (state, timers heap, requests
answered as messages), ``_views`` (read views), ``_transitions`` (a transition's side effects), ``_reconcile``
(reconciliation with ComfyUI), ``_timers`` (what each timer does), ``_events`` (ComfyUI's events but progress),
``_core`` (submit, cancel, progress, reports, crash isolation), ``_actor`` (the loop).
"""

from ..task_machine import ACTIVE_STATES, INFLIGHT_STATES, TERMINAL_STATES, Event, Reason, State, TimerKind
from ._actor import handle, run
from ._api import (
    CANCEL_CHECK_DELAY,
    CROSS_CHECK_INTERVAL,
    CROSS_CHECK_SETTLE,
    HISTORY_RETRY_DELAY,
    INTERNAL_ERROR,
    MAX_ABANDONED,
    MAX_BUCKETS,
    RECHECK_DELAY,
    TIMEOUT_ERROR,
    TIMEOUT_GRACE,
    Accepted,
    Cancel,
    GetStats,
    GetTask,
    ImageLocation,
    ListResults,
    ListTasks,
    Refused,
    RegistryConfig,
    RegistryMsg,
    RegistryStats,
    Submit,
)
from ._core import Registry

_Registry = Registry  # the name tests patch

__all__ = [
    "ACTIVE_STATES",
    "CANCEL_CHECK_DELAY",
    "CROSS_CHECK_INTERVAL",
    "CROSS_CHECK_SETTLE",
    "HISTORY_RETRY_DELAY",
    "INFLIGHT_STATES",
    "INTERNAL_ERROR",
    "MAX_ABANDONED",
    "MAX_BUCKETS",
    "RECHECK_DELAY",
    "TERMINAL_STATES",
    "TIMEOUT_ERROR",
    "TIMEOUT_GRACE",
    "Accepted",
    "Cancel",
    "Event",
    "GetStats",
    "GetTask",
    "ImageLocation",
    "ListResults",
    "ListTasks",
    "Reason",
    "Refused",
    "Registry",
    "RegistryConfig",
    "RegistryMsg",
    "RegistryStats",
    "State",
    "Submit",
    "TimerKind",
    "handle",
    "run",
]
