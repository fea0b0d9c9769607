"""The ledger's consistency checks, as plain functions over a SQLite connection (run in the store's thread).

``audit_ledger`` rebuilds every balance from the journal; ``audit_tasks`` compares tasks with their holds.
Each returns one readable line per problem, so [] means consistent.
"""

from __future__ import annotations

import sqlite3


def audit_ledger(db: sqlite3.Connection) -> list[str]:
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
    for r in db.execute("SELECT * FROM journal ORDER BY id"):
        bal = rebuilt.setdefault(r["user_id"], [0, 0])
        kind, amount = r["kind"], r["amount"]
        if kind in ("open", "grant"):
            bal[0] += amount
        elif kind == "freeze":
            bal[1] += amount
        elif kind == "settle":
            bal[0] -= amount
            bal[1] -= amount
        elif kind == "release":
            bal[1] -= amount
        if [r["balance_after"], r["frozen_after"]] != bal:
            problems.append(f"journal {r['id']} ({kind} {amount} for {r['user_id']}): says "
                            f"{r['balance_after']}/{r['frozen_after']}, rebuilt {bal[0]}/{bal[1]}")
        if bal[1] < 0:
            problems.append(f"journal {r['id']}: {r['user_id']} frozen went negative ({bal[1]})")
        if r["task_id"] is not None:
            per_task.setdefault(r["task_id"], []).append((kind, r["user_id"], amount))
    pending: dict[str, int] = {}
    for r in db.execute("SELECT user_id, SUM(amount) AS s FROM holds WHERE state='pending' GROUP BY user_id"):
        pending[r["user_id"]] = r["s"]
    seen: set[str] = set()
    for r in db.execute("SELECT * FROM accounts"):
        seen.add(r["user_id"])
        want = rebuilt.get(r["user_id"], [0, 0])
        if [r["balance"], r["frozen"]] != want:
            problems.append(f"{r['user_id']}: stored {r['balance']}/{r['frozen']}, journal {want[0]}/{want[1]}")
        if r["frozen"] != pending.get(r["user_id"], 0):
            problems.append(f"{r['user_id']}: frozen {r['frozen']} but pending holds {pending.get(r['user_id'], 0)}")
    for user in rebuilt.keys() - seen:
        problems.append(f"{user}: journal lines but no account")
    expected = {"pending": [], "settled": ["settle"], "released": ["release"]}
    for r in db.execute("SELECT * FROM holds"):
        lines = per_task.pop(r["task_id"], [])
        freezes = [ln for ln in lines if ln[0] == "freeze"]
        if freezes != [("freeze", r["user_id"], r["amount"])]:
            problems.append(f"hold {r['task_id']}: freeze lines {freezes}, want one of {r['amount']} "
                            f"for {r['user_id']}")
        resolutions = [ln for ln in lines if ln[0] != "freeze"]
        if [k for k, _, _ in resolutions] != expected[r["state"]] or any(
            u != r["user_id"] or a != r["amount"] for _, u, a in resolutions
        ):
            problems.append(f"hold {r['task_id']} is {r['state']} but its resolution lines are {resolutions}")
    for task_id, lines in per_task.items():
        problems.append(f"journal lines {lines} name task {task_id!r}, which has no hold")
    return problems


def audit_tasks(db: sqlite3.Connection) -> list[str]:
    """Tasks against holds, for a quiescent store (gateway stopped or idle): a succeeded task's hold is settled,
    a failed or cancelled task's released, an active task's pending; every hold belongs to a task of the same
    user and cost. (While tasks are finishing, a task may be terminal a moment before its hold is resolved.)"""
    problems: list[str] = []
    want = {"succeeded": "settled", "failed": "released", "cancelled": "released"}
    rows = db.execute(
        """SELECT t.task_id, t.user_id, t.state, t.cost, h.user_id AS h_user, h.amount, h.state AS h_state
           FROM tasks t LEFT JOIN holds h ON h.task_id = t.task_id"""
    ).fetchall()
    for r in rows:
        if r["h_state"] is None:
            problems.append(f"task {r['task_id']} ({r['state']}) has no hold")
            continue
        if (r["h_user"], r["amount"]) != (r["user_id"], r["cost"]):
            problems.append(f"task {r['task_id']}: hold {r['amount']} for {r['h_user']}, "
                            f"task costs {r['cost']} for {r['user_id']}")
        expected = want.get(r["state"], "pending")
        if r["h_state"] != expected:
            problems.append(f"task {r['task_id']} is {r['state']} but its hold is {r['h_state']}")
    for r in db.execute(
        "SELECT h.task_id, h.state FROM holds h LEFT JOIN tasks t ON t.task_id = h.task_id WHERE t.task_id IS NULL"
    ):
        if r["state"] == "pending":
            problems.append(f"hold {r['task_id']} is pending but no task was saved for it")
    return problems
