"""Store figures for `heed bench perf`: feedback writes per second and a user's queries at 1M rows.

Writes go through the service (``Heed.thumb``: ownership check + one short
IMMEDIATE transaction), beside raw sqlite3 inserts of the same rows with the
same pragmas. Queries are the learner's per-user reads, on a file with 1M
feedback rows (and as many pairs) spread over 10,000 users.
"""
from __future__ import annotations

import json
import random
import sqlite3
import statistics
import threading
import time
from pathlib import Path

USERS = 10_000


def _bulk(path: Path, sql: str, rows) -> None:
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _seed_users(path: Path, n_users: int, messages_per_user: int) -> list[tuple[int, list[int]]]:
    """Users, one conversation each, and assistant messages to vote on: [(user_id, [message ids])]."""
    t = time.time()
    _bulk(path, "INSERT INTO users (id, name, password_hash, created_at) VALUES (?, ?, 'x', ?)",
          [(u, f"bench{u}", t) for u in range(1, n_users + 1)])
    _bulk(path, "INSERT INTO conversations (id, user_id, title, created_at, updated_at) VALUES (?, ?, 'bench', ?, ?)",
          [(u, u, t, t) for u in range(1, n_users + 1)])
    rows, out = [], []
    mid = 0
    for u in range(1, n_users + 1):
        ids = []
        for pos in range(messages_per_user):
            mid += 1
            rows.append((mid, u, u, pos, "assistant", "An answer to vote on.", t))
            ids.append(mid)
        out.append((u, ids))
    _bulk(path, "INSERT INTO messages (id, conversation_id, user_id, position, role, content, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return out


def _race(n: int, work, seconds: float) -> float:
    """Run ``work(i, deadline)`` in n threads at once; return total completed calls per second."""
    counts = [0] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)

    def go(i):
        start.wait()
        try:
            counts[i] = work(i, deadline)
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    deadline = time.perf_counter() + seconds
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t)


def writes(config, *, seconds: float, runs: int) -> dict:
    from heed.service import Heed

    heed = Heed(config)
    per_user = 20_000
    users = _seed_users(config.db_path, 8, per_user)
    cursor = [0] * 8

    def service_work(i, deadline):
        uid, mids = users[i]
        n = 0
        # Round the user's answers again when they run out (a vote on a voted answer is an update: still a write).
        while time.perf_counter() < deadline:
            heed.thumb(uid, mids[cursor[i] % len(mids)], n % 2 == 0)
            cursor[i] += 1
            n += 1
        return n

    def raw_work(i, deadline):
        conn = sqlite3.connect(str(config.db_path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA synchronous = NORMAL")
        uid, mids = users[i]
        n = 0
        while time.perf_counter() < deadline:
            conn.execute("INSERT INTO feedback (user_id, conversation_id, message_id, kind, payload, created_at, updated_at) "
                         "VALUES (?, ?, ?, 'edit', '{\"up\": true}', 0, 0)", [uid, uid, mids[0]])
            n += 1
        conn.close()
        return n

    out: dict = {"feedback_writes_per_s": {}, "raw_sqlite_writes_per_s": {}, "feedback_writes_ratio": {}}
    # The store opens a connection per call; when the last one closes, SQLite checkpoints the WAL and
    # syncs. One idle connection held open shows what keeping a connection alive would give.
    keeper = sqlite3.connect(str(config.db_path))
    keeper.execute("SELECT 1 FROM users LIMIT 1").fetchall()
    out["feedback_writes_per_s_1_with_open_connection"] = round(statistics.median(
        [_race(1, service_work, seconds) for _ in range(runs)]), 1)
    keeper.close()
    for n in (1, 8):
        heed_rates = [_race(n, service_work, seconds) for _ in range(runs)]
        raw_rates = [_race(n, raw_work, seconds) for _ in range(runs)]
        out["feedback_writes_per_s"][str(n)] = round(statistics.median(heed_rates), 1)
        out["raw_sqlite_writes_per_s"][str(n)] = round(statistics.median(raw_rates), 1)
        out["feedback_writes_ratio"][str(n)] = round(statistics.median(heed_rates) / statistics.median(raw_rates), 3)
    return out


def build_big(path: Path, rows: int) -> None:
    """A store with ``rows`` feedback rows and as many pairs over 10,000 users; two unconsumed per user."""
    from heed.store import Store

    Store(path)
    per = max(rows // USERS, 1)
    _seed_users(path, USERS, 1)
    t = time.time()
    _bulk(path, "INSERT INTO learner_runs (id, user_id, status, started_at) VALUES (?, ?, 'promoted', ?)",
          [(u, u, t) for u in range(1, USERS + 1)])
    payload = json.dumps({"before": "An answer to vote on.", "after": "A better answer."})
    prompt = json.dumps([{"role": "user", "content": "How do I boil an egg?"}])

    def feedback():
        fid = 0
        for u in range(1, USERS + 1):
            for k in range(per):
                fid += 1
                yield (fid, u, u, u, "edit", payload, t, t, None if k >= per - 2 else u)

    _bulk(path, "INSERT INTO feedback (id, user_id, conversation_id, message_id, kind, payload, created_at, updated_at, consumed_run_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", feedback())

    def pairs():
        fid = 0
        for u in range(1, USERS + 1):
            for k in range(per):
                fid += 1
                yield (u, fid, u, "dpo", "edit", prompt, "A better answer.", "An answer.", "heldout" if k % 5 == 0 else "train", t)

    _bulk(path, "INSERT INTO pairs (user_id, feedback_id, run_id, kind, source, prompt, chosen, rejected, split, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", pairs())


def queries(path: Path, *, rows: int, runs: int) -> dict:
    """Median ms of the learner's reads for one user, and of the scheduler's scan, at ``rows`` feedback rows."""
    from heed.store import Store

    t = time.perf_counter()
    build_big(path, rows)
    built = time.perf_counter() - t
    store = Store(path)
    rng = random.Random(0)
    per_user, scan = [], []
    for _ in range(max(runs, 5)):
        uid = rng.randint(1, USERS)
        t = time.perf_counter()
        store.list_feedback(user_id=uid, unconsumed_only=True)
        store.list_feedback(user_id=uid)
        store.list_pairs(user_id=uid, split="train", promoted_only=True)
        store.list_pairs(user_id=uid, split="heldout")
        store.count_unconsumed(user_id=uid)
        per_user.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        store.users_with_unconsumed(at_least=1)
        scan.append(1000 * (time.perf_counter() - t))
    return {"feedback_rows": rows, "rows_per_user": rows // USERS, "store_build_s": round(built, 1),
            "pair_query_ms_1m": round(statistics.median(per_user), 2), "scheduler_scan_ms_1m": round(statistics.median(scan), 2)}
