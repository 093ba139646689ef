"""`heed backup` / `heed restore`: consistent while writes go on, and a restore gives the same state."""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml
from conftest import make_config

from heed.backup import BackupError, backup, restore
from heed.service import Heed

TABLES_SQL = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"


def dump(db_path: Path, *, strip_paths: bool = True) -> dict:
    """Every row of every table; adapter paths reduced to user/version (they move with a restore)."""
    conn = sqlite3.connect(str(db_path))
    try:
        out = {}
        for (table,) in conn.execute(TABLES_SQL).fetchall():
            cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            rows = [dict(zip(cols, r)) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]
            if strip_paths and table == "adapters":
                for r in rows:
                    r["path"] = "/".join(Path(r["path"]).parts[-2:])
            out[table] = rows
        return out
    finally:
        conn.close()


def _trained(heed: Heed, name: str, n: int) -> int:
    uid = heed.add_user(name, f"{name}-pw")
    conv = heed.start_conversation(uid)
    for i in range(n):
        reply = heed.chat(uid, conv, f"{name} asks {i}").wait()
        heed.edit(uid, reply.message_id, f"{name}'s better answer {i}")
    assert heed.learn(uid)["status"] == "promoted"
    return uid


@pytest.fixture(scope="module")
def populated(tmp_path_factory, tiny_model_path, shared_tiny_engine):
    config = make_config(tmp_path_factory.mktemp("backup") / "live", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0})
    heed = Heed(config, engine=shared_tiny_engine)
    alice = _trained(heed, "alice", 3)
    _trained(heed, "bob", 2)
    # A second version for alice: v1 retired, v2 active; a conversation bound to each.
    conv = heed.start_conversation(alice)
    reply = heed.chat(alice, conv, "one more").wait()
    heed.edit(alice, reply.message_id, "one more, better")
    assert heed.learn(alice)["status"] == "promoted"
    heed.add_note(alice, "keep it short")
    return heed


class Writer(threading.Thread):
    """Feedback and messages written as fast as the store takes them, each acknowledged id kept."""

    def __init__(self, heed: Heed) -> None:
        super().__init__(daemon=True)
        self.heed, self.stop, self.acked, self.errors = heed, threading.Event(), [], []
        self.uid = heed.add_user(f"writer{len(heed.store.list_users())}", "pw")
        self.conv = heed.start_conversation(self.uid)

    def run(self) -> None:
        store, i = self.heed.store, 0
        try:
            while not self.stop.is_set():
                mid = store.add_message(user_id=self.uid, conversation_id=self.conv, role="assistant", content=f"answer {i}")
                fid = self.heed.thumb(self.uid, mid, i % 2 == 0)
                self.acked.append((mid, fid))
                i += 1
        except Exception as exc:  # reported by the test
            self.errors.append(exc)


def test_backup_while_writes_go_on_is_a_consistent_snapshot(populated, tmp_path, record_property):
    heed = populated
    writer = Writer(heed)
    writer.start()
    try:
        results = []
        for n in range(3):
            while len(writer.acked) < 20 * (n + 1):
                threading.Event().wait(0.01)
            results.append((backup(heed, tmp_path / f"b{n}"), len(writer.acked)))
    finally:
        writer.stop.set()
        writer.join(10)
    assert writer.errors == [], writer.errors
    for info, _acked_after in results:
        dest = Path(info["dest"])
        assert info["integrity"] == "ok"
        conn = sqlite3.connect(str(dest / "heed.db"))
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        mids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE user_id = ? ORDER BY id", [writer.uid])]
        with_fb = {r[0] for r in conn.execute("SELECT message_id FROM feedback WHERE user_id = ?", [writer.uid])}
        conn.close()
        acked_mids = [m for m, _ in writer.acked]
        # One committed state: a prefix of the writer's sequence, never a message without the thumb that followed
        # it except possibly the very last one (written in its own transaction just before the snapshot).
        assert mids == acked_mids[:len(mids)] or mids == acked_mids[:len(mids) - 1] + [mids[-1]]
        assert set(mids[:-1]) <= with_fb
        assert len(mids) >= 20
    record_property("backups_during_writes", len(results))


def test_restore_gives_the_same_state_and_the_same_answers(populated, tmp_path, tiny_model_path, shared_tiny_engine):
    heed = populated
    info = backup(heed, tmp_path / "backup")
    assert info["adapter_files"] >= 6  # alice v1 + v2 and bob v1: config and weights each
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["rows"]["users"] == len(heed.store.list_users())

    config = make_config(tmp_path / "restored", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0})
    out = restore(tmp_path / "backup", config)
    assert out["integrity"] == "ok" and out["users"] == len(heed.store.list_users())
    assert dump(config.db_path) == dump(heed.config.db_path)
    again = Heed(config, engine=shared_tiny_engine)
    alice = again.user_id("alice")
    assert again.authenticate("alice", "alice-pw") == alice
    for a in again.store.list_adapters(user_id=alice):
        assert Path(a["path"]).is_relative_to(config.adapters_path), "restored rows must point at the restored files"
    # The same adapter answers the same way, from the restored files.
    conv_live, conv_restored = heed.start_conversation(alice), again.start_conversation(alice)
    assert again.adapter_for(alice, conv_restored).path != heed.adapter_for(alice, conv_live).path
    assert again.chat(alice, conv_restored, "hello there").wait().text == heed.chat(alice, conv_live, "hello there").wait().text
    # Rolling back to the retired version works from the restore too.
    again.rollback(alice, 1)
    assert again.store.active_adapter(user_id=alice)["version"] == 1


def test_restore_refuses_damaged_backups_and_occupied_targets(populated, tmp_path, tiny_model_path):
    heed = populated
    backup(heed, tmp_path / "b")
    with pytest.raises(BackupError, match="already holds"):
        restore(tmp_path / "b", heed.config)
    weights = next((tmp_path / "b" / "adapters").rglob("adapter_model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    target = make_config(tmp_path / "t", tiny_model_path)
    with pytest.raises(BackupError, match="does not match"):
        restore(tmp_path / "b", target)
    assert not target.db_path.exists(), "a refused restore must write nothing"
    with pytest.raises(BackupError, match="not a Heed backup"):
        restore(tmp_path, target)
    with pytest.raises(BackupError, match="not an empty folder"):
        backup(heed, tmp_path / "b")


def test_heed_backup_and_restore_commands(populated, tmp_path, tiny_model_path, capsys):
    from heed.cli import main

    heed = populated
    live = tmp_path / "live.yaml"
    live.write_text(yaml.safe_dump(heed.config.to_dict()))
    writer = Writer(heed)
    writer.start()
    try:
        while len(writer.acked) < 10:
            threading.Event().wait(0.01)
        assert main(["--config", str(live), "backup", str(tmp_path / "cli-backup")]) == 0
    finally:
        writer.stop.set()
        writer.join(10)
    printed = json.loads(capsys.readouterr().out)
    users = len(heed.store.list_users())
    assert printed["integrity"] == "ok" and printed["rows"]["users"] == users
    assert main(["--config", str(live), "backup", str(tmp_path / "cli-backup")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["--config", str(live), "--data-dir", str(tmp_path / "fresh"), "restore", str(tmp_path / "cli-backup")]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == users
    assert main(["--config", str(live), "--data-dir", str(tmp_path / "fresh"), "restore", str(tmp_path / "cli-backup")]) == 2
    assert "--force" in capsys.readouterr().err
