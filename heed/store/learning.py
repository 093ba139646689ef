"""What the learner reads and writes: pairs, runs, adapter versions, leases, notes."""
from __future__ import annotations

import os

from .db import NotFound, StoreError, dumps, loads, now


def _decode(r: dict, *cols: str) -> dict:
    r = dict(r)
    for c in cols:
        if c in r:
            r[c] = loads(r[c])
    return r


class LearningMixin:
    # -- runs -------------------------------------------------------------
    def start_run(self, *, user_id: int, trigger: str = "manual") -> int:
        with self.db.write() as db:
            cur = db.execute("INSERT INTO learner_runs (user_id, status, trigger, started_at) VALUES (?, 'running', ?, ?)", [user_id, trigger, now()])
            return cur.lastrowid

    def finish_run(self, *, user_id: int, run_id: int, status: str, metrics: dict | None = None, error: str | None = None,
                   n_feedback: int = 0, n_pairs: int = 0, candidate_version: int | None = None) -> None:
        t = now()
        with self.db.write() as db:
            started = db.execute("SELECT started_at FROM learner_runs WHERE id = ? AND user_id = ?", [run_id, user_id]).fetchone()
            if started is None:
                raise NotFound(f"run {run_id} not found")
            db.execute(
                "UPDATE learner_runs SET status = ?, finished_at = ?, seconds = ?, metrics = ?, error = ?, n_feedback = ?, n_pairs = ?, candidate_version = ? WHERE id = ?",
                [status, t, t - started[0], dumps(metrics or {}), error, n_feedback, n_pairs, candidate_version, run_id],
            )

    def list_runs(self, *, user_id: int, limit: int = 50) -> list[dict]:
        with self.db.connect() as db:
            return [_decode(r, "metrics") for r in db.query("SELECT * FROM learner_runs WHERE user_id = ? ORDER BY id DESC LIMIT ?", [user_id, limit])]

    def fail_stale_runs(self) -> int:
        """Runs left 'running' by a crashed process whose lease expired become 'failed'."""
        with self.db.write() as db:
            cur = db.execute(
                "UPDATE learner_runs SET status = 'failed', error = 'interrupted (process ended before finishing)', finished_at = ? "
                "WHERE status = 'running' AND user_id NOT IN (SELECT user_id FROM leases WHERE expires_at > ?)",
                [now(), now()],
            )
            return cur.rowcount

    def fail_interrupted_runs(self, *, user_id: int) -> int:
        """Call while holding the user's lease: any run of theirs still 'running' died mid-way."""
        t = now()
        with self.db.write() as db:
            cur = db.execute(
                "UPDATE learner_runs SET status = 'failed', error = 'interrupted (process ended before finishing)', "
                "finished_at = ?, seconds = ? - started_at WHERE user_id = ? AND status = 'running'",
                [t, t, user_id],
            )
            return cur.rowcount

    # -- pairs ------------------------------------------------------------
    def list_pairs(self, *, user_id: int, split: str | None = None, kind: str | None = None, promoted_only: bool = False) -> list[dict]:
        """A user's examples; ``promoted_only``: those a promoted adapter learned (see ``replay_pool``)."""
        sql = "SELECT p.* FROM pairs p WHERE p.user_id = ?"
        args: list = [user_id]
        if split:
            sql += " AND p.split = ?"
            args.append(split)
        if kind:
            sql += " AND p.kind = ?"
            args.append(kind)
        with self.db.connect() as db:
            if promoted_only:
                learned = self._learned_runs(db, user_id)
                sql += f" AND p.run_id IN ({','.join('?' * len(learned))})"
                args += sorted(learned)
            return [_decode(r, "prompt") for r in db.query(sql + " ORDER BY p.id", args)]

    @staticmethod
    def _trained_runs(db, user_id: int) -> list[tuple[int, str, int]]:
        """(id, status, examples it carried from a refused run) of the user's runs that trained a candidate, oldest first."""
        return [(r[0], r[1], r[2] or 0) for r in db.execute(
            "SELECT id, status, json_extract(metrics, '$.n_carried') FROM learner_runs "
            "WHERE user_id = ? AND status IN ('promoted', 'rejected') ORDER BY id", [user_id])]

    def _learned_runs(self, db, user_id: int) -> set[int]:
        """Runs whose examples a promoted adapter learned: promoted runs, and refused runs the next run carried and promoted.

        "Carried" is read off the next run's own record, not assumed: runs from before carrying existed carried nothing.
        """
        runs = self._trained_runs(db, user_id)
        learned = {rid for rid, status, _ in runs if status == "promoted"}
        learned |= {rid for (rid, status, _), (_, after, carried) in zip(runs, runs[1:])
                    if status == "rejected" and after == "promoted" and carried}
        return learned

    def replay_pool(self, *, user_id: int, exclude_feedback: set[int] | frozenset = frozenset()) -> list[dict]:
        """Training examples (dpo, kto) that promoted adapters learned, for replay."""
        return [p for p in self.list_pairs(user_id=user_id, split="train", promoted_only=True)
                if p["kind"] in ("dpo", "kto") and p["feedback_id"] not in exclude_feedback]

    def unlearned_pairs(self, *, user_id: int, exclude_feedback: set[int] | frozenset = frozenset()) -> list[dict]:
        """Training examples (dpo, kto) of the user's last trained run when the gate refused it, newest first.

        The refused adapter is gone, not the feedback: the next run trains these
        beside its own, once. A run refused again drops them (only its own new
        examples get their second try), so feedback that can only make a
        degenerate adapter, like edits into one-word answers, cannot hold every
        later run back.
        """
        with self.db.connect() as db:
            runs = self._trained_runs(db, user_id)
            if not runs or runs[-1][1] != "rejected":
                return []
            rows = db.query("SELECT * FROM pairs WHERE user_id = ? AND run_id = ? AND split = 'train' AND kind IN ('dpo', 'kto') "
                            "ORDER BY id DESC", [user_id, runs[-1][0]])
            pairs = [_decode(r, "prompt") for r in rows]
        return [p for p in pairs if p["feedback_id"] not in exclude_feedback]

    # -- adapters ---------------------------------------------------------
    def active_adapter(self, *, user_id: int) -> dict | None:
        with self.db.connect() as db:
            rows = list(db.query("SELECT * FROM adapters WHERE user_id = ? AND status = 'active'", [user_id]))
        return _decode(rows[0], "metrics") if rows else None

    def list_adapters(self, *, user_id: int) -> list[dict]:
        with self.db.connect() as db:
            return [_decode(r, "metrics") for r in db.query("SELECT * FROM adapters WHERE user_id = ? ORDER BY version DESC", [user_id])]

    def next_adapter_version(self, *, user_id: int) -> int:
        with self.db.connect() as db:
            return db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE user_id = ?", [user_id]).fetchone()[0]

    def promote(self, *, user_id: int, run_id: int, holder: str, version: int | None, path: str | None, feedback_ids: list[int],
                pairs: list[dict], metrics: dict, status: str = "active") -> None:
        """The one transaction that makes a trained version count.

        Records the version (active, or rejected with the gate's reasons), stores
        the run's pairs, and marks exactly the feedback the run read as consumed.
        Called only after the adapter's files are in their final place. With
        ``version=None`` no adapter is recorded (a run with nothing to train still
        stores its held-out examples and consumes its feedback).
        """
        if status not in ("active", "rejected"):
            raise StoreError(f"bad adapter status {status!r}")
        t = now()
        holder_name = holder
        with self.db.write() as db:
            holder = db.execute("SELECT holder FROM leases WHERE user_id = ? AND expires_at > ?", [user_id, t]).fetchone()
            if holder is None or holder[0] != holder_name:
                raise StoreError("this run no longer holds the user's lease; not promoting")
            if version is not None:
                if status == "active":
                    db.execute("UPDATE adapters SET status = 'retired' WHERE user_id = ? AND status = 'active'", [user_id])
                db.execute(
                    "INSERT INTO adapters (user_id, version, path, status, run_id, n_feedback, metrics, created_at, activated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [user_id, version, path, status, run_id, len(feedback_ids), dumps(metrics), t, t if status == "active" else None],
                )
            fb = sorted(set(feedback_ids))
            if fb:
                marks = ",".join("?" * len(fb))
                # A vote changed after the run read it stays unconsumed (updated_at moved on).
                db.execute(f"DELETE FROM pairs WHERE user_id = ? AND feedback_id IN ({marks})", [user_id, *fb])
                db.execute(
                    f"UPDATE feedback SET consumed_run_id = ? WHERE user_id = ? AND id IN ({marks}) AND consumed_run_id IS NULL AND updated_at <= ?",
                    [run_id, user_id, *fb, metrics.get("feedback_read_at", t)],
                )
            for p in pairs:
                db.execute(
                    "INSERT INTO pairs (user_id, feedback_id, run_id, kind, source, prompt, chosen, rejected, completion, label, weight, split, "
                    "imitate, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [user_id, p.get("feedback_id"), run_id, p["kind"], p["source"], dumps(p["prompt"]), p.get("chosen"), p.get("rejected"),
                     p.get("completion"), p.get("label"), p.get("weight", 1.0), p["split"], int(p.get("imitate", True)), t],
                )

    def set_active_version(self, *, user_id: int, version: int | None) -> None:
        """Roll back (or forward) to an existing version; None serves the base model."""
        with self.db.write() as db:
            if version is not None:
                row = db.execute("SELECT status, path FROM adapters WHERE user_id = ? AND version = ?", [user_id, version]).fetchone()
                if row is None or row[0] == "deleted":
                    raise NotFound(f"adapter version {version} not found")
                if not os.path.isdir(row[1]):
                    raise StoreError(f"adapter version {version} has no files on disk")
            db.execute("UPDATE adapters SET status = 'retired' WHERE user_id = ? AND status = 'active'", [user_id])
            if version is not None:
                db.execute("UPDATE adapters SET status = 'active', activated_at = ? WHERE user_id = ? AND version = ?", [now(), user_id, version])

    def mark_adapter_deleted(self, *, user_id: int, version: int) -> None:
        with self.db.write() as db:
            db.execute("UPDATE adapters SET status = 'deleted' WHERE user_id = ? AND version = ? AND status != 'active'", [user_id, version])

    # -- leases -----------------------------------------------------------
    @staticmethod
    def new_lease_holder(trigger: str) -> str:
        """A holder name that says who holds the lease: ``trigger-pidN-nonce@host``."""
        import socket
        import uuid

        return f"{trigger}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"

    @staticmethod
    def _holder_is_dead(holder: str) -> bool:
        """True only when the holder ran on this host and its process is gone (a crash, a kill -9)."""
        import re
        import socket

        m = re.match(r"^.*-pid(\d+)-[0-9a-f]+@(.+)$", holder)
        if m is None or m.group(2) != socket.gethostname() or int(m.group(1)) <= 0:
            return False
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def acquire_lease(self, *, user_id: int, holder: str, seconds: float) -> bool:
        """Claim the user for one learner run; False when another live run holds it.

        A lease whose holder process on this host has died is taken over at
        once, so a crashed run does not block the user until the lease expires.
        """
        t = now()
        with self.db.write() as db:
            row = db.execute("SELECT holder, expires_at FROM leases WHERE user_id = ?", [user_id]).fetchone()
            if row is not None and row[1] > t and row[0] != holder and not self._holder_is_dead(row[0]):
                return False
            db.execute("INSERT OR REPLACE INTO leases (user_id, holder, expires_at) VALUES (?, ?, ?)", [user_id, holder, t + seconds])
            return True

    def renew_lease(self, *, user_id: int, holder: str, seconds: float) -> bool:
        """Extend a held lease; False when this holder lost it (then it must not promote)."""
        with self.db.write() as db:
            cur = db.execute("UPDATE leases SET expires_at = ? WHERE user_id = ? AND holder = ?", [now() + seconds, user_id, holder])
            return cur.rowcount == 1

    def transfer_lease(self, *, user_id: int, old: str, new: str) -> None:
        with self.db.write() as db:
            db.execute("UPDATE leases SET holder = ? WHERE user_id = ? AND holder = ?", [new, user_id, old])

    def release_lease(self, *, user_id: int, holder: str) -> None:
        with self.db.write() as db:
            db.execute("DELETE FROM leases WHERE user_id = ? AND holder = ?", [user_id, holder])

    def lease_of(self, *, user_id: int) -> dict | None:
        with self.db.connect() as db:
            rows = list(db.query("SELECT * FROM leases WHERE user_id = ? AND expires_at > ?", [user_id, now()]))
        return rows[0] if rows else None

    # -- standing notes -----------------------------------------------------
    def add_note(self, *, user_id: int, text: str, feedback_id: int | None = None, active: bool = True) -> int:
        text = text.strip()
        if not text:
            raise StoreError("a note must not be empty")
        with self.db.write() as db:
            cur = db.execute("INSERT INTO notes (user_id, text, active, feedback_id, created_at) VALUES (?, ?, ?, ?, ?)", [user_id, text[:500], int(active), feedback_id, now()])
            return cur.lastrowid

    def list_notes(self, *, user_id: int, active_only: bool = False) -> list[dict]:
        sql = "SELECT id, text, active, feedback_id, created_at FROM notes WHERE user_id = ?" + (" AND active = 1" if active_only else "")
        with self.db.connect() as db:
            return list(db.query(sql + " ORDER BY id", [user_id]))

    def update_note(self, *, user_id: int, note_id: int, text: str | None = None, active: bool | None = None) -> None:
        with self.db.write() as db:
            if db.execute("SELECT 1 FROM notes WHERE id = ? AND user_id = ?", [note_id, user_id]).fetchone() is None:
                raise NotFound(f"note {note_id} not found")
            if text is not None:
                if not text.strip():
                    raise StoreError("a note must not be empty")
                db.execute("UPDATE notes SET text = ? WHERE id = ? AND user_id = ?", [text.strip()[:500], note_id, user_id])
            if active is not None:
                db.execute("UPDATE notes SET active = ? WHERE id = ? AND user_id = ?", [int(active), note_id, user_id])

    def delete_note(self, *, user_id: int, note_id: int) -> None:
        with self.db.write() as db:
            if db.execute("DELETE FROM notes WHERE id = ? AND user_id = ?", [note_id, user_id]).rowcount == 0:
                raise NotFound(f"note {note_id} not found")
