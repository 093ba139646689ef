"""Conversations and messages. Every read and write is scoped by user_id."""
from __future__ import annotations

from .db import NotFound, StoreError, now

_MSG_COLS = "id, conversation_id, position, role, content, original_content, status, replaces_id, instruction, adapter_version, created_at"


class ChatsMixin:
    def create_conversation(self, *, user_id: int, title: str = "", adapter_version: int | None = None) -> int:
        t = now()
        with self.db.write() as db:
            cur = db.execute(
                "INSERT INTO conversations (user_id, title, adapter_version, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                [user_id, title[:200], adapter_version, t, t],
            )
            return cur.lastrowid

    def list_conversations(self, *, user_id: int) -> list[dict]:
        with self.db.connect() as db:
            return list(db.query(
                "SELECT id, title, adapter_version, created_at, updated_at FROM conversations "
                "WHERE user_id = ? AND deleted_at IS NULL ORDER BY updated_at DESC, id DESC",
                [user_id],
            ))

    def get_conversation(self, *, user_id: int, conversation_id: int) -> dict:
        with self.db.connect() as db:
            rows = list(db.query(
                "SELECT id, title, adapter_version, created_at, updated_at FROM conversations "
                "WHERE id = ? AND user_id = ? AND deleted_at IS NULL",
                [conversation_id, user_id],
            ))
        if not rows:
            raise NotFound(f"conversation {conversation_id} not found")
        return rows[0]

    def rename_conversation(self, *, user_id: int, conversation_id: int, title: str) -> None:
        with self.db.write() as db:
            cur = db.execute(
                "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ? AND user_id = ? AND deleted_at IS NULL",
                [title[:200], now(), conversation_id, user_id],
            )
            if cur.rowcount == 0:
                raise NotFound(f"conversation {conversation_id} not found")

    def delete_conversation(self, *, user_id: int, conversation_id: int) -> None:
        """Delete the conversation with its messages, feedback and unconsumed pairs."""
        with self.db.write() as db:
            cur = db.execute("DELETE FROM conversations WHERE id = ? AND user_id = ?", [conversation_id, user_id])
            if cur.rowcount == 0:
                raise NotFound(f"conversation {conversation_id} not found")

    def add_message(
        self,
        *,
        user_id: int,
        conversation_id: int,
        role: str,
        content: str,
        adapter_version: int | None = None,
        status: str = "active",
        replaces_id: int | None = None,
        instruction: str | None = None,
        position: int | None = None,
    ) -> int:
        """Append a message (committed before returning) and return its id.

        ``position`` defaults to after the last message; an alternative answer
        or a corrected answer reuses the position of the one it stands beside.
        """
        t = now()
        with self.db.write() as db:
            owner = db.execute("SELECT user_id FROM conversations WHERE id = ? AND deleted_at IS NULL", [conversation_id]).fetchone()
            if owner is None or owner[0] != user_id:
                raise NotFound(f"conversation {conversation_id} not found")
            if position is None:
                position = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM messages WHERE conversation_id = ?", [conversation_id]).fetchone()[0]
            cur = db.execute(
                "INSERT INTO messages (conversation_id, user_id, position, role, content, status, replaces_id, instruction, adapter_version, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [conversation_id, user_id, position, role, content, status, replaces_id, instruction, adapter_version, t],
            )
            title_row = db.execute("SELECT title FROM conversations WHERE id = ?", [conversation_id]).fetchone()
            title = title_row[0] if title_row[0] or role != "user" else " ".join(content.split())[:60]
            db.execute("UPDATE conversations SET updated_at = ?, title = ? WHERE id = ?", [t, title, conversation_id])
            return cur.lastrowid

    def get_message(self, *, user_id: int, message_id: int) -> dict:
        with self.db.connect() as db:
            rows = list(db.query(
                f"SELECT m.{_MSG_COLS.replace(', ', ', m.')} FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.id = ? AND m.user_id = ? AND c.user_id = ? AND c.deleted_at IS NULL",
                [message_id, user_id, user_id],
            ))
        if not rows:
            raise NotFound(f"message {message_id} not found")
        return rows[0]

    def history(self, *, user_id: int, conversation_id: int, include_inactive: bool = False) -> list[dict]:
        """The conversation's messages in order (only the active branch unless asked)."""
        self.get_conversation(user_id=user_id, conversation_id=conversation_id)
        where = "" if include_inactive else "AND status = 'active'"
        with self.db.connect() as db:
            return list(db.query(
                f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = ? AND user_id = ? {where} ORDER BY position, id",
                [conversation_id, user_id],
            ))

    def context_before(self, *, user_id: int, message_id: int) -> list[dict]:
        """Active messages before ``message_id``: the context the answer was given in."""
        msg = self.get_message(user_id=user_id, message_id=message_id)
        return [
            {"role": m["role"], "content": m["content"]}
            for m in self.history(user_id=user_id, conversation_id=msg["conversation_id"])
            if m["position"] < msg["position"]
        ]

    def set_message_content(self, *, user_id: int, message_id: int, content: str) -> str:
        """Replace an answer's text, keeping the model's first version; returns the previous text."""
        msg = self.get_message(user_id=user_id, message_id=message_id)
        if msg["role"] != "assistant":
            raise StoreError("only answers can be edited")
        with self.db.write() as db:
            db.execute(
                "UPDATE messages SET original_content = COALESCE(original_content, content), content = ? WHERE id = ? AND user_id = ?",
                [content, message_id, user_id],
            )
        return msg["content"]

    def set_message_status(self, *, user_id: int, message_id: int, status: str) -> None:
        with self.db.write() as db:
            cur = db.execute("UPDATE messages SET status = ? WHERE id = ? AND user_id = ?", [status, message_id, user_id])
            if cur.rowcount == 0:
                raise NotFound(f"message {message_id} not found")

    def truncate_after(self, *, user_id: int, conversation_id: int, position: int) -> None:
        """Retire every active message after ``position`` (the conversation branches there)."""
        with self.db.write() as db:
            db.execute(
                "UPDATE messages SET status = 'superseded' WHERE conversation_id = ? AND user_id = ? AND position > ? AND status = 'active'",
                [conversation_id, user_id, position],
            )
