"""``SqliteStore``: the default store, one SQLite file in WAL mode (see ``actors/store/__init__.py`` for the tables).

All SQL but the audits (``_audit.py``) lives here. Every public method is async and runs one blocking
transaction in the store's own thread (``_thread.StoreThread``): one writer, in order, no lock contention.
"""

from __future__ import annotations

import json
import sqlite3

from ..task_machine import ACTIVE_STATES  # the task states are the machine's (defined once)
from ._audit import audit_ledger, audit_tasks
from ._sqlite_base import SqliteBase, Tx, check_amount, hold_row
from ._types import (
    MAX_AMOUNT,
    Account,
    Hold,
    HoldConflict,
    ImageRef,
    InsufficientCredits,
    InvalidAmount,
    JournalEntry,
    NegativeBalance,
    SweptHold,
    TaskRecord,
    UnknownHold,
)


class SqliteStore(SqliteBase):
    """All SQL lives here (but the audits). Public methods are async and run one blocking transaction each."""

    async def next_boot(self) -> int:
        """Count this start of the gateway (1, 2, ...): numbers that differ between runs on the same data, e.g.
        so that session seqs of a new run are all above those of any earlier run (resume across a restart)."""

        def q() -> int:
            with Tx(self.db):
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES ('boot', 1) ON CONFLICT(key) DO UPDATE SET value = value + 1"
                )
                return int(self.db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()[0])

        return await self._run(q)

    async def begin_run(self) -> bool:
        """Mark a gateway as running on this store; True if the previous run did not stop cleanly (crashed)."""

        def q() -> bool:
            with Tx(self.db):
                r = self.db.execute("SELECT value FROM meta WHERE key = 'running'").fetchone()
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES ('running', 1) ON CONFLICT(key) DO UPDATE SET value = 1"
                )
                return r is not None and r[0] == 1

        return await self._run(q)

    async def end_run(self) -> None:
        """The gateway stopped cleanly (its next start is not a crash)."""

        def q() -> None:
            with Tx(self.db):
                self.db.execute("UPDATE meta SET value = 0 WHERE key = 'running'")

        await self._run(q)

    async def mark_dispatched(self, task_id: str, boot: int) -> None:
        """The task is being sent to ComfyUI by run ``boot`` (written before the POST: if the POST crashes the
        process, the next start knows this task was in flight)."""

        def q() -> None:
            with Tx(self.db):
                self.db.execute("UPDATE tasks SET dispatched_boot = ? WHERE task_id = ?", (boot, task_id))

        await self._run(q)

    async def count_crash(self, limit: int, crashed_boot: int) -> list[str]:
        """After an unclean restart: each active task that was in flight in the run that crashed (``crashed_boot``
        dispatched it, or it is inside ComfyUI) has been through one more crash. Returns the ids of those that were
        so ``limit`` times in a row without progress (a save), to be quarantined."""

        def q() -> list[str]:
            with Tx(self.db):
                self.db.execute(
                    "UPDATE tasks SET crashes = crashes + 1 WHERE state NOT IN ('succeeded', 'failed', "
                    "'cancelled') AND (state != 'queued' OR dispatched_boot = ?)",
                    (crashed_boot,),
                )
                rows = self.db.execute(
                    "SELECT task_id FROM tasks WHERE crashes >= ? AND state NOT IN "
                    "('succeeded', 'failed', 'cancelled') ORDER BY seq",
                    (limit,),
                ).fetchall()
                return [r[0] for r in rows]

        return await self._run(q)

    # -- ledger primitives (each one transaction, idempotent by task id)

    async def account(self, user_id: str, initial: int) -> Account:
        def q() -> Account:
            with Tx(self.db):
                return self._account(user_id, initial)

        return await self._run(q)

    async def grant(
        self,
        user_id: str,
        amount: int,
        initial: int,
        note: str | None = None,
        allow_negative: bool = False,
        grant_id: str | None = None,
    ) -> Account:
        """Add ``amount`` (negative: remove) to the balance; journaled with ``note`` (who and why). The amount and
        the new balance stay within +-MAX_AMOUNT; leaving ``available`` below zero needs ``allow_negative``.
        ``grant_id`` matters only on Redis (an edge's request read again by the next core); one process never
        repeats a request, so it is not kept here."""
        if not isinstance(amount, int) or isinstance(amount, bool) or abs(amount) > MAX_AMOUNT:
            raise InvalidAmount(f"a grant must be an int within +-2^53, not {amount!r}")

        def q() -> Account:
            with Tx(self.db):
                acc = self._account(user_id, initial)
                if abs(acc.balance + amount) > MAX_AMOUNT:
                    raise InvalidAmount(f"the balance of {user_id!r} would leave +-2^53")
                if acc.available + amount < 0 and not allow_negative:
                    raise NegativeBalance(
                        f"the grant would leave {user_id!r} with {acc.available + amount} credits "
                        f'available; send "allowNegative": true to allow it'
                    )
                acc = Account(user_id, acc.balance + amount, acc.frozen)
                self._write_account(acc, "grant", None, amount, note)
                return acc

        return await self._run(q)

    async def freeze(self, user_id: str, task_id: str, amount: int, initial: int, ttl: float) -> tuple[Account, bool]:
        """Hold ``amount`` for ``task_id``. Returns (account, changed); repeating the same freeze is a no-op.

        The same task id with another amount or user is a ``HoldConflict``; a freeze that would make ``available``
        negative is ``InsufficientCredits``. Either way nothing changes (the transaction rolls back)."""
        check_amount(amount)

        def q() -> tuple[Account, bool]:
            with Tx(self.db):
                acc = self._account(user_id, initial)
                hold = self._hold(task_id)
                if hold is not None:
                    if hold.user_id == user_id and hold.amount == amount:
                        return acc, False
                    raise HoldConflict(f"task {task_id!r} already holds {hold.amount} for {hold.user_id!r}")
                if acc.available < amount:
                    raise InsufficientCredits(user_id, acc.available, amount)
                now = self._time()
                self.db.execute(
                    "INSERT INTO holds(task_id, user_id, amount, state, created_at, expires_at) VALUES (?,?,?,?,?,?)",
                    (task_id, user_id, amount, "pending", now, now + ttl),
                )
                acc = Account(user_id, acc.balance, acc.frozen + amount)
                self._write_account(acc, "freeze", task_id, amount)
                return acc, True

        return await self._run(q)

    async def resolve(
        self, task_id: str, outcome: str, amount: int | None = None, note: str | None = None
    ) -> tuple[Account, bool]:
        """Settle (post) or release (void) a pending hold, exactly once.

        Repeating the same resolution is a no-op success; resolving the other way, or with another amount,
        raises HoldConflict; an unknown task id raises UnknownHold. A refusal changes nothing.
        """
        if outcome not in ("settled", "released"):
            raise ValueError(f"outcome must be 'settled' or 'released', not {outcome!r}")

        def q() -> tuple[Account, bool]:
            with Tx(self.db):
                hold = self._hold(task_id)
                if hold is None:
                    raise UnknownHold(f"no hold for task {task_id!r}")
                if amount is not None and amount != hold.amount:
                    raise HoldConflict(f"task {task_id!r} holds {hold.amount}, not {amount}")
                if hold.state == outcome:
                    return self._account(hold.user_id, 0), False
                if hold.state != "pending":
                    raise HoldConflict(f"task {task_id!r} is already {hold.state}")
                return self._resolve(hold, outcome, note), True

        return await self._run(q)

    async def sweep_holds(self, now: float | None, ttl: float) -> list[SweptHold]:
        """Resolve pending holds whose task can no longer resolve them, the way the task's outcome says.

        ``now=None`` (start-up, before the registry runs) looks at every pending hold; otherwise only at those
        past their deadline. For each: no task (the gateway died between the freeze and saving the task, so the
        user never got a task id) -> released; task ``succeeded`` -> settled (it died between saving the outcome
        and settling); ``failed``/``cancelled`` -> released; task still active -> left alone at start-up, or,
        past the deadline, given a new one (``now + ttl``): a hold is never voided under a task that may still
        deliver; the registry resolves it, and its own timeouts end a stuck task. One transaction, and it decides
        as the registry would, so a race with the registry's own settle/release ends in a no-op, never a double.
        """

        def q() -> list[SweptHold]:
            out: list[SweptHold] = []
            with Tx(self.db):
                if now is None:
                    rows = self.db.execute("SELECT * FROM holds WHERE state = 'pending' ORDER BY rowid").fetchall()
                else:
                    rows = self.db.execute(
                        "SELECT * FROM holds WHERE state = 'pending' AND expires_at <= ? ORDER BY expires_at, rowid",
                        (now,),
                    ).fetchall()
                for r in rows:
                    hold = hold_row(r)
                    t = self.db.execute("SELECT state FROM tasks WHERE task_id = ?", (hold.task_id,)).fetchone()
                    task_state = t["state"] if t is not None else None
                    if task_state in ACTIVE_STATES:
                        if now is None:
                            continue
                        self.db.execute("UPDATE holds SET expires_at = ? WHERE task_id = ?", (now + ttl, hold.task_id))
                        out.append(SweptHold(hold, "extended", self._account(hold.user_id, 0), task_state))
                        continue
                    outcome = "settled" if task_state == "succeeded" else "released"
                    why = "expired" if now is not None else "recovered at start-up"
                    note = f"{why}; task {task_state or 'never saved'}"
                    out.append(SweptHold(hold, outcome, self._resolve(hold, outcome, note), task_state))
            return out

        return await self._run(q)

    async def hold(self, task_id: str) -> Hold | None:
        return await self._run(self._hold, task_id)

    async def expired_holds(self, now: float) -> list[Hold]:
        def q() -> list[Hold]:
            rows = self.db.execute(
                "SELECT * FROM holds WHERE state = 'pending' AND expires_at <= ? ORDER BY expires_at", (now,)
            ).fetchall()
            return [hold_row(r) for r in rows]

        return await self._run(q)

    async def accounts(self) -> list[Account]:
        return await self._run(self._accounts)

    async def journal(self, user_id: str | None = None) -> list[JournalEntry]:
        """The journal in order (one user's lines, or all)."""
        return await self._run(self._journal_lines, user_id)

    async def audit(self) -> list[str]:
        """Rebuild every balance from the journal and check the ledger (``_audit.audit_ledger``): one line
        per problem, [] when consistent. One read transaction, so the three tables agree."""

        def q() -> list[str]:
            with Tx(self.db):
                return audit_ledger(self._journal_lines(None), self._accounts(), self._holds())

        return await self._run(q)

    async def audit_tasks(self) -> list[str]:
        """Tasks against their holds, for a quiescent store (``_audit.audit_tasks``)."""

        def q() -> list[str]:
            with Tx(self.db):
                rows = self.db.execute("SELECT task_id, seq, user_id, state, cost FROM tasks").fetchall()
                tasks = [
                    TaskRecord(r["task_id"], r["seq"], r["user_id"], "", "", r["state"], 0, r["cost"], {}, 0, 0)
                    for r in rows
                ]
                return audit_tasks(tasks, self._holds())

        return await self._run(q)

    # -- tasks

    async def save_task(self, rec: TaskRecord) -> None:
        """Insert the task, or update what a transition changes (state, reason, prompt_id, backend, error,
        updated_at; a save is progress: ``crashes`` back to 0); its images are added, never replaced."""

        def q() -> None:
            error = json.dumps(rec.error) if rec.error is not None else None
            with Tx(self.db):
                cur = self.db.execute(  # a transition: the row's other columns (the workflow first) stay as they are
                    """UPDATE tasks SET state = ?, reason = ?, prompt_id = ?, backend = ?, error = ?, updated_at = ?,
                           crashes = 0 WHERE task_id = ?""",
                    (rec.state, rec.reason, rec.prompt_id, rec.backend, error, rec.updated_at, rec.task_id),
                )
                if cur.rowcount == 0:
                    self.db.execute(
                        """INSERT INTO tasks(task_id, seq, user_id, client_id, prompt_id, state, reason, backend, size,
                                             cost, workflow, error, created_at, updated_at, template, params)
                           VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                        (
                            rec.task_id,
                            rec.seq,
                            rec.user_id,
                            rec.client_id,
                            rec.prompt_id,
                            rec.state,
                            rec.reason,
                            rec.backend,
                            rec.size,
                            rec.cost,
                            json.dumps(rec.workflow, separators=(",", ":")),
                            error,
                            rec.created_at,
                            rec.updated_at,
                            rec.template,
                            json.dumps(rec.params) if rec.params is not None else None,
                        ),
                    )
                for n, img in enumerate(rec.images):
                    self.db.execute(
                        "INSERT OR IGNORE INTO images(task_id, n, backend, filename, subfolder, type) VALUES (?,?,?,?,?,?)",
                        (rec.task_id, n, img.backend, img.filename, img.subfolder, img.type),
                    )

        await self._run(q)

    async def load_active_tasks(self) -> list[TaskRecord]:
        """Every non-terminal task, oldest first (their queue order)."""

        def q() -> list[TaskRecord]:
            rows = self.db.execute(
                "SELECT * FROM tasks WHERE state NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY seq"
            ).fetchall()
            return [self._task_row(r) for r in rows]

        return await self._run(q)

    async def all_tasks(self) -> list[TaskRecord]:
        """Every task, in submission order (audits and tools; not for a request path)."""

        def q() -> list[TaskRecord]:
            return [self._task_row(r) for r in self.db.execute("SELECT * FROM tasks ORDER BY seq").fetchall()]

        return await self._run(q)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def q() -> TaskRecord | None:
            r = self.db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return self._task_row(r) if r is not None else None

        return await self._run(q)

    async def list_results(self, user_id: str, limit: int, before_seq: int | None) -> list[TaskRecord]:
        """The user's finished tasks, newest first, ``limit`` at most, older than ``before_seq`` when given."""

        def q() -> list[TaskRecord]:
            rows = self.db.execute(
                """SELECT * FROM tasks WHERE user_id = ? AND state IN ('succeeded', 'failed', 'cancelled')
                   AND seq < ? ORDER BY seq DESC LIMIT ?""",
                (user_id, before_seq if before_seq is not None else 2**62, limit),
            ).fetchall()
            return [self._task_row(r) for r in rows]

        return await self._run(q)

    async def max_task_seq(self) -> int:
        def q() -> int:
            return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0])

        return await self._run(q)

    # -- sync internals (store thread only)

    def _account(self, user_id: str, initial: int) -> Account:
        r = self.db.execute("SELECT balance, frozen FROM accounts WHERE user_id = ?", (user_id,)).fetchone()
        if r is not None:
            return Account(user_id, r["balance"], r["frozen"])
        acc = Account(user_id, initial, 0)
        self.db.execute(
            "INSERT INTO accounts(user_id, balance, frozen, created_at) VALUES (?,?,?,?)",
            (user_id, initial, 0, self._time()),
        )
        self._journal(acc, "open", None, initial, "initial credits")
        return acc

    def _write_account(
        self, acc: Account, kind: str, task_id: str | None, amount: int, note: str | None = None
    ) -> None:
        self.db.execute(
            "UPDATE accounts SET balance = ?, frozen = ? WHERE user_id = ?", (acc.balance, acc.frozen, acc.user_id)
        )
        self._journal(acc, kind, task_id, amount, note)

    def _journal(self, acc: Account, kind: str, task_id: str | None, amount: int, note: str | None) -> None:
        self.db.execute(
            """INSERT INTO journal(ts, user_id, kind, task_id, amount, balance_after, frozen_after, note)
               VALUES (?,?,?,?,?,?,?,?)""",
            (self._time(), acc.user_id, kind, task_id, amount, acc.balance, acc.frozen, note),
        )

    def _resolve(self, hold: Hold, outcome: str, note: str | None) -> Account:
        """Resolve a pending hold (caller checked it is pending, inside its transaction)."""
        cur = self.db.execute(
            "UPDATE holds SET state = ?, resolved_at = ? WHERE task_id = ? AND state = 'pending'",
            (outcome, self._time(), hold.task_id),
        )
        if cur.rowcount != 1:  # pragma: no cover - the caller read it as pending in this same transaction
            raise HoldConflict(f"task {hold.task_id!r} is no longer pending")
        acc = self._account(hold.user_id, 0)
        if outcome == "settled":
            acc = Account(acc.user_id, acc.balance - hold.amount, acc.frozen - hold.amount)
            self._write_account(acc, "settle", hold.task_id, hold.amount, note)
        else:
            acc = Account(acc.user_id, acc.balance, acc.frozen - hold.amount)
            self._write_account(acc, "release", hold.task_id, hold.amount, note)
        return acc

    def _accounts(self) -> list[Account]:
        rows = self.db.execute("SELECT user_id, balance, frozen FROM accounts ORDER BY user_id").fetchall()
        return [Account(r["user_id"], r["balance"], r["frozen"]) for r in rows]

    def _journal_lines(self, user_id: str | None) -> list[JournalEntry]:
        if user_id is None:
            rows = self.db.execute("SELECT * FROM journal ORDER BY id").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM journal WHERE user_id = ? ORDER BY id", (user_id,)).fetchall()
        return [
            JournalEntry(
                r["id"],
                r["ts"],
                r["user_id"],
                r["kind"],
                r["task_id"],
                r["amount"],
                r["balance_after"],
                r["frozen_after"],
                r["note"],
            )
            for r in rows
        ]

    def _holds(self) -> list[Hold]:
        return [hold_row(r) for r in self.db.execute("SELECT * FROM holds ORDER BY rowid")]

    def _hold(self, task_id: str) -> Hold | None:
        r = self.db.execute("SELECT * FROM holds WHERE task_id = ?", (task_id,)).fetchone()
        return hold_row(r) if r is not None else None

    def _task_row(self, r: sqlite3.Row) -> TaskRecord:
        imgs = self.db.execute(
            "SELECT backend, filename, subfolder, type FROM images WHERE task_id = ? ORDER BY n", (r["task_id"],)
        ).fetchall()
        return TaskRecord(
            task_id=r["task_id"],
            seq=r["seq"],
            user_id=r["user_id"],
            client_id=r["client_id"],
            prompt_id=r["prompt_id"],
            state=r["state"],
            size=r["size"],
            cost=r["cost"],
            workflow=json.loads(r["workflow"]),
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            reason=r["reason"],
            backend=r["backend"],
            error=json.loads(r["error"]) if r["error"] else None,
            images=tuple(ImageRef(i["backend"], i["filename"], i["subfolder"], i["type"]) for i in imgs),
            template=r["template"],
            params=json.loads(r["params"]) if r["params"] else None,
        )
