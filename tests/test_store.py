import sqlite3
import threading

import pytest

from heed.store import NotFound, Store, StoreError


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "heed.db")


def test_schema_is_versioned_and_reopening_is_a_no_op(tmp_path):
    Store(tmp_path / "heed.db")
    again = Store(tmp_path / "heed.db")
    with again.db.connect() as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "heed.db"
    Store(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_passwords_are_salted_hashes(store):
    store.add_user("alice", password="same")
    store.add_user("bob", password="same")
    with store.db.connect() as db:
        hashes = [r[0] for r in db.execute("SELECT password_hash FROM users")]
    assert hashes[0] != hashes[1]
    assert all(h.startswith("scrypt$") and "same" not in h for h in hashes)


def test_login_locks_after_repeated_failures(store):
    uid = store.add_user("alice", password="right")
    for _ in range(3):
        assert store.check_login("alice", "wrong", max_failures=3, lockout_seconds=60) is None
    # Locked: even the right password is refused for a while.
    assert store.check_login("alice", "right", max_failures=3, lockout_seconds=60) is None
    with store.db.write() as db:
        db.execute("UPDATE users SET locked_until = 0")
    assert store.check_login("alice", "right", max_failures=3, lockout_seconds=60) == uid


def test_reads_are_scoped_to_the_user(store):
    a = store.add_user("alice", password="x")
    b = store.add_user("bob", password="x")
    conv = store.create_conversation(user_id=a)
    mid = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="secret of alice")
    with pytest.raises(NotFound):
        store.get_message(user_id=b, message_id=mid)
    with pytest.raises(NotFound):
        store.history(user_id=b, conversation_id=conv)
    with pytest.raises(NotFound):
        store.add_message(user_id=b, conversation_id=conv, role="user", content="hi")
    with pytest.raises(NotFound):
        store.record_feedback(user_id=b, kind="thumb", message_id=mid, payload={"up": False})
    assert store.list_conversations(user_id=b) == []
    assert store.list_feedback(user_id=a) == []


def test_one_thumb_per_answer_and_a_changed_vote_is_unconsumed_again(store):
    a = store.add_user("alice", password="x")
    conv = store.create_conversation(user_id=a)
    mid = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="answer")
    first = store.record_feedback(user_id=a, kind="thumb", message_id=mid, payload={"up": True})
    second = store.record_feedback(user_id=a, kind="thumb", message_id=mid, payload={"up": False})
    rows = store.list_feedback(user_id=a)
    assert first == second and len(rows) == 1 and rows[0]["payload"] == {"up": False}


def test_deleting_a_conversation_removes_its_messages_and_feedback(store):
    a = store.add_user("alice", password="x")
    conv = store.create_conversation(user_id=a)
    mid = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="answer")
    store.record_feedback(user_id=a, kind="thumb", message_id=mid, payload={"up": True})
    store.delete_conversation(user_id=a, conversation_id=conv)
    assert store.list_feedback(user_id=a) == []
    with pytest.raises(NotFound):
        store.record_feedback(user_id=a, kind="thumb", message_id=mid, payload={"up": True})


def test_concurrent_writers_lose_nothing(store):
    a = store.add_user("alice", password="x")
    conv = store.create_conversation(user_id=a)
    errors = []

    def write(n):
        try:
            for i in range(25):
                store.add_message(user_id=a, conversation_id=conv, role="user", content=f"w{n}-{i}")
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.history(user_id=a, conversation_id=conv)) == 200
    assert store.integrity_check() == "ok"


def test_an_edit_is_one_transaction_that_keeps_the_original(store):
    a = store.add_user("alice", password="x")
    conv = store.create_conversation(user_id=a)
    mid = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="first answer")
    store.record_edit(user_id=a, message_id=mid, content="second")
    store.record_edit(user_id=a, message_id=mid, content="third")
    edits = [f["payload"] for f in store.list_feedback(user_id=a, kind="edit")]
    assert edits == [{"before": "first answer", "after": "second"}, {"before": "second", "after": "third"}]
    msg = store.get_message(user_id=a, message_id=mid)
    assert msg["content"] == "third" and msg["original_content"] == "first answer"


def test_a_failed_edit_writes_nothing(store):
    a = store.add_user("alice", password="x")
    b = store.add_user("bob", password="x")
    conv = store.create_conversation(user_id=a)
    question = store.add_message(user_id=a, conversation_id=conv, role="user", content="q")
    answer = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="a")
    with pytest.raises(StoreError):
        store.record_edit(user_id=a, message_id=question, content="changed")
    with pytest.raises(NotFound):
        store.record_edit(user_id=b, message_id=answer, content="hijacked")
    assert store.list_feedback(user_id=a) == []
    assert [m["content"] for m in store.history(user_id=a, conversation_id=conv)] == ["q", "a"]


def _chat(store, user):
    conv = store.create_conversation(user_id=user)
    store.add_message(user_id=user, conversation_id=conv, role="user", content="q")
    answer = store.add_message(user_id=user, conversation_id=conv, role="assistant", content="long answer")
    store.add_message(user_id=user, conversation_id=conv, role="user", content="follow-up")
    return conv, answer


def test_a_correction_replaces_the_answer_and_branches_in_one_transaction(store):
    a = store.add_user("alice", password="x")
    conv, answer = _chat(store, a)
    new_id, fid = store.record_correction(user_id=a, message_id=answer, instruction="shorter please", content="short")
    assert [m["content"] for m in store.history(user_id=a, conversation_id=conv)] == ["q", "short"]
    (fb,) = store.list_feedback(user_id=a, kind="correction")
    assert fb["id"] == fid and fb["message_id"] == new_id
    assert fb["payload"] == {"instruction": "shorter please", "original_message_id": answer, "before": "long answer", "after": "short"}


def test_a_crash_inside_a_correction_leaves_the_old_answer_and_no_feedback(store, monkeypatch):
    import heed.store.feedback as feedback

    a = store.add_user("alice", password="x")
    conv, answer = _chat(store, a)

    def boom(_):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(feedback, "dumps", boom)
    with pytest.raises(RuntimeError):
        store.record_correction(user_id=a, message_id=answer, instruction="shorter", content="short")
    assert [m["content"] for m in store.history(user_id=a, conversation_id=conv)] == ["q", "long answer", "follow-up"]
    assert store.list_feedback(user_id=a) == []


def test_another_users_answer_cannot_be_corrected_or_picked(store):
    a = store.add_user("alice", password="x")
    b = store.add_user("bob", password="x")
    conv, answer = _chat(store, a)
    other = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="alt", status="alternative", position=1)
    with pytest.raises(NotFound):
        store.record_correction(user_id=b, message_id=answer, instruction="x", content="y")
    with pytest.raises(NotFound):
        store.record_choice(user_id=b, chosen_id=other, rejected_id=answer)
    assert store.list_feedback(user_id=a) == [] and store.list_feedback(user_id=b) == []


def test_a_pick_flips_both_answers_and_records_the_pair_together(store):
    a = store.add_user("alice", password="x")
    conv, answer = _chat(store, a)
    alt = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="alt", status="alternative", position=1)
    store.record_choice(user_id=a, chosen_id=alt, rejected_id=answer)
    assert store.get_message(user_id=a, message_id=alt)["status"] == "active"
    assert store.get_message(user_id=a, message_id=answer)["status"] == "alternative"
    (fb,) = store.list_feedback(user_id=a, kind="comparison")
    assert fb["payload"]["chosen"] == "alt" and fb["payload"]["rejected"] == "long answer"
    with pytest.raises(StoreError):
        store.record_choice(user_id=a, chosen_id=alt, rejected_id=alt)


def test_a_correction_of_an_answer_replaced_meanwhile_is_refused_and_changes_nothing(store):
    a = store.add_user("alice", password="x")
    conv, answer = _chat(store, a)
    store.record_correction(user_id=a, message_id=answer, instruction="shorter", content="c1")  # another tab, first
    before = store.history(user_id=a, conversation_id=conv, include_inactive=True)
    with pytest.raises(StoreError, match="replaced"):
        store.record_correction(user_id=a, message_id=answer, instruction="bullets", content="c2")
    assert store.history(user_id=a, conversation_id=conv, include_inactive=True) == before
    assert len(store.list_feedback(user_id=a, kind="correction")) == 1


def test_a_correction_of_an_undone_answer_does_not_rejoin_the_new_branch(store):
    a = store.add_user("alice", password="x")
    conv, answer = _chat(store, a)
    store.truncate_after(user_id=a, conversation_id=conv, position=0)  # undo in another tab, then a new turn
    store.add_message(user_id=a, conversation_id=conv, role="assistant", content="new a")
    with pytest.raises(StoreError):
        store.record_correction(user_id=a, message_id=answer, instruction="shorter", content="c1")
    assert [m["content"] for m in store.history(user_id=a, conversation_id=conv)] == ["q", "new a"]


def test_a_pick_between_answers_that_changed_meanwhile_is_refused(store):
    a = store.add_user("alice", password="x")
    conv, answer = _chat(store, a)
    alt = store.add_message(user_id=a, conversation_id=conv, role="assistant", content="alt", status="alternative", position=1)
    store.record_correction(user_id=a, message_id=answer, instruction="shorter", content="c1")  # another tab
    with pytest.raises(StoreError, match="no longer"):
        store.record_choice(user_id=a, chosen_id=alt, rejected_id=answer)
    assert [m["content"] for m in store.history(user_id=a, conversation_id=conv)] == ["q", "c1"]


def test_an_older_store_learns_that_picks_are_only_preferred(tmp_path):
    from heed.store.schema import MIGRATIONS

    path = tmp_path / "heed.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        for statement in script.split(";\n"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO users (name, password_hash, created_at) VALUES ('alice', 'x', 0)")
    for source in ("comparison", "edit"):
        conn.execute("INSERT INTO pairs (user_id, kind, source, prompt, chosen, rejected, split, created_at) "
                     "VALUES (1, 'dpo', ?, '[]', 'a', 'b', 'train', 0)", [source])
    conn.commit()
    conn.close()
    pairs = Store(path).list_pairs(user_id=1, kind="dpo")
    assert {p["source"]: p["imitate"] for p in pairs} == {"comparison": 0, "edit": 1}
