"""The auditor of a fault run: what must hold after any mix of crashes, whatever the seed.

``settle_and_audit`` waits (bounded) until no task is active, flushes every client, checks the HTTP view,
stops the gateway cleanly, and then checks the store and what each client saw:

1. every task is terminal (store and ``GET /api/tasks/{id}``);
2. every hold was resolved exactly once, as its task ended (settled iff succeeded), and the journal rebuilds
   every balance (``SqliteStore.audit`` and ``audit_tasks``);
3. for every user: initial + grants - settled = balance, and frozen = 0; every grant the harness made is in
   the journal once (one whose answer was lost: at most once), and no other;
4. every ``succeeded`` task has its images in the user's results history (``GET /api/results``) with the same
   URLs its ``completed`` message carried, ran successfully on a simulator, and its first image is served
   while the simulator that made it is still the live one;
5. every client saw each of its tasks' terminal message, of the right kind; or, if it did not, it was told to
   ``resync`` after the task ended (its last recorded change) and the task's state over HTTP is terminal (what a
   page does after a resync: reload over HTTP). No task has two terminal messages;
6. no message reached another user: every ``taskId`` a client saw is one of its user's tasks, and the last
   ``balance`` a client saw (unless a resync came after it) is its user's final account.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from _chaos_lib import TERMINAL_STATES, GatewayProcess, ResumingClient, SimHandle
from actors.store import TaskRecord, open_store

KIND_OF_STATE = {"succeeded": "completed", "failed": "execution_error", "cancelled": "cancelled"}


@dataclass
class Grant:
    user: str
    amount: int
    admin: str  # the admin user id, unique per grant: the journal line's note is "admin <admin>"
    confirmed: bool  # False: the answer was lost (the gateway died): it may or may not have happened


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(problem)
        elif len(self.problems) == 200:
            self.problems.append("... (more problems not shown)")


def unsigned(url: str) -> str:
    """An image URL without its ``?exp=&sig=`` signature (which changes every time it is handed out)."""
    return url.split("?", 1)[0]


async def wait_no_active_tasks(db_path: str, *, timeout: float) -> list[TaskRecord]:
    """Poll the store (read-only use, from outside the gateway) until no task is active; returns the stragglers
    if the deadline passes first (each poll is a condition check, the deadline is what bounds it)."""
    async with open_store(db_path) as store:
        with trio.move_on_after(timeout):
            while await store.load_active_tasks():
                await trio.sleep(0.05)
        return await store.load_active_tasks()


async def settle_and_audit(
    *, gateway: GatewayProcess, sims: SimHandle, clients: dict[str, ResumingClient], http: httpx.AsyncClient,
    initial_credits: int, grants: list[Grant], settle_timeout: float = 60.0, report: Report | None = None,
) -> Report:
    report = report or Report()
    db_path = gateway.store_spec
    stuck = await wait_no_active_tasks(db_path, timeout=settle_timeout)
    for t in stuck:
        report.add(f"task {t.task_id} of {t.user_id} still {t.state} after {settle_timeout}s "
                   f"(backend {t.backend}, prompt {t.prompt_id})")
    for user, client in clients.items():
        try:
            await client.flush(f"flush-{user}-{time.monotonic_ns()}")
        except trio.TooSlowError:
            report.add(f"client {user}: the flush marker never came back")

    async with open_store(db_path) as store:
        tasks = await store.all_tasks()
    by_user: dict[str, list[TaskRecord]] = {}
    for t in tasks:
        by_user.setdefault(t.user_id, []).append(t)

    # -- the HTTP view, while the gateway still runs
    results_urls: dict[str, list[str]] = {}
    for user in sorted(set(by_user) | set(clients)):
        headers = gateway.headers(user)
        before: int | None = None
        for _ in range(1000):
            params = {"limit": "100", **({"before": str(before)} if before is not None else {})}
            r = await http.get(f"{gateway.url}/api/results", params=params, headers=headers)
            if r.status_code != 200:
                report.add(f"GET /api/results for {user}: {r.status_code}")
                break
            page = r.json()
            for item in page["results"]:
                # the query is the URL's signature, made afresh on every read: compare where they point
                results_urls[item["taskId"]] = [unsigned(u) for u in item["urls"]]
            before = page.get("next")
            if before is None:
                break
    for t in tasks:
        r = await http.get(f"{gateway.url}/api/tasks/{t.task_id}", headers=gateway.headers(t.user_id))
        if r.status_code != 200 or r.json()["state"] not in TERMINAL_STATES:
            report.add(f"task {t.task_id}: GET /api/tasks answered {r.status_code} {r.text[:200]}")
    live_runs = {r.prompt_id for r in sims.sim.runs if r.outcome == "success"}
    served = 0
    for t in tasks:
        if t.state == "succeeded" and t.prompt_id in live_runs and served < 20 and results_urls.get(t.task_id):
            r = await http.get(results_urls[t.task_id][0], headers=gateway.headers(t.user_id))
            if r.status_code != 200 or not r.content.startswith(b"\x89PNG"):
                report.add(f"task {t.task_id}: its first image answered {r.status_code}")
            served += 1
    accounts_http = {}
    for user in by_user:
        r = await http.get(f"{gateway.url}/api/balance", headers=gateway.headers(user))
        accounts_http[user] = r.json()

    # -- stop cleanly, then the store
    code = await gateway.stop()
    if code != 0:
        report.add(f"the gateway exited with {code} on SIGTERM")
    async with open_store(db_path) as store:
        for line in await store.audit():
            report.add(f"ledger audit: {line}")
        for line in await store.audit_tasks():
            report.add(f"task/hold audit: {line}")
        accounts = {a.user_id: a for a in await store.accounts()}
        journal = await store.journal()
        tasks = await store.all_tasks()  # final
    by_user = {}
    for t in tasks:
        by_user.setdefault(t.user_id, []).append(t)
        if t.state not in TERMINAL_STATES:
            report.add(f"task {t.task_id} is {t.state} after the run")

    # 3. money, per user
    grant_lines = Counter((j.user_id, j.amount, j.note) for j in journal if j.kind == "grant")
    for g in grants:
        key = (g.user, g.amount, f"admin {g.admin}")
        n = grant_lines.pop(key, 0)
        if n > 1 or (g.confirmed and n != 1):
            report.add(f"grant {g.admin} of {g.amount} to {g.user} ({'confirmed' if g.confirmed else 'answer lost'})"
                       f" is in the journal {n} times")
    for key, n in grant_lines.items():
        report.add(f"journal has {n} grant(s) {key} the harness never made")
    granted: Counter[str] = Counter()
    for j in journal:
        if j.kind == "grant":
            granted[j.user_id] += j.amount
    for user, acc in accounts.items():
        settled = sum(t.cost for t in by_user.get(user, []) if t.state == "succeeded")
        want = initial_credits + granted[user] - settled
        if acc.balance != want or acc.frozen != 0:
            report.add(f"{user}: balance {acc.balance} frozen {acc.frozen}; want {want} "
                       f"(= {initial_credits} + {granted[user]} granted - {settled} settled) and 0 frozen")
        http_acc = accounts_http.get(user)
        if http_acc is not None and (http_acc["balance"], http_acc["frozen"]) != (acc.balance, acc.frozen):
            report.add(f"{user}: GET /api/balance said {http_acc}, the store {acc}")
    for user in by_user:
        if user not in accounts:
            report.add(f"{user} has tasks but no account")

    # 4. results
    runs = sims.runs_by_prompt()
    for t in tasks:
        if t.state != "succeeded":
            continue
        if not t.images:
            report.add(f"task {t.task_id} succeeded with no image")
        want_urls = [f"{gateway.url}/api/images/{t.task_id}/{n}" for n in range(len(t.images))]
        if results_urls.get(t.task_id) != want_urls:
            report.add(f"task {t.task_id}: results history has {results_urls.get(t.task_id)}, want {want_urls}")
        if "success" not in runs.get(t.prompt_id, []):
            report.add(f"task {t.task_id} succeeded but its prompt {t.prompt_id} never ran to success: "
                       f"{runs.get(t.prompt_id)}")

    # 5, 6. what each client saw
    resynced_ok = 0
    for user, client in clients.items():
        mine = {t.task_id: t for t in by_user.get(user, []) if t.client_id == client.client_id}
        all_mine = {t.task_id for t in by_user.get(user, [])}
        terminals: dict[str, list[dict[str, Any]]] = {}
        for m in client.seen:
            task_id = m.body.get("taskId")
            if isinstance(task_id, str) and task_id not in all_mine and not task_id.startswith("flush-"):
                report.add(f"client {user} got a message about {task_id}, not one of its tasks: {m.body}")
            if m.body.get("type") in ("completed", "execution_error", "cancelled"):
                terminals.setdefault(task_id, []).append(m.body)
        for task_id, t in mine.items():
            got = terminals.get(task_id, [])
            if len(got) > 1:
                report.add(f"client {user}: task {task_id} has {len(got)} terminal messages: {got}")
            if got:
                body = got[-1]
                if body["type"] != KIND_OF_STATE.get(t.state):
                    report.add(f"client {user}: task {task_id} is {t.state} but its message was {body}")
                elif t.state == "failed" and body.get("reason") != t.reason:
                    report.add(f"client {user}: task {task_id} failed ({t.reason}) but the message says {body}")
                elif t.state == "succeeded" and [unsigned(u) for u in body.get("urls") or []] != results_urls.get(task_id):
                    report.add(f"client {user}: task {task_id} completed with {body.get('urls')}, "
                               f"results history has {results_urls.get(task_id)}")
                continue
            if any(at >= t.updated_at for at in client.resyncs):
                resynced_ok += 1  # told to reload after the task ended: its HTTP state (checked above) is terminal
            else:
                report.add(f"client {user} never saw the end of task {task_id} ({t.state} {t.reason or ''}) "
                           f"and got no resync after it ended")
        balances = [(i, m.body) for i, m in enumerate(client.seen) if m.body.get("type") == "balance"]
        acc = accounts.get(user)
        if balances and acc is not None:
            last_at = client.seen[balances[-1][0]].at
            if not any(at >= last_at for at in client.resyncs):
                b = balances[-1][1]
                if (b["balance"], b["frozen"]) != (acc.balance, acc.frozen):
                    report.add(f"client {user}: last balance message {b}, final account {acc}")

    with open(gateway.data.parent / "clients.jsonl", "w") as out:  # what each client saw, for a post-mortem
        for user, client in clients.items():
            out.write(json.dumps({"user": user, "connections": client.connections, "resyncs": client.resyncs}) + "\n")
            for m in client.seen:
                out.write(json.dumps({"user": user, "at": m.at, "conn": m.conn, "seq": m.seq, "body": {
                    k: v for k, v in m.body.items() if k not in ("data",)}}) + "\n")
    states = Counter(t.state if t.state != "failed" else f"failed:{t.reason}" for t in tasks)
    report.stats.update({
        "tasks": len(tasks),
        "by_state": dict(sorted(states.items())),
        "settled": sum(t.cost for t in tasks if t.state == "succeeded"),
        "granted": sum(granted.values()),
        "balances": sum(a.balance for a in accounts.values()),
        "frozen": sum(a.frozen for a in accounts.values()),
        "journal_lines": len(journal),
        "prompts_run_twice": sum(1 for outcomes in runs.values() if len(outcomes) > 1),
        "prompts_run_twice_sample": sorted(p for p, outcomes in runs.items() if len(outcomes) > 1)[:3],
        "terminal_seen_via_resync": resynced_ok,
        "resyncs": sum(len(c.resyncs) for c in clients.values()),
        "client_connections": sum(c.connections for c in clients.values()),
        "gateway_error_lines": len(gateway.error_lines),
    })
    return report
