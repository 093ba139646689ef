"""Faults: kill -9 the learner at every point of a run, kill a writer mid-stream, damage adapter files.

A learner run is a real child process killed with SIGKILL by its own fault hook
(learn_user's ``fault=`` points, and its progress callback for "mid-training").
After each kill: the old adapter is still active and served, the feedback the
killed run read is neither lost nor consumed, the database is intact, and the
next run completes.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_config

from heed.service import Heed

REPO = Path(__file__).resolve().parents[1]

LEARNER_FORKS = r"""
# A learner "fork server": the slow imports happen once, then each run is a fresh child process
# (os.fork) that kills itself with SIGKILL at the named point -- a real kill -9 of a learner process.
import json, os, signal, sys

import datasets, peft, torch, transformers  # noqa: F401 -- warm imports, shared by every child
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: F401

from heed.config import load_config
from heed.store import Store
from learner.run import learn_user

config = load_config(sys.argv[1])
print("READY", flush=True)
for line in sys.stdin:
    user, point = line.split()
    pid = os.fork()
    if pid == 0:
        seen = []

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        def fault(name):
            if name == point:
                die()

        def progress(stage, frac):
            seen.append(stage)
            # Mid-training: after the trainer has taken at least one optimizer step.
            if point == "mid_train" and stage == "train" and seen.count("train") >= 2:
                die()

        store = Store(config.db_path)
        result = learn_user(config, store, user_id=store.user_id(user), trigger="faulttest", fault=fault, progress=progress)
        print(json.dumps({"result": result}, default=str), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"point": point, "killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)
"""

KILL_POINTS = ["before_train", "mid_train", "before_save", "after_save", "before_rename", "before_commit"]


class LearnerForks:
    def __init__(self, config_file: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", LEARNER_FORKS, str(config_file)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout.readline().strip() == "READY"

    def run(self, user: str, point: str) -> dict:
        """Run the learner for ``user`` in a new child process killed at ``point``; returns how it ended."""
        self.proc.stdin.write(f"{user} {point}\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.proc.stdout.readline()
            assert line, "the learner fork server died"
            lines.append(json.loads(line))
            if "point" in lines[-1]:
                return {**lines[-1], "output": lines[:-1]}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _feedback_state(store, uid: int, ids: list[int]) -> dict[int, int | None]:
    with store.db.connect() as db:
        return {r[0]: r[1] for r in db.execute(
            f"SELECT id, consumed_run_id FROM feedback WHERE user_id = ? AND id IN ({','.join('?' * len(ids))})", [uid, *ids])}


def _pairs_per_feedback(store, uid: int) -> dict[int, int]:
    with store.db.connect() as db:
        return {r[0]: r[1] for r in db.execute("SELECT feedback_id, COUNT(*) FROM pairs WHERE user_id = ? GROUP BY feedback_id", [uid])}


def _edits(heed: Heed, uid: int, n: int, tag: str) -> list[int]:
    conv = heed.start_conversation(uid)
    ids = []
    for i in range(n):
        reply = heed.chat(uid, conv, f"{tag} question {i}").wait()
        ids.append(heed.edit(uid, reply.message_id, f"{tag} better answer number {i}."))
    return ids


def _served_version(heed: Heed, uid: int) -> int | None:
    conv = heed.start_conversation(uid)
    heed.chat(uid, conv, "which adapter answers me?").wait()  # the engine really loads and uses it
    ref = heed.adapter_for(uid, conv)
    return None if ref is None else int(Path(ref.path).name.lstrip("v"))


def _version_folders(heed: Heed, uid: int) -> list[str]:
    folder = heed.config.adapters_path / str(uid)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_kill_9_at_every_point_of_a_learner_run_loses_nothing(tmp_path, tiny_model_path, shared_tiny_engine, record_property):
    config = make_config(tmp_path / "data", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0, "epochs": 2})
    config_file = tmp_path / "heed.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    heed = Heed(config, engine=shared_tiny_engine)
    uid = heed.add_user("alice", "pw")
    _edits(heed, uid, 4, "first")
    assert heed.learn(uid)["status"] == "promoted"
    pairs_after_v1 = _pairs_per_feedback(heed.store, uid)
    new = _edits(heed, uid, 10, "second")  # enough pairs for several optimizer steps

    survived = []
    forks = LearnerForks(config_file)
    try:
        for point in KILL_POINTS:
            ended = forks.run("alice", point)
            assert ended["killed_by"] == signal.SIGKILL, f"{point}: the run did not reach its kill point: {ended['output']}"
            assert heed.store.integrity_check() == "ok"
            assert heed.store.active_adapter(user_id=uid)["version"] == 1, f"{point}: the active adapter changed"
            assert _served_version(heed, uid) == 1, f"{point}: the old adapter is not what is served"
            assert set(_feedback_state(heed.store, uid, new).values()) == {None}, f"{point}: feedback was consumed by a killed run"
            assert _pairs_per_feedback(heed.store, uid) == pairs_after_v1, f"{point}: a killed run stored pairs"
            survived.append(point)

        # Killed just after the promotion committed: the new adapter counts, its feedback is consumed exactly once.
        assert forks.run("alice", "after_commit")["killed_by"] == signal.SIGKILL
    finally:
        forks.close()
    active = heed.store.active_adapter(user_id=uid)
    assert active["version"] >= 2 and Path(active["path"]).is_dir()
    consumed_by = set(_feedback_state(heed.store, uid, new).values())
    assert len(consumed_by) == 1 and None not in consumed_by
    pairs_after_commit = _pairs_per_feedback(heed.store, uid)
    assert all(pairs_after_commit[f] >= 1 for f in new)
    survived.append("after_commit")

    # The next run completes, cleans up after the killed ones and counts nothing twice.
    latest = _edits(heed, uid, 2, "third")
    result = heed.learn(uid)
    assert result["status"] == "promoted", result
    assert set(_feedback_state(heed.store, uid, new).values()) == consumed_by, "old feedback was consumed again"
    after = _pairs_per_feedback(heed.store, uid)
    assert {f: after[f] for f in new} == {f: pairs_after_commit[f] for f in new}, "pairs were stored twice"
    assert None not in _feedback_state(heed.store, uid, latest).values()
    assert _served_version(heed, uid) == result["version"]
    rows = {Path(a["path"]).name for a in heed.store.list_adapters(user_id=uid) if a["status"] != "deleted"}
    assert set(_version_folders(heed, uid)) == rows, "temp or orphan folders of killed runs are left on disk"
    assert not [r for r in heed.store.list_runs(user_id=uid) if r["status"] == "running"]
    assert heed.store.integrity_check() == "ok"
    record_property("learner_kill_points_survived", survived)


WRITER = r"""
import sys, time
from heed.config import load_config
from heed.service import Heed

heed = Heed(load_config(sys.argv[1]))
uid = heed.user_id("alice")
conv = heed.start_conversation(uid)
answers = [heed.store.add_message(user_id=uid, conversation_id=conv, role="assistant", content=f"answer {i}") for i in range(50)]
print("READY", flush=True)
i = 0
while True:
    mid = answers[i % len(answers)]
    kind = i % 4
    if kind == 0:
        fid = heed.thumb(uid, mid, bool(i % 3))
    elif kind == 1:
        fid = heed.edit(uid, mid, f"edit {i}")
    elif kind == 2:
        fid = heed.add_note(uid, f"note {i}")
        print(f"NOTE {fid} note {i}", flush=True)
        i += 1
        continue
    else:
        fid = heed.store.add_message(user_id=uid, conversation_id=conv, role="user", content=f"message {i}")
        print(f"MSG {fid} message {i}", flush=True)
        i += 1
        continue
    print(f"FB {fid} {i}", flush=True)
    i += 1
"""


def test_kill_9_while_writing_keeps_every_acknowledged_write(tmp_path, tiny_model_path, record_property):
    config = make_config(tmp_path / "data", tiny_model_path)
    config_file = tmp_path / "heed.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    Heed(config).add_user("alice", "pw")
    acked: list[str] = []
    for _round in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(config_file)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == "READY"
        deadline = time.time() + 0.6 + 0.3 * _round
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line:
                acked.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        acked += [ln for ln in rest.splitlines() if ln.strip()]  # printed (so acknowledged) before the kill
        assert proc.returncode == -signal.SIGKILL
    heed = Heed(config)
    assert heed.store.integrity_check() == "ok"
    uid = heed.user_id("alice")
    fb_ids = {f["id"] for f in heed.store.list_feedback(user_id=uid)}
    notes = {n["id"]: n["text"] for n in heed.notes(uid)}
    with heed.store.db.connect() as db:
        messages = {r[0]: r[1] for r in db.execute("SELECT id, content FROM messages WHERE user_id = ?", [uid])}
    missing = []
    for line in acked:
        kind, ident, *text = line.split(" ", 2)
        if kind == "FB" and int(ident) not in fb_ids:
            missing.append(line)
        elif kind == "NOTE" and notes.get(int(ident)) != " ".join(text):
            missing.append(line)
        elif kind == "MSG" and messages.get(int(ident)) != " ".join(text):
            missing.append(line)
    assert len(acked) > 30, "the writer did not get going"
    assert missing == [], f"acknowledged writes lost after kill -9: {missing[:5]}"
    record_property("writer_kills", 3)
    record_property("acknowledged_writes_checked", len(acked))


# -- damaged adapter files ---------------------------------------------------------------------------------
@pytest.fixture
def fresh_engine(tiny_model_path, tmp_path):
    """An engine of its own: a failed adapter load must not be able to spoil the shared one."""
    from heed.engine import Engine

    return Engine.load(make_config(tmp_path / "engine", tiny_model_path))


def _user_with_adapter(heed: Heed, name: str) -> tuple[int, int, Path]:
    uid = heed.add_user(name, "pw")
    _edits(heed, uid, 3, name)
    result = heed.learn(uid)
    assert result["status"] == "promoted", result
    conv = heed.start_conversation(uid)
    return uid, conv, Path(heed.store.active_adapter(user_id=uid)["path"])


DAMAGE = {
    "weights_garbage": lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100),
    "weights_truncated": lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:200]),
    "weights_missing": lambda p: (p / "adapter_model.safetensors").unlink(),
    "config_garbage": lambda p: (p / "adapter_config.json").write_text("{not json"),
    "folder_missing": lambda p: __import__("shutil").rmtree(p),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_adapter_falls_back_to_the_base_model_and_says_why(damage, tmp_path, tiny_model_path, fresh_engine, caplog,
                                                                     record_property):
    config = make_config(tmp_path / "data", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0})
    heed = Heed(config, engine=fresh_engine)
    base_conv_user = heed.add_user("nobody", "pw")
    base_answer = heed.chat(base_conv_user, heed.start_conversation(base_conv_user), "Tell me something.").wait().text
    uid, conv, folder = _user_with_adapter(heed, "alice")
    other, other_conv, _ = _user_with_adapter(heed, "bob")
    DAMAGE[damage](folder)
    with caplog.at_level(logging.WARNING):
        reply = heed.chat(uid, conv, "Tell me something.").wait()
    assert reply.message_id is not None and not reply.stopped
    assert reply.text == base_answer, "the damaged adapter's user should get the base model's answer"
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "base model" in warnings and ("alice" in warnings or f"{uid}" in warnings), warnings
    # Nothing else is spoiled: another user's adapter still loads, the base answer is unchanged.
    assert heed.chat(other, other_conv, "Tell me something.").wait().message_id is not None
    assert heed.chat(base_conv_user, heed.start_conversation(base_conv_user), "Tell me something.").wait().text == base_answer
    assert heed.store.active_adapter(user_id=uid)["path"] == str(folder)
    record_property("adapter_damage_survived", damage)


def test_kill_9_of_the_web_server_mid_write_keeps_every_acknowledged_event(tmp_path, tiny_model_path, record_property):
    import threading

    from bench.load import GradioClient, free_port, start_server, stop_server

    config = make_config(tmp_path / "data", tiny_model_path, app={"port": free_port()})
    config_file = tmp_path / "heed.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    heed = Heed(config)
    names = [f"user{i}" for i in range(4)]
    for n in names:
        heed.add_user(n, f"{n}-pw")
    proc, url = start_server(config_file, log_path=tmp_path / "serve.log")
    acked: list[str] = []
    go = threading.Event()

    def writer(name: str) -> None:
        client = GradioClient(url, timeout=30)
        try:
            client.login(name, f"{name}-pw")
            client.call("page_load")
            client.call("chat_send", [None, "a question"])
            go.set()
            for k in range(10_000):
                text = f"{name} rewrite {k}"
                r = client.call("chat_edit", [None], event_data={"index": 1, "value": text, "previous_value": None})
                if r.ok:
                    acked.append(text)
        except Exception:  # the server vanishing mid-request is the point of this test
            return
        finally:
            client.close()

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    go.wait(60)
    deadline = time.time() + 30
    while len(acked) < 40 and time.time() < deadline:
        time.sleep(0.05)
    stop_server(proc, kill=True)
    for t in threads:
        t.join(30)
    assert proc.returncode == -signal.SIGKILL
    store = Heed(config).store
    assert store.integrity_check() == "ok"
    with store.db.connect() as db:
        stored = {json.loads(r[0])["after"] for r in db.execute("SELECT payload FROM feedback WHERE kind = 'edit'")}
    missing = [a for a in acked if a not in stored]
    assert len(acked) >= 40 and missing == [], f"{len(missing)} acknowledged edits lost: {missing[:3]}"
    record_property("server_kill_acknowledged_events_checked", len(acked))
