"""The SQLite file: connections, pragmas, transactions and schema migrations.

A connection is opened per call (``Store.connect``): a sqlite3 connection made
in one thread cannot be used in another, and Gradio runs handlers on a pool.
WAL lets readers run while the learner writes; every write is a short
``BEGIN IMMEDIATE`` transaction so writers queue on the busy timeout instead of
failing half-way with "database is locked".
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from .schema import MIGRATIONS


class StoreError(Exception):
    """A store operation was refused; the message says why."""


class NotFound(StoreError):
    """The record does not exist or does not belong to the caller."""


def now() -> float:
    return time.time()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def loads(text: str | None) -> Any:
    return json.loads(text) if text else None


class Database:
    """Owns the path and opens configured connections."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            migrate(db)

    def _open(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        return sqlite_utils.Database(conn)

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite_utils.Database]:
        db = self._open()
        try:
            yield db
        finally:
            db.conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """One IMMEDIATE transaction: committed on success, rolled back on any error."""
        db = self._open()
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.conn.execute("ROLLBACK")
                raise
            db.conn.execute("COMMIT")
        finally:
            db.conn.close()


def migrate(db: sqlite_utils.Database) -> int:
    """Apply the migrations this file lacks, each in its own transaction."""
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise StoreError(f"database schema v{current} is newer than this Heed (v{len(MIGRATIONS)}); upgrade Heed")
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the lock: another process may have migrated meanwhile.
            if db.execute("PRAGMA user_version").fetchone()[0] >= version:
                db.conn.execute("ROLLBACK")
                continue
            for statement in script.split(";\n"):
                if statement.strip():
                    db.conn.execute(statement)
            db.conn.execute(f"PRAGMA user_version = {version}")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")
    return len(MIGRATIONS)
