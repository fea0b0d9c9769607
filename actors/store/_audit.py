"""The ledger's consistency checks, as plain functions over records, shared by every store.

``audit_ledger`` rebuilds every balance from the journal; ``audit_tasks`` compares tasks with their holds.
Each returns one readable line per problem, so [] means consistent. A store loads its journal, accounts, holds
and tasks (one consistent read) and hands them here, so SQLite and Redis are checked by the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ._types import Account, Hold, JournalEntry, TaskRecord


def audit_ledger(journal: Iterable[JournalEntry], accounts: Iterable[Account], holds: Sequence[Hold]) -> list[str]:
    """Rebuild every balance from the journal and check the ledger: returns one line per problem (none: []).

    Checks: each journal line's after-values follow from the previous line of its user; the accounts table
    equals the rebuilt balances; ``frozen`` equals the user's pending holds; every hold has exactly one
    freeze line with its amount and user, and exactly the resolution lines its state says (pending: none;
    settled: one settle; released: one release), so every hold was resolved at most once; no line names a
    task without a hold.
    """
    problems: list[str] = []
    rebuilt: dict[str, list[int]] = {}
    per_task: dict[str, list[tuple[str, str, int]]] = {}
    for r in journal:
        bal = rebuilt.setdefault(r.user_id, [0, 0])
        kind, amount = r.kind, r.amount
        if kind in ("open", "grant"):
            bal[0] += amount
        elif kind == "freeze":
            bal[1] += amount
        elif kind == "settle":
            bal[0] -= amount
            bal[1] -= amount
        elif kind == "release":
            bal[1] -= amount
        if [r.balance_after, r.frozen_after] != bal:
            problems.append(f"journal {r.id} ({kind} {amount} for {r.user_id}): says "
                            f"{r.balance_after}/{r.frozen_after}, rebuilt {bal[0]}/{bal[1]}")
        if bal[1] < 0:
            problems.append(f"journal {r.id}: {r.user_id} frozen went negative ({bal[1]})")
        if r.task_id is not None:
            per_task.setdefault(r.task_id, []).append((kind, r.user_id, amount))
    pending: dict[str, int] = {}
    for h in holds:
        if h.state == "pending":
            pending[h.user_id] = pending.get(h.user_id, 0) + h.amount
    seen: set[str] = set()
    for a in accounts:
        seen.add(a.user_id)
        want = rebuilt.get(a.user_id, [0, 0])
        if [a.balance, a.frozen] != want:
            problems.append(f"{a.user_id}: stored {a.balance}/{a.frozen}, journal {want[0]}/{want[1]}")
        if a.frozen != pending.get(a.user_id, 0):
            problems.append(f"{a.user_id}: frozen {a.frozen} but pending holds {pending.get(a.user_id, 0)}")
    for user in rebuilt.keys() - seen:
        problems.append(f"{user}: journal lines but no account")
    expected = {"pending": [], "settled": ["settle"], "released": ["release"]}
    for h in holds:
        lines = per_task.pop(h.task_id, [])
        freezes = [ln for ln in lines if ln[0] == "freeze"]
        if freezes != [("freeze", h.user_id, h.amount)]:
            problems.append(f"hold {h.task_id}: freeze lines {freezes}, want one of {h.amount} for {h.user_id}")
        resolutions = [ln for ln in lines if ln[0] != "freeze"]
        if [k for k, _, _ in resolutions] != expected[h.state] or any(
            u != h.user_id or a != h.amount for _, u, a in resolutions
        ):
            problems.append(f"hold {h.task_id} is {h.state} but its resolution lines are {resolutions}")
    for task_id, lines in per_task.items():
        problems.append(f"journal lines {lines} name task {task_id!r}, which has no hold")
    return problems


def audit_tasks(tasks: Iterable[TaskRecord], holds: Iterable[Hold]) -> list[str]:
    """Tasks against holds, for a quiescent store (gateway stopped or idle): a succeeded task's hold is settled,
    a failed or cancelled task's released, an active task's pending; every hold belongs to a task of the same
    user and cost. (While tasks are finishing, a task may be terminal a moment before its hold is resolved.)"""
    problems: list[str] = []
    want = {"succeeded": "settled", "failed": "released", "cancelled": "released"}
    by_task = {h.task_id: h for h in holds}
    for t in tasks:
        h = by_task.pop(t.task_id, None)
        if h is None:
            problems.append(f"task {t.task_id} ({t.state}) has no hold")
            continue
        if (h.user_id, h.amount) != (t.user_id, t.cost):
            problems.append(f"task {t.task_id}: hold {h.amount} for {h.user_id}, task costs {t.cost} for {t.user_id}")
        expected = want.get(t.state, "pending")
        if h.state != expected:
            problems.append(f"task {t.task_id} is {t.state} but its hold is {h.state}")
    for h in by_task.values():
        if h.state == "pending":
            problems.append(f"hold {h.task_id} is pending but no task was saved for it")
    return problems
