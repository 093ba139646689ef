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
            if kind in ("thumb", "rating"):
                key_col, key = ("message_id", message_id) if kind == "thumb" else ("conversation_id", conversation_id)
                existing = db.execute(f"SELECT id FROM feedback WHERE user_id = ? AND kind = ? AND {key_col} = ?", [user_id, kind, key]).fetchone()
                if existing:
                    # A changed vote is new information: the learner must see it again.
                    db.execute("UPDATE feedback SET payload = ?, updated_at = ?, consumed_run_id = NULL WHERE id = ?", [dumps(payload), t, existing[0]])
                    return existing[0]
            return self._insert_feedback(db, user_id=user_id, conversation_id=conversation_id, message_id=message_id, kind=kind,
                                         payload=payload, at=t)

    def record_edit(self, *, user_id: int, message_id: int, content: str) -> int:
        """The user's rewrite of an answer: the feedback row and the new text in one transaction.

        "before" is read inside the transaction, so two quick edits each pair
        with the text they actually replaced, and a crash leaves neither half.
        """
        t = now()
        with self.db.write() as db:
            before, conversation_id, _, _ = self._own_answer(db, user_id=user_id, message_id=message_id)
            fid = self._insert_feedback(db, user_id=user_id, conversation_id=conversation_id, message_id=message_id, kind="edit",
                                        payload={"before": before, "after": content}, at=t)
            db.execute(
                "UPDATE messages SET original_content = COALESCE(original_content, content), content = ? WHERE id = ? AND user_id = ?",
                [content, message_id, user_id],
            )
            return fid

    @staticmethod
    def _insert_feedback(db, *, user_id: int, conversation_id: int, message_id: int | None, kind: str, payload: dict, at: float) -> int:
        return db.execute(
            "INSERT INTO feedback (user_id, conversation_id, message_id, kind, payload, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [user_id, conversation_id, message_id, kind, dumps(payload), at, at],
        ).lastrowid

    def _own_answer(self, db, *, user_id: int, message_id: int) -> tuple:
        """(content, conversation_id, position, status) of one of the user's answers, read inside ``db``'s transaction."""
        row = db.execute(
            "SELECT m.content, m.conversation_id, m.position, m.status, m.role FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.id = ? AND m.user_id = ? AND c.user_id = ? AND c.deleted_at IS NULL",
            [message_id, user_id, user_id],
        ).fetchone()
        if row is None:
            raise NotFound(f"message {message_id} not found")
        if row[4] != "assistant":
            raise StoreError("only answers take this feedback (edits, corrections, picks)")
        return row[:4]

    def record_correction(self, *, user_id: int, message_id: int, instruction: str, content: str,
                          adapter_version: int | None = None) -> tuple[int, int]:
        """A corrected answer replaces ``message_id``: the new message, the old one superseded (with
        everything after it) and the feedback row, in one transaction. Returns (new message id, feedback id).

        "before" is read inside the transaction, so an edit that landed while the
        corrected answer streamed is what the pair's rejected side holds.
        """
        t = now()
        with self.db.write() as db:
            before, conversation_id, position, status = self._own_answer(db, user_id=user_id, message_id=message_id)
            if status != "active":
                # Another tab corrected, picked over or undid this answer while the new one streamed.
                raise StoreError("that answer was replaced while the correction was written; nothing was changed")
            db.execute(
                "UPDATE messages SET status = 'superseded' WHERE conversation_id = ? AND user_id = ? AND status = 'active' "
                "AND (position > ? OR id = ?)",
                [conversation_id, user_id, position, message_id],
            )
            new_id = db.execute(
                "INSERT INTO messages (conversation_id, user_id, position, role, content, status, replaces_id, instruction, adapter_version, created_at) "
                "VALUES (?, ?, ?, 'assistant', ?, 'active', ?, ?, ?, ?)",
                [conversation_id, user_id, position, content, message_id, instruction, adapter_version, t],
            ).lastrowid
            payload = {"instruction": instruction, "original_message_id": message_id, "before": before, "after": content}
            fid = self._insert_feedback(db, user_id=user_id, conversation_id=conversation_id, message_id=new_id, kind="correction",
                                        payload=payload, at=t)
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", [t, conversation_id])
            return new_id, fid

    def record_choice(self, *, user_id: int, chosen_id: int, rejected_id: int) -> int:
        """The user picked ``chosen_id`` over ``rejected_id`` (two answers at one position): the
        feedback row and both statuses in one transaction. Returns the feedback id."""
        t = now()
        with self.db.write() as db:
            chosen, conv, pos, st_c = self._own_answer(db, user_id=user_id, message_id=chosen_id)
            rejected, conv_r, pos_r, st_r = self._own_answer(db, user_id=user_id, message_id=rejected_id)
            if chosen_id == rejected_id or (conv, pos) != (conv_r, pos_r):
                raise StoreError("pick between two answers to the same message")
            if {st_c, st_r} != {"active", "alternative"}:
                # Read under the lock: another tab may have corrected or picked since these were shown.
                raise StoreError("those two answers are no longer the ones to pick from; nothing was changed")
            fid = self._insert_feedback(db, user_id=user_id, conversation_id=conv, message_id=chosen_id, kind="comparison", at=t,
                                        payload={"chosen_id": chosen_id, "rejected_id": rejected_id, "chosen": chosen, "rejected": rejected})
            db.execute("UPDATE messages SET status = 'active' WHERE id = ? AND user_id = ?", [chosen_id, user_id])
            db.execute("UPDATE messages SET status = 'alternative' WHERE id = ? AND user_id = ?", [rejected_id, user_id])
            return fid

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
