"""Users: creation, login bookkeeping, deletion."""
from __future__ import annotations

import re

from .db import NotFound, StoreError, now
from .passwords import dummy_verify, hash_password, verify_password

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


def _check_password(password: object) -> None:
    if not isinstance(password, str) or not password or len(password) > 1024:
        raise StoreError("a password must be 1 to 1024 characters")


class UsersMixin:
    def add_user(self, name: str, *, password: str) -> int:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise StoreError("user names are 1-64 letters, digits, '.', '_' or '-'")
        _check_password(password)
        hashed = hash_password(password)
        with self.db.write() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise StoreError(f"user {name!r} already exists")
            # credentials_changed_at = creation: a login token of a deleted user by the same name is not this user's.
            t = now()
            cur = db.execute("INSERT INTO users (name, password_hash, created_at, credentials_changed_at) VALUES (?, ?, ?, ?)", [name, hashed, t, t])
            return cur.lastrowid

    def user_id(self, name: str) -> int:
        with self.db.connect() as db:
            row = db.execute("SELECT id FROM users WHERE name = ?", [name]).fetchone()
        if row is None:
            raise NotFound(f"no user named {name!r}")
        return row[0]

    def user_name(self, user_id: int) -> str:
        with self.db.connect() as db:
            row = db.execute("SELECT name FROM users WHERE id = ?", [user_id]).fetchone()
        if row is None:
            raise NotFound(f"no user with id {user_id}")
        return row[0]

    def list_users(self) -> list[dict]:
        with self.db.connect() as db:
            return list(db.query("SELECT id, name, created_at FROM users ORDER BY name"))

    def check_login(self, name: str, password: str, *, max_failures: int, lockout_seconds: int) -> int | None:
        """The user's id when the password is right and the account is not locked, else None.

        Failures are counted per account; after ``max_failures`` in a row the
        account is locked for ``lockout_seconds`` (even the right password waits).
        Each attempt is counted *before* the slow password check, so a burst of
        parallel guesses cannot run more than ``max_failures`` checks per lockout.
        """
        if not isinstance(name, str) or not isinstance(password, str):
            return None
        with self.db.write() as db:
            row = db.execute("SELECT id, password_hash, locked_until, failed_logins FROM users WHERE name = ?", [name]).fetchone()
            if row is not None:
                user_id, stored, locked_until, in_flight = row
                if locked_until > now() or in_flight >= max_failures:
                    return None
                db.execute("UPDATE users SET failed_logins = failed_logins + 1 WHERE id = ?", [user_id])
        if row is None:
            # Same cost as a real check, so timing does not reveal which names exist.
            dummy_verify(password)
            return None
        ok = verify_password(password, stored)
        with self.db.write() as db:
            if ok:
                db.execute("UPDATE users SET failed_logins = 0 WHERE id = ?", [user_id])
                return user_id
            fails = db.execute("SELECT failed_logins FROM users WHERE id = ?", [user_id]).fetchone()
            if fails is not None and fails[0] >= max_failures:
                db.execute("UPDATE users SET locked_until = ?, failed_logins = 0 WHERE id = ?", [now() + lockout_seconds, user_id])
        return None

    def login_state(self, *, user_id: int) -> dict:
        """Failed attempts counted and lock expiry (for tests and `heed user list`)."""
        with self.db.connect() as db:
            rows = list(db.query("SELECT failed_logins, locked_until FROM users WHERE id = ?", [user_id]))
        if not rows:
            raise NotFound(f"no user with id {user_id}")
        return rows[0]

    def unlock(self, *, user_id: int) -> None:
        """End a lockout now (an administrator's decision) and forget the failed attempts."""
        with self.db.write() as db:
            if db.execute("UPDATE users SET failed_logins = 0, locked_until = 0 WHERE id = ?", [user_id]).rowcount == 0:
                raise NotFound(f"no user with id {user_id}")

    def set_password(self, *, user_id: int, password: str) -> None:
        _check_password(password)
        hashed = hash_password(password)  # outside the write lock: scrypt takes ~50 ms
        with self.db.write() as db:
            cur = db.execute("UPDATE users SET password_hash = ?, failed_logins = 0, locked_until = 0, credentials_changed_at = ? WHERE id = ?",
                             [hashed, now(), user_id])
            if cur.rowcount == 0:
                raise NotFound(f"no user with id {user_id}")

    def credentials_changed_at(self, name: str) -> float | None:
        """When ``name``'s password last changed (0: never), or None when there is no such user."""
        with self.db.connect() as db:
            row = db.execute("SELECT credentials_changed_at FROM users WHERE name = ?", [name]).fetchone()
        return row[0] if row else None

    def delete_user(self, *, user_id: int) -> None:
        """Remove the user and (by cascade) every row of theirs."""
        with self.db.write() as db:
            cur = db.execute("DELETE FROM users WHERE id = ?", [user_id])
            if cur.rowcount == 0:
                raise NotFound(f"no user with id {user_id}")

    def seen_adapter_version(self, *, user_id: int) -> int | None:
        with self.db.connect() as db:
            row = db.execute("SELECT seen_adapter_version FROM users WHERE id = ?", [user_id]).fetchone()
        return row[0] if row else None

    def mark_adapter_seen(self, *, user_id: int, version: int | None) -> None:
        with self.db.write() as db:
            db.execute("UPDATE users SET seen_adapter_version = ? WHERE id = ?", [version, user_id])
