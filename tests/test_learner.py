"""Learner runs on the tiny model: incremental training, run records, crash safety, leases, versions."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from learner_util import ask, edit_answers, files_digest, learner_config, service, thumb_answers

from learner.run import learn_user, sweep_leftovers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def h(tmp_path, tiny_model_path, shared_tiny_engine):
    return service(learner_config(tmp_path, tiny_model_path), shared_tiny_engine)


def learn(h, uid, **kw):
    return learn_user(h.config, h.store, user_id=uid, **kw)


def crash_at(point):
    def fault(step):
        if step == point:
            raise RuntimeError(f"simulated crash at {step}")
    return fault


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_incremental_run_changes_the_adapter_and_never_the_base_weights(h, tiny_model_path):
    base_before = files_digest(tiny_model_path)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 6)
    first = learn(h, uid)
    assert first["status"] == "promoted", first
    v1 = h.store.active_adapter(user_id=uid)
    v1_digest = files_digest(v1["path"])
    edit_answers(h, uid, ["Thanks for asking."] * 6)
    second = learn(h, uid)
    assert second["status"] == "promoted", second
    v2 = h.store.active_adapter(user_id=uid)
    assert v2["version"] == v1["version"] + 1
    assert v2["metrics"]["continued_from"] == v1["path"]  # trained on top of v1, not from scratch
    t1, t2 = adapter_tensors(v1["path"]), adapter_tensors(v2["path"])
    assert t1.keys() == t2.keys() and all("lora_" in k for k in t2)  # only adapter weights are saved
    assert any(not (t1[k] == t2[k]).all() for k in t1)
    assert files_digest(v1["path"]) == v1_digest  # the previous version is left as it was
    assert files_digest(tiny_model_path) == base_before


def test_adapter_is_saved_in_the_peft_safetensors_layout_and_loads(h):
    from peft import PeftModel

    from heed.engine import load_base

    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    assert learn(h, uid)["status"] == "promoted"
    folder = Path(h.store.active_adapter(user_id=uid)["path"])
    assert folder.name == "v0001" and folder.parent.name == str(uid)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not {"trainer", "ref", "tokenizer.json"} & names
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model, _ = load_base(h.config)
    PeftModel.from_pretrained(model, str(folder))


def test_every_run_is_a_learner_runs_row_with_metrics_and_timing(h):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    assert learn(h, uid, fault=crash_at("before_train"))["status"] == "failed"
    assert learn(h, uid)["status"] == "promoted"
    runs = {r["status"]: r for r in h.store.list_runs(user_id=uid)}
    assert set(runs) == {"failed", "promoted"}
    failed, promoted = runs["failed"], runs["promoted"]
    assert "simulated crash" in failed["error"] and failed["seconds"] > 0 and failed["metrics"]["n_feedback"] == 4
    assert promoted["seconds"] > 0 and promoted["candidate_version"] == 1 and promoted["n_feedback"] == 4
    m = promoted["metrics"]
    assert m["train_s"] > 0 and m["gate_s"] > 0 and m["dpo_steps"] > 0
    assert {"degenerate_candidate", "kl_from_base", "heldout_logp_gain", "implicit_reward_accuracy"} <= set(m["gate"])


@pytest.mark.parametrize("point", ["before_train", "before_save", "after_save", "before_rename", "before_commit"])
def test_a_crash_at_each_step_keeps_the_old_adapter_and_the_feedback(h, point):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    assert learn(h, uid)["status"] == "promoted"
    edit_answers(h, uid, ["Thanks for asking."] * 4)
    crashed = learn(h, uid, fault=crash_at(point))
    assert crashed["status"] == "failed" and point in crashed["error"]
    assert h.store.active_adapter(user_id=uid)["version"] == 1
    assert h.store.count_unconsumed(user_id=uid) == 4
    assert sorted(p.name for p in (h.config.adapters_path / str(uid)).iterdir()) == ["v0001"]
    assert h.store.lease_of(user_id=uid) is None
    again = learn(h, uid)
    assert again["status"] == "promoted" and again["version"] == 2 and again["n_feedback"] == 4
    assert h.store.count_unconsumed(user_id=uid) == 0


def test_a_failure_after_the_transaction_keeps_the_promotion(h):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    result = learn(h, uid, fault=crash_at("after_commit"))
    assert result["status"] == "promoted" and "after_commit" in result["error"]
    assert h.store.active_adapter(user_id=uid)["version"] == 1
    assert h.store.list_runs(user_id=uid)[0]["status"] == "promoted"
    assert h.store.count_unconsumed(user_id=uid) == 0


CRASH_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from learner_util import learner_config
from heed.store import Store
from learner.run import learn_user
config = learner_config(__import__("pathlib").Path({tmp!r}), __import__("pathlib").Path({model!r}))
store = Store(config.db_path)
def fault(step):
    if step == {point!r}:
        os._exit(3)  # a kill: no exception handler, no finally, the lease stays behind
learn_user(config, store, user_id={uid}, fault=fault)
"""


def test_a_run_killed_between_rename_and_commit_leaves_no_trace_and_the_next_run_completes(tmp_path, tiny_model_path, shared_tiny_engine):
    point = "before_commit"  # the adapter's files are in their final place, the transaction never ran
    config = learner_config(tmp_path, tiny_model_path)
    h = service(config, shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    script = CRASH_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path), model=str(tiny_model_path), point=point, uid=uid)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert h.store.active_adapter(user_id=uid) is None
    assert h.store.count_unconsumed(user_id=uid) == 4
    assert h.store.lease_of(user_id=uid) is not None  # the dead run's lease is still there...
    assert h.store.list_runs(user_id=uid)[0]["status"] == "running"
    result = learn(h, uid)  # ...and is taken over at once: the holder process is gone
    assert result["status"] == "promoted", result
    statuses = [r["status"] for r in h.store.list_runs(user_id=uid)]
    assert statuses == ["promoted", "failed"]
    assert sorted(p.name for p in (config.adapters_path / str(uid)).iterdir()) == ["v0001"]


def test_two_concurrent_runs_for_one_user_one_is_refused(h):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    inside, release = threading.Event(), threading.Event()
    results = {}

    def slow(step):
        if step == "before_train":
            inside.set()
            release.wait(60)

    worker = threading.Thread(target=lambda: results.setdefault("first", learn(h, uid, fault=slow)))
    worker.start()
    assert inside.wait(60)
    second = learn(h, uid, trigger="ui")
    release.set()
    worker.join(120)
    assert second["status"] == "busy"
    assert results["first"]["status"] == "promoted"
    assert len(h.store.list_runs(user_id=uid)) == 1


def test_a_lease_is_taken_over_only_from_a_dead_process(h):
    uid = h.add_user("alice", "pw")
    import os
    import socket

    live = f"schedule-pid{os.getppid()}-abc@{socket.gethostname()}"
    assert h.store.acquire_lease(user_id=uid, holder=live, seconds=600)
    assert not h.store.acquire_lease(user_id=uid, holder=h.store.new_lease_holder("cli"), seconds=600)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    h.store.release_lease(user_id=uid, holder=live)
    assert h.store.acquire_lease(user_id=uid, holder=f"schedule-pid{dead}-abc@{socket.gethostname()}", seconds=600)
    mine = h.store.new_lease_holder("cli")
    assert h.store.acquire_lease(user_id=uid, holder=mine, seconds=600)
    assert h.store.lease_of(user_id=uid)["holder"] == mine
    other_host = "schedule-pid1-abc@elsewhere"
    h.store.release_lease(user_id=uid, holder=mine)
    assert h.store.acquire_lease(user_id=uid, holder=other_host, seconds=600)
    assert not h.store.acquire_lease(user_id=uid, holder=mine, seconds=600)  # cannot tell: wait for expiry


def test_versions_beyond_keep_versions_are_pruned_and_rollback_works(tmp_path, tiny_model_path, shared_tiny_engine, capsys):
    import yaml

    from heed.cli import main

    config = learner_config(tmp_path, tiny_model_path, keep_versions=2)
    h = service(config, shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    for i in range(3):
        edit_answers(h, uid, [f"Answer number {i}."] * 2)
        assert learn(h, uid)["status"] == "promoted"
    rows = {a["version"]: a for a in h.store.list_adapters(user_id=uid)}
    assert rows[1]["status"] == "deleted" and not Path(rows[1]["path"]).exists()
    assert rows[2]["status"] == "retired" and rows[3]["status"] == "active"
    cfg_file = tmp_path / "heed.yaml"
    cfg_file.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["--config", str(cfg_file), "adapters", "list", "--user", "alice"]) == 0
    listing = capsys.readouterr().out
    assert "v3" in listing and "active" in listing and "v2" in listing
    assert main(["--config", str(cfg_file), "adapters", "rollback", "--user", "alice"]) == 0
    assert h.store.active_adapter(user_id=uid)["version"] == 2
    new_conv = h.start_conversation(uid)
    assert h.adapter_for(uid, new_conv).path == rows[2]["path"]
    assert main(["--config", str(cfg_file), "adapters", "rollback", "--user", "alice", "--version", "1"]) == 2  # pruned
    assert main(["--config", str(cfg_file), "adapters", "rollback", "--user", "alice"]) == 0  # v1 is gone: the base model
    assert h.store.active_adapter(user_id=uid) is None
    assert main(["--config", str(cfg_file), "adapters", "rollback", "--user", "alice", "--version", "3"]) == 0
    assert h.store.active_adapter(user_id=uid)["version"] == 3


def test_stale_temp_folders_are_cleaned_on_start_but_not_a_live_runs(h):
    alice, bob = h.add_user("alice", "pw"), h.add_user("bob", "pw")
    edit_answers(h, alice, ["Brief answers are good."] * 2)
    assert learn(h, alice)["status"] == "promoted"
    folder = h.config.adapters_path / str(alice)
    (folder / ".tmp-v0002-dead").mkdir()
    (folder / "v0007").mkdir()  # renamed into place by a run killed before its transaction
    bob_tmp = h.config.adapters_path / str(bob) / ".tmp-v0001-live"
    bob_tmp.mkdir(parents=True)
    assert h.store.acquire_lease(user_id=bob, holder=h.store.new_lease_holder("cli"), seconds=600)
    removed = sweep_leftovers(h.config, h.store)
    assert sorted(removed[alice]) == [".tmp-v0002-dead", "v0007"]
    assert sorted(p.name for p in folder.iterdir()) == ["v0001"]
    assert bob_tmp.is_dir()


def test_unpaired_thumbs_train_with_kto(tmp_path, tiny_model_path):
    config = learner_config(tmp_path, tiny_model_path)
    config.generation.do_sample = True  # distinct answers to vote on
    h = service(config)
    uid = h.add_user("alice", "pw")
    thumb_answers(h, uid, [True, False, True, False, True])
    result = learn(h, uid)
    assert result["status"] in ("promoted", "rejected"), result
    m = h.store.list_runs(user_id=uid)[0]["metrics"]
    assert m["dpo_rows"] == 0 and m["kto_rows"] >= 2 and m["kto_steps"] > 0 and m["phases"] == ["kto"]


def test_a_kto_pass_of_only_good_answers_trains_without_trls_balance_warning(tmp_path, tiny_model_path, caplog):
    import logging

    config = learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0, gate_enabled=False, praise_alone_trains=True)
    config.generation.do_sample = True
    h = service(config)
    uid = h.add_user("alice", "pw")
    thumb_answers(h, uid, [True] * 3)
    with caplog.at_level(logging.WARNING):
        assert learn(h, uid)["status"] == "promoted"
    m = h.store.list_runs(user_id=uid)[0]["metrics"]
    assert m["kto_rows"] == 3 and m["kto_steps"] > 0
    assert not [r for r in caplog.records if "ideal range" in r.getMessage()]


def _thumbs_wait_then_train_with_an_edit(h, votes: list[bool], reason: str) -> dict:
    """Vote on answers, see the run skipped for ``reason`` with the votes kept; then one edit trains. The run's metrics."""
    uid = h.add_user("alice", "pw")
    thumb_answers(h, uid, votes)
    result = learn(h, uid)
    assert result["status"] == "skipped" and reason in result["reason"]
    assert h.store.count_unconsumed(user_id=uid) == len(votes) and h.store.active_adapter(user_id=uid) is None
    edit_answers(h, uid, ["Brief answers are good."])
    result = learn(h, uid)
    assert result["status"] in ("promoted", "rejected") and result["n_feedback"] == len(votes) + 1
    if not h.config.learner.gate_enabled:
        assert result["status"] == "promoted" and h.store.count_unconsumed(user_id=uid) == 0, "the votes went with the run"
    return h.store.list_runs(user_id=uid)[0]["metrics"]


def test_praise_alone_waits_for_a_run_with_something_to_fix(tmp_path, tiny_model_path, shared_tiny_engine):
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0), shared_tiny_engine)
    m = _thumbs_wait_then_train_with_an_edit(h, [True] * 3, "only approves answers")
    assert m["kto_rows"] == 3 and m["dpo_rows"] >= 1, "the praise trains beside the edit"


def test_with_unpaired_none_lone_thumbs_wait_and_never_train(tmp_path, tiny_model_path, shared_tiny_engine):
    config = learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0, gate_enabled=False, unpaired="none")
    m = _thumbs_wait_then_train_with_an_edit(service(config, shared_tiny_engine), [True, False, True], "learner.unpaired is 'none'")
    assert m["kto_rows"] == 0 and m["dpo_rows"] >= 1 and m["phases"] == ["dpo"]


def test_kto_trains_before_dpo_so_the_sft_anchored_pass_comes_last(tmp_path, tiny_model_path):
    config = learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0)
    config.generation.do_sample = True
    h = service(config)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 2)
    for i, up in enumerate([True, False]):
        _, mid = ask(h, uid, f"vote {i}")
        h.thumb(uid, mid, up)
    assert learn(h, uid)["status"] in ("promoted", "rejected")
    assert h.store.list_runs(user_id=uid)[0]["metrics"]["phases"] == ["kto", "dpo"]


def test_a_pick_trains_by_dpo_alone_before_the_sft_anchored_pass(tmp_path, tiny_model_path):
    from dataclasses import replace

    from learner.train import train_adapter

    q = [{"role": "user", "content": "q"}]
    edit = {"prompt": q, "chosen": "Short.", "rejected": "Long and winding.", "imitate": True}
    pick = {"prompt": q, "chosen": "A ninety-word answer that was only the better of two.", "rejected": "Worse.", "imitate": False}
    config = learner_config(tmp_path, tiny_model_path, epochs=1, batch_size=2, min_steps=0, dtype="float32")
    endorsed = train_adapter(config, init_adapter=None, dpo_pairs=[edit, pick], kto_examples=[], out_dir=tmp_path / "endorsed")
    assert endorsed["phases"] == ["prefer", "dpo"] and endorsed["prefer_rows"] == endorsed["dpo_rows"] == 1
    # The DPO term alone starts at log 2 (policy = reference); with the SFT term the loss adds the chosen answer's NLL.
    assert endorsed["prefer_losses"][0] == pytest.approx(0.6931, abs=1e-3) and endorsed["dpo_losses"][0] > 1.0
    every = replace(config, learner=replace(config.learner, imitate="all"))
    assert train_adapter(every, init_adapter=None, dpo_pairs=[edit, pick], kto_examples=[], out_dir=tmp_path / "all")["phases"] == ["dpo"]


def test_thumbs_down_alone_do_not_train(h):
    uid = h.add_user("alice", "pw")
    thumb_answers(h, uid, [False] * 3)
    result = learn(h, uid)
    assert result["status"] == "skipped" and "only thumbs-down" in result["reason"]
    assert h.store.count_unconsumed(user_id=uid) == 3
    assert learn(h, uid)["status"] == "skipped"  # the next pass says the same...
    assert [r["status"] for r in h.store.list_runs(user_id=uid)] == ["skipped"]  # ...without another row


def test_a_run_that_fails_before_training_is_still_a_row(h, monkeypatch):
    import learner.run

    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 2)

    def broken(*a, **k):
        raise RuntimeError("pairs exploded")

    monkeypatch.setattr(learner.run, "build_examples", broken)
    result = learn(h, uid)
    assert result["status"] == "failed" and "pairs exploded" in result["error"]
    run = h.store.list_runs(user_id=uid)[0]
    assert run["status"] == "failed" and "pairs exploded" in run["error"] and run["seconds"] is not None
    assert h.store.count_unconsumed(user_id=uid) == 2


def test_a_single_unpaired_thumb_waits_for_a_second(tmp_path, tiny_model_path, shared_tiny_engine):
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0), shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "question one")
    h.thumb(uid, mid, True)
    result = learn(h, uid)
    assert result["status"] == "skipped" and "KTO needs two" in result["reason"]
    assert h.store.count_unconsumed(user_id=uid) == 1
    _, mid = ask(h, uid, "question two")
    h.thumb(uid, mid, False)
    result = learn(h, uid)
    assert result["status"] in ("promoted", "rejected") and result["n_feedback"] == 2


def test_held_out_only_feedback_is_kept_for_the_gate_and_never_trains(tmp_path, tiny_model_path, shared_tiny_engine):
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.99), shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 3)
    result = learn(h, uid)
    assert result["status"] == "skipped" and "held out" in result["reason"]
    assert h.store.count_unconsumed(user_id=uid) == 0
    assert {p["split"] for p in h.store.list_pairs(user_id=uid)} == {"heldout"}
    assert h.store.replay_pool(user_id=uid) == []
    assert h.store.active_adapter(user_id=uid) is None


def test_replay_is_a_bounded_sample_of_older_pairs(tmp_path, tiny_model_path, shared_tiny_engine):
    h = service(learner_config(tmp_path, tiny_model_path, replay_size=3, heldout_fraction=0.0), shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, [f"Answer {i}." for i in range(8)])
    assert learn(h, uid)["n_replay"] == 0
    edit_answers(h, uid, ["Newer answer."] * 2, questions=["q one", "q two"])
    result = learn(h, uid)
    assert result["n_replay"] == 3 and result["n_train_new"] == 2
    assert h.store.list_runs(user_id=uid)[0]["metrics"]["dpo_rows"] == 5


@pytest.fixture
def gate_says(monkeypatch):
    """``gate_says(False)``: the gate refuses every candidate from now on; ``gate_says(True)``: it promotes them."""
    import learner.gate

    def set_verdict(promote: bool) -> None:
        monkeypatch.setattr(learner.gate, "evaluate", lambda config, **kw: {"promote": promote, "reasons": [] if promote else ["test"]})

    return set_verdict


def test_a_refused_runs_examples_train_once_more_with_the_next_run(tmp_path, tiny_model_path, shared_tiny_engine, gate_says):
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0), shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, [f"Refused answer {i}." for i in range(4)])
    gate_says(False)
    refused = learn(h, uid)
    assert refused["status"] == "rejected" and refused["n_carried"] == 0
    assert h.store.count_unconsumed(user_id=uid) == 0 and h.store.replay_pool(user_id=uid) == []
    edit_answers(h, uid, ["Newer answer."] * 2, questions=["q one", "q two"])
    gate_says(True)
    result = learn(h, uid)
    assert result["status"] == "promoted" and result["n_train_new"] == 2 and result["n_carried"] == 4
    assert h.store.list_runs(user_id=uid)[0]["metrics"]["dpo_rows"] == 6, "the refused run's edits trained with the new ones"
    assert {p["chosen"] for p in h.store.replay_pool(user_id=uid)} == {*(f"Refused answer {i}." for i in range(4)), "Newer answer."}
    edit_answers(h, uid, ["Latest."], questions=["q three"])
    assert learn(h, uid)["n_carried"] == 0, "learned now: replayed, not carried"
    # A store from before carrying: a refused run followed by a promoted one that carried nothing stays unlearned.
    with h.store.db.write() as db:
        db.execute("UPDATE learner_runs SET metrics = json_remove(metrics, '$.n_carried') WHERE user_id = ?", [uid])
    assert not any(p["chosen"].startswith("Refused") for p in h.store.replay_pool(user_id=uid))


def test_examples_refused_twice_are_dropped(tmp_path, tiny_model_path, shared_tiny_engine, gate_says):
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0), shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    gate_says(False)
    edit_answers(h, uid, [f"First {i}." for i in range(3)])
    assert learn(h, uid)["status"] == "rejected"
    edit_answers(h, uid, ["Second."] * 2, questions=["q one", "q two"])
    second = learn(h, uid)
    assert second["status"] == "rejected" and second["n_carried"] == 3
    gate_says(True)
    edit_answers(h, uid, ["Third."], questions=["q three"])
    third = learn(h, uid)
    assert third["status"] == "promoted" and third["n_carried"] == 2, "only the last refused run's own examples"
    assert {p["chosen"] for p in h.store.replay_pool(user_id=uid)} == {"Second.", "Third."}


def test_a_vote_changed_while_the_run_trains_stays_unconsumed(h):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 3)
    _, mid = ask(h, uid, "vote on me")
    h.thumb(uid, mid, True)

    def change_vote(step):
        if step == "before_train":
            h.thumb(uid, mid, False)

    assert learn(h, uid, fault=change_vote)["status"] == "promoted"
    left = h.store.list_feedback(user_id=uid, unconsumed_only=True)
    assert [(f["message_id"], f["payload"]["up"]) for f in left] == [(mid, False)]


def test_progress_is_one_bar_that_only_moves_forward(h):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    seen = []
    assert learn(h, uid, progress=lambda stage, frac: seen.append((stage, frac)))["status"] == "promoted"
    fracs = [f for _, f in seen]
    assert fracs == sorted(fracs) and fracs[0] == 0.0 and seen[-1] == ("done", 1.0)
    assert {"pairs", "train", "gate"} <= {s for s, _ in seen}


def test_a_small_run_still_takes_min_steps_optimizer_steps(h):
    h.config.learner.min_steps = 6
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 2)
    assert learn(h, uid)["status"] == "promoted"
    m = h.store.list_runs(user_id=uid)[0]["metrics"]
    assert m["dpo_rows"] <= 2 and m["dpo_steps"] == 6


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_scoring_the_reference_once_before_training_changes_no_number(tmp_path, tiny_model_path, reference):
    from dataclasses import replace

    from learner.train import train_adapter

    config = learner_config(tmp_path, tiny_model_path, epochs=3, batch_size=2, reference=reference)
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"A good answer {i}.",
              "rejected": f"bad bad {i}", "weight": 1.0} for i in range(5)]
    first = train_adapter(config, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=tmp_path / "v1")
    losses = {}
    for pre in (False, True):
        c = replace(config, learner=replace(config.learner, precompute_reference=pre))
        # Continuing an adapter: with 'previous' the reference is v1, with 'base' the adapter disabled.
        m = train_adapter(c, init_adapter=str(tmp_path / "v1"), dpo_pairs=pairs, kto_examples=[], out_dir=tmp_path / f"v2-{pre}")
        losses[pre] = m["dpo_losses"]
    assert first["dpo_steps"] > 0 and len(losses[True]) == len(losses[False]) > 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_a_pair_that_only_adds_to_its_rejected_answer_can_train_by_the_sft_term_alone(tmp_path, tiny_model_path):
    import math
    from dataclasses import replace

    from transformers import AutoTokenizer

    from learner.rows import _Rows, extends
    from learner.train import train_adapter

    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"An answer {i}.\n\nWant more?",
              "rejected": f"An answer {i}.", "weight": 1.0} for i in range(4)]
    other = {"prompt": [{"role": "user", "content": "q"}], "chosen": "Short.", "rejected": "Long and winding."}
    assert extends(pairs[0]["chosen"], pairs[0]["rejected"]) and not extends(other["chosen"], other["rejected"])
    assert not extends("Yesterday it rained.", "Yes"), "only at a word boundary"
    rows = _Rows(AutoTokenizer.from_pretrained(tiny_model_path), "Be brief.", 128, extension_pairs="sft").dpo([pairs[0], other])
    assert rows[0]["rejected"] == rows[0]["chosen"] and rows[1]["rejected"][0]["content"] == "Long and winding."
    # fp32: the claim is exact arithmetic (a zero margin has no gradient); bf16 rounding differs between the two graphs.
    config = learner_config(tmp_path, tiny_model_path, epochs=2, batch_size=2, dtype="float32")
    runs = {}
    for name, changes in {"dpo": {}, "sft": {"extension_pairs": "sft"}, "sft_alone": {"dpo_loss": "none"}}.items():
        c = replace(config, learner=replace(config.learner, **changes))
        runs[name] = train_adapter(c, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=tmp_path / name)
    # Step by step the same updates as the SFT term alone: the DPO term adds its constant log 2 and no gradient.
    assert [loss - math.log(2) for loss in runs["sft"]["dpo_losses"]] == pytest.approx(runs["sft_alone"]["dpo_losses"], abs=1e-4)
    assert runs["dpo"]["dpo_losses"] != pytest.approx(runs["sft"]["dpo_losses"], abs=1e-3), "as DPO pairs they train differently"


def test_the_heap_the_trainer_freed_goes_back_before_the_gate_loads_its_model(h, monkeypatch):
    import learner.gate
    import learner.run
    import learner.train

    calls = []
    for module, name in ((learner.train, "train_adapter"), (learner.run, "release_freed_memory"), (learner.gate, "evaluate")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 4)
    assert learn(h, uid)["status"] == "promoted"
    assert calls == ["train_adapter", "release_freed_memory", "evaluate"]
    # On Linux (glibc) the trim really runs; elsewhere it says it did nothing.
    import platform

    assert learner.run.release_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_a_run_with_the_kto_cap_trains_at_most_that_many_thumbs_per_pair(tmp_path, tiny_model_path):
    config = learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0, gate_enabled=False, kto_max_per_pair=2.0)
    config.generation.do_sample = True
    h = service(config)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."])
    thumb_answers(h, uid, [True, False, True, True, False, True, True, True])
    assert learn(h, uid)["status"] == "promoted"
    m = h.store.list_runs(user_id=uid)[0]["metrics"]
    assert m["kto_rows"] == 2 * (m["dpo_rows"] + m["prefer_rows"]) and m["kto_rows"] + m["kto_rows_capped"] == 8
    assert h.store.count_unconsumed(user_id=uid) == 0, "a capped thumb is consumed with its run"


def test_the_kto_cap_keeps_each_labels_share_and_at_least_one_of_each():
    import random

    from learner.train import cap_kto

    rows = [{"id": i, "label": i < 9} for i in range(12)]  # 9 ups, 3 downs
    kept = cap_kto(rows, 4, rng=random.Random(0))
    assert len(kept) == 4 and sum(r["label"] for r in kept) == 3 and len({r["id"] for r in kept}) == 4
    lopsided = [{"id": i, "label": i < 11} for i in range(12)]
    assert sum(not r["label"] for r in cap_kto(lopsided, 3, rng=random.Random(0))) == 1
    assert cap_kto(rows, 12, rng=random.Random(0)) == rows and cap_kto(rows, 1, rng=random.Random(0)) == []
