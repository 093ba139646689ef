"""Feedback events. One thumb per answer and one rating per conversation are
kept (a new click updates the row); every other kind is a new row."""
from __future__ import annotations

from .db import NotFound, StoreError, dumps, loads, now

KINDS = ("thumb", "edit", "correction", "comparison", "rating")


def _row(r: dict) -> dict:
    r = dict(r)
    r["payload"] = loads(r["payload"])
    return r


class FeedbackMixin:
    def record_feedback(self, *, user_id: int, kind: str, payload: dict, message_id: int | None = None, conversation_id: int | None = None) -> int:
        """Store one feedback event (committed on return) and return its id.

        The message or conversation must belong to ``user_id``; anything else
        raises NotFound and stores nothing.
        """
        if kind not in KINDS:
            raise StoreError(f"unknown feedback kind {kind!r}")
        t = now()
        with self.db.write() as db:
            if message_id is not None:
                row = db.execute(
                    "SELECT m.conversation_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                    "WHERE m.id = ? AND m.user_id = ? AND c.user_id = ? AND c.deleted_at IS NULL",
                    [message_id, user_id, user_id],
                ).fetchone()
                if row is None:
                    raise NotFound(f"message {message_id} not found")
                if conversation_id is not None and conversation_id != row[0]:
                    raise NotFound(f"message {message_id} not found in conversation {conversation_id}")
                conversation_id = row[0]
            elif conversation_id is not None:
                if db.execute("SELECT 1 FROM conversations WHERE id = ? AND user_id = ? AND deleted_at IS NULL", [conversation_id, user_id]).fetchone() is None:
                    raise NotFound(f"conversation {conversation_id} not found")
            else:
                raise StoreError("feedback needs a message or a conversation")
            body = dumps(payload)
            if kind in ("thumb", "rating"):
                key_col, key = ("message_id", message_id) if kind == "thumb" else ("conversation_id", conversation_id)
                existing = db.execute(f"SELECT id FROM feedback WHERE user_id = ? AND kind = ? AND {key_col} = ?", [user_id, kind, key]).fetchone()
                if existing:
                    # A changed vote is new information: the learner must see it again.
                    db.execute("UPDATE feedback SET payload = ?, updated_at = ?, consumed_run_id = NULL WHERE id = ?", [body, t, existing[0]])
                    return existing[0]
            cur = db.execute(
                "INSERT INTO feedback (user_id, conversation_id, message_id, kind, payload, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [user_id, conversation_id, message_id, kind, body, t, t],
            )
            return cur.lastrowid

    def record_edit(self, *, user_id: int, message_id: int, content: str) -> int:
        """The user's rewrite of an answer: the feedback row and the new text in one transaction.

        "before" is read inside the transaction, so two quick edits each pair
        with the text they actually replaced, and a crash leaves neither half.
        """
        t = now()
        with self.db.write() as db:
            row = db.execute(
                "SELECT m.content, m.conversation_id, m.role FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.id = ? AND m.user_id = ? AND c.user_id = ? AND c.deleted_at IS NULL",
                [message_id, user_id, user_id],
            ).fetchone()
            if row is None:
                raise NotFound(f"message {message_id} not found")
            before, conversation_id, role = row
            if role != "assistant":
                raise StoreError("only answers can be edited")
            cur = db.execute(
                "INSERT INTO feedback (user_id, conversation_id, message_id, kind, payload, created_at, updated_at) VALUES (?, ?, ?, 'edit', ?, ?, ?)",
                [user_id, conversation_id, message_id, dumps({"before": before, "after": content}), t, t],
            )
            db.execute(
                "UPDATE messages SET original_content = COALESCE(original_content, content), content = ? WHERE id = ? AND user_id = ?",
                [content, message_id, user_id],
            )
            return cur.lastrowid

    def withdraw_feedback(self, *, user_id: int, feedback_id: int) -> None:
        with self.db.write() as db:
            cur = db.execute("DELETE FROM feedback WHERE id = ? AND user_id = ?", [feedback_id, user_id])
            if cur.rowcount == 0:
                raise NotFound(f"feedback {feedback_id} not found")

    def thumb_for(self, *, user_id: int, message_id: int) -> dict | None:
        with self.db.connect() as db:
            rows = list(db.query("SELECT * FROM feedback WHERE user_id = ? AND message_id = ? AND kind = 'thumb'", [user_id, message_id]))
        return _row(rows[0]) if rows else None

    def list_feedback(self, *, user_id: int, unconsumed_only: bool = False, kind: str | None = None, conversation_id: int | None = None) -> list[dict]:
        sql = "SELECT * FROM feedback WHERE user_id = ?"
        args: list = [user_id]
        if unconsumed_only:
            sql += " AND consumed_run_id IS NULL"
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        if conversation_id is not None:
            sql += " AND conversation_id = ?"
            args.append(conversation_id)
        with self.db.connect() as db:
            return [_row(r) for r in db.query(sql + " ORDER BY id", args)]

    def count_unconsumed(self, *, user_id: int) -> int:
        with self.db.connect() as db:
            return db.execute("SELECT COUNT(*) FROM feedback WHERE user_id = ? AND consumed_run_id IS NULL", [user_id]).fetchone()[0]

    def users_with_unconsumed(self, *, at_least: int = 1) -> list[int]:
        """Ids of users with at least ``at_least`` unconsumed events (for the scheduler; not user data)."""
        with self.db.connect() as db:
            return [r[0] for r in db.execute(
                "SELECT user_id FROM feedback WHERE consumed_run_id IS NULL GROUP BY user_id HAVING COUNT(*) >= ? ORDER BY user_id",
                [at_least],
            )]
