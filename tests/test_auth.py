"""Authentication below the web app: password hashing, lockout, account deletion."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from heed.service import Heed
from heed.store import NotFound, Store, StoreError
from heed.store import passwords as pw


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "heed.db")


def _scrypt_counter(monkeypatch) -> list:
    calls: list = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("n"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pw.hashlib, "scrypt", counting)
    return calls


def test_passwords_are_scrypt_hashes_with_a_salt_per_user(store):
    store.add_user("alice", password="same password")
    store.add_user("bob", password="same password")
    with store.db.connect() as db:
        hashes = [r[0] for r in db.execute("SELECT password_hash FROM users ORDER BY id")]
    for h in hashes:
        scheme, n, r, p, salt, digest = h.split("$")
        assert scheme == "scrypt" and int(n) >= 2**14 and int(r) >= 8 and len(bytes.fromhex(salt)) >= 16
        assert "same password" not in h
    assert hashes[0].split("$")[4] != hashes[1].split("$")[4], "two users share a salt"
    assert hashes[0] != hashes[1]


def test_a_password_check_is_slow_on_purpose():
    stored = pw.hash_password("correct horse")
    t0 = time.perf_counter()
    assert pw.verify_password("correct horse", stored)
    assert not pw.verify_password("wrong horse", stored)
    assert (time.perf_counter() - t0) / 2 > 0.005, "a password check should cost milliseconds (scrypt), not microseconds"


def test_malformed_or_tampered_hashes_are_refused_without_crashing():
    for stored in ["", "plain", "scrypt$x$8$1$00$00", "scrypt$16384$8$1$zz$00", "md5$1$2$3$00$00",
                   "scrypt$1048576$32$16$00$00", "scrypt$3$8$1$00$00", "scrypt$16384$8$1$00$"]:
        assert pw.verify_password("anything", stored) is False
    assert pw.verify_password(None, pw.hash_password("x")) is False  # type: ignore[arg-type]


def test_unknown_names_cost_one_password_check_like_known_ones(store, monkeypatch):
    store.add_user("alice", password="right")
    pw.dummy_verify("warm")  # the dummy hash is made once, not per attempt
    calls = _scrypt_counter(monkeypatch)
    store.check_login("alice", "wrong", max_failures=5, lockout_seconds=60)
    known = len(calls)
    store.check_login("nobody", "wrong", max_failures=5, lockout_seconds=60)
    assert known == 1 and len(calls) - known == 1


def test_the_account_locks_after_repeated_failures_then_opens_again(tmp_path, tiny_model_path):
    from conftest import make_config

    heed = Heed(make_config(tmp_path, tiny_model_path, app={"login_max_failures": 3, "login_lockout_seconds": 1}))
    uid = heed.add_user("alice", "right-password")
    for _ in range(3):
        assert heed.authenticate("alice", "wrong") is None
    assert heed.authenticate("alice", "right-password") is None, "locked: even the right password must wait"
    assert heed.store.login_state(user_id=uid)["locked_until"] > time.time()
    time.sleep(1.1)
    assert heed.authenticate("alice", "right-password") == uid
    assert heed.store.login_state(user_id=uid)["failed_logins"] == 0


def test_a_success_resets_the_failure_count(store):
    uid = store.add_user("alice", password="right")
    for _ in range(5):
        # Two failures, then a success: never three in a row, so never locked.
        assert store.check_login("alice", "wrong", max_failures=3, lockout_seconds=60) is None
        assert store.check_login("alice", "wrong", max_failures=3, lockout_seconds=60) is None
        assert store.check_login("alice", "right", max_failures=3, lockout_seconds=60) == uid
    assert store.login_state(user_id=uid) == {"failed_logins": 0, "locked_until": 0}


def test_parallel_guesses_cannot_run_more_checks_than_the_limit(store, monkeypatch):
    store.add_user("alice", password="right")
    checks: list = []
    real = pw.verify_password

    def slow_verify(password, stored):
        checks.append(password)
        time.sleep(0.05)  # a slow KDF: many requests are in flight at once
        return real(password, stored)

    monkeypatch.setattr("heed.store.users.verify_password", slow_verify)
    threads = [threading.Thread(target=store.check_login, args=("alice", f"guess{i}"), kwargs={"max_failures": 3, "lockout_seconds": 60})
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(checks) <= 3, f"{len(checks)} guesses were checked with a limit of 3"
    assert store.check_login("alice", "right", max_failures=3, lockout_seconds=60) is None  # now locked


def test_odd_passwords_and_names(store):
    uid = store.add_user("alice", password="p\udc80ss \x00 ✓")
    assert store.check_login("alice", "p\udc80ss \x00 ✓", max_failures=5, lockout_seconds=60) == uid
    for bad in ["", "x" * 1025, None, 123]:
        with pytest.raises(StoreError):
            store.add_user("bob", password=bad)
    for bad in ["", "a b", "alice\n", "../etc", "x" * 65, None, 7, "<script>"]:
        with pytest.raises(StoreError):
            store.add_user(bad, password="pw")
    assert store.check_login(None, "pw", max_failures=5, lockout_seconds=60) is None  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.set_password(user_id=999, password="pw")


def test_changing_the_password_unlocks_and_old_password_stops_working(store):
    uid = store.add_user("alice", password="old")
    for _ in range(3):
        store.check_login("alice", "wrong", max_failures=3, lockout_seconds=600)
    store.set_password(user_id=uid, password="new")
    assert store.check_login("alice", "old", max_failures=3, lockout_seconds=600) is None
    assert store.check_login("alice", "new", max_failures=3, lockout_seconds=600) == uid


def test_user_delete_removes_every_row_and_the_adapters(tmp_path, tiny_model_path, shared_tiny_engine, capsys):
    import yaml
    from conftest import make_config
    from test_isolation_world import build_world, snapshot, user_tables

    from heed.cli import main

    config = make_config(tmp_path / "data", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0})
    heed = Heed(config, engine=shared_tiny_engine)
    w = build_world(heed)
    bob_before = snapshot(heed.store, w["bob"], config.adapters_path)
    assert (config.adapters_path / str(w["alice"])).is_dir()
    (tmp_path / "heed.yaml").write_text(yaml.safe_dump(config.to_dict()))
    learn_log = config.data_path / "logs" / f"learn-user{w['alice']}.log"  # what the web app's "learn now" writes
    learn_log.parent.mkdir(parents=True, exist_ok=True)
    learn_log.write_text("alice: promoted v1")
    assert main(["--config", str(tmp_path / "heed.yaml"), "user", "delete", "alice"]) == 0
    assert not learn_log.exists()
    assert "deleted" in capsys.readouterr().out
    gone = snapshot(heed.store, w["alice"], config.adapters_path)
    assert all(rows == [] for table, rows in gone.items() if table != "files"), gone
    assert len(user_tables(heed.store)) >= 8
    assert gone["files"] == {} and not (config.adapters_path / str(w["alice"])).exists()
    assert snapshot(heed.store, w["bob"], config.adapters_path) == bob_before
    assert heed.authenticate("alice", "alice-password-1") is None
    assert main(["--config", str(tmp_path / "heed.yaml"), "user", "delete", "alice"]) == 2
    assert "no user named" in capsys.readouterr().err


def test_a_new_user_never_gets_a_deleted_users_cached_adapter(tmp_path, tiny_model_path, shared_tiny_engine):
    """SQLite reuses the highest row id after a delete: a new account can get the id of a deleted one.
    The engine's adapter cache must not serve the deleted user's weights to the newcomer."""
    from conftest import make_config

    config = make_config(tmp_path / "data", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0})
    heed = Heed(config, engine=shared_tiny_engine)

    def trained_user(name: str, text: str):
        uid = heed.add_user(name, "pw")
        conv = heed.start_conversation(uid)
        reply = heed.chat(uid, conv, text).wait()
        heed.edit(uid, reply.message_id, text + " edited")
        assert heed.learn(uid)["status"] == "promoted"
        conv = heed.start_conversation(uid)
        heed.chat(uid, conv, "hello").wait()  # loads the adapter into the engine's cache
        return uid, heed.adapter_for(uid, conv)

    heed.add_user("admin", "pw")
    old_id, old_ref = trained_user("leaver", "one thing")
    heed.delete_user(old_id)
    new_id, new_ref = trained_user("newcomer", "another thing entirely")
    if new_id != old_id:
        pytest.skip("SQLite did not reuse the id this time")
    assert new_ref.key != old_ref.key, "the engine would serve the deleted user's cached adapter to the new user"


class _GradioApp:
    def __init__(self):
        self.tokens, self.cookie_id = {}, "cid"


def _guarded_status(guard, app, *, path="/config", token=None) -> int:
    import asyncio

    sent = []
    headers = [(b"cookie", f"access-token-cid={token}".encode())] if token else []
    scope = {"type": "http", "method": "POST" if path == "/login" else "GET", "path": path, "app": app,
             "query_string": b"", "headers": headers}

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"]


def test_a_login_from_before_a_password_change_ends_even_if_first_used_after_it():
    import time

    from chat_app.session_guard import SessionGuard

    changed = {"alice": 0.0}
    app = _GradioApp()
    issued = []

    async def gradio(scope, receive, send):
        headers = []
        if scope["path"] == "/login":  # Gradio's login: a new token in a cookie
            token = f"t{len(issued)}"
            issued.append(token)
            app.tokens[token] = "alice"
            headers = [(b"set-cookie", f"access-token-cid={token}; HttpOnly; Path=/".encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    guard = SessionGuard(gradio, credentials_changed_at=changed.get, recheck_seconds=0)
    assert _guarded_status(guard, app, path="/login") == 200  # logs in with the old password, waits
    time.sleep(0.01)
    changed["alice"] = time.time()  # `heed user passwd alice`
    time.sleep(0.01)
    assert _guarded_status(guard, app, token="t0") == 401
    assert "t0" not in app.tokens, "the old token must be forgotten, not just refused once"
    assert _guarded_status(guard, app, path="/login") == 200  # a login after the change works
    assert _guarded_status(guard, app, token="t1") == 200
    changed.pop("alice")  # the user is deleted
    assert _guarded_status(guard, app, token="t1") == 401
