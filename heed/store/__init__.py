"""The SQLite store: one file, WAL, a connection per call, every user read scoped by user_id."""
from __future__ import annotations

from pathlib import Path

from .chats import ChatsMixin
from .db import Database, NotFound, StoreError
from .feedback import KINDS as FEEDBACK_KINDS
from .feedback import FeedbackMixin
from .learning import LearningMixin
from .users import UsersMixin

__all__ = ["Store", "StoreError", "NotFound", "FEEDBACK_KINDS"]


class Store(UsersMixin, ChatsMixin, FeedbackMixin, LearningMixin):
    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.db = Database(path, busy_timeout_ms=busy_timeout_ms)
        self.path = self.db.path

    def integrity_check(self) -> str:
        with self.db.connect() as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]

    def backup_to(self, dest: str | Path) -> None:
        """Consistent copy through SQLite's backup API (safe while the app writes)."""
        import sqlite3

        with self.db.connect() as db:
            target = sqlite3.connect(str(dest))
            try:
                db.conn.backup(target)
            finally:
                target.close()
