"""The store's schema: its version and the forward migrations that bring any older SQLite file up to it.

``PRAGMA user_version`` holds a file's version. On open, each missing step runs in its own transaction, in
order; a file newer than this code is refused (never downgraded). Append a step for every change; never edit
one that has shipped.
"""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4

_MIGRATIONS: dict[int, str] = {
    # version -> SQL that brings the previous version to this one. Append only; never edit a shipped one.
    1: """
    CREATE TABLE accounts (
        user_id TEXT PRIMARY KEY,
        balance INTEGER NOT NULL,
        frozen INTEGER NOT NULL DEFAULT 0 CHECK (frozen >= 0),
        created_at REAL NOT NULL
    );
    CREATE TABLE holds (
        task_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount >= 0),
        state TEXT NOT NULL CHECK (state IN ('pending', 'settled', 'released')),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        resolved_at REAL
    );
    CREATE INDEX holds_pending ON holds(state, expires_at);
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('open', 'grant', 'freeze', 'settle', 'release')),
        task_id TEXT,
        amount INTEGER NOT NULL,
        balance_after INTEGER NOT NULL,
        frozen_after INTEGER NOT NULL,
        note TEXT
    );
    CREATE INDEX journal_user ON journal(user_id, id);
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        prompt_id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        reason TEXT,
        backend TEXT,
        size INTEGER NOT NULL,
        cost INTEGER NOT NULL,
        workflow TEXT NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX tasks_state ON tasks(state);
    CREATE INDEX tasks_user ON tasks(user_id, seq);
    CREATE TABLE images (
        task_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        backend TEXT NOT NULL,
        filename TEXT NOT NULL,
        subfolder TEXT NOT NULL,
        type TEXT NOT NULL,
        PRIMARY KEY (task_id, n)
    );
    """,
    # 2: the journal is read by task (audit: every hold resolved exactly once) and holds by user; a small
    #    key/value table for process-wide counters (the boot number, which numbers session seqs per run)
    2: """
    CREATE INDEX journal_task ON journal(task_id) WHERE task_id IS NOT NULL;
    CREATE INDEX holds_user ON holds(user_id, state);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # 3: crash quarantine. tasks.dispatched_boot is the boot that last sent the task towards ComfyUI (written just
    #    before the POST); tasks.crashes counts the unclean restarts it was in flight across (dispatched in, or
    #    inside ComfyUI during, the run that crashed) without being saved (a save is progress: back to 0); meta
    #    'running' is 1 while a gateway runs on the file and 0 after a clean stop
    3: """
    ALTER TABLE tasks ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN dispatched_boot INTEGER;
    """,
    # 4: a task built from a workflow template keeps the template's name and its resolved parameters (JSON);
    #    both NULL for a raw workflow
    4: """
    ALTER TABLE tasks ADD COLUMN template TEXT;
    ALTER TABLE tasks ADD COLUMN params TEXT;
    """,
}


def migrate(db: sqlite3.Connection, name: str) -> int:
    """Bring ``db`` to ``SCHEMA_VERSION``; returns the version it had. Refuses a newer one (RuntimeError)."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"{name}: schema version {version} is newer than this gateway ({SCHEMA_VERSION})")
    for v in range(version + 1, SCHEMA_VERSION + 1):
        log.info("store %s: migrating schema to version %d", name, v)
        # executescript commits any open transaction first, so the script carries its own BEGIN/COMMIT
        db.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATIONS[v]}\nPRAGMA user_version = {v};\nCOMMIT;")
    return version
