"""A candidate the gate refuses is followed by a shorter step on its path (learner.gate_retries, learner/shrink.py)."""
from pathlib import Path

import pytest
from learner_util import edit_answers, learner_config, service

import learner.gate
import learner.train
from learner.run import learn_user
from learner.shrink import shrink_step


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.fixture
def recorded(monkeypatch):
    """The gate answers from a script of verdicts and keeps the weights of every adapter it judged; training is counted."""
    judged: list[dict] = []
    trained: list[str | None] = []
    verdicts: list[bool] = []
    real_train = learner.train.train_adapter

    def train(config, **kw):
        trained.append(kw.get("init_adapter"))
        return real_train(config, **kw)

    def evaluate(config, *, candidate_dir, active_dir, **kw):
        judged.append({"weights": weights(candidate_dir), "active": active_dir, "files": sorted(p.name for p in Path(candidate_dir).iterdir())})
        ok = verdicts.pop(0)
        return {"promote": ok, "reasons": [] if ok else [f"refused #{len(judged)}"]}

    monkeypatch.setattr(learner.train, "train_adapter", train)
    monkeypatch.setattr(learner.gate, "evaluate", evaluate)
    return judged, trained, verdicts


def _user(tmp_path, tiny_model_path, engine, **learner_opts):
    learner_opts = {"gate_retries": 1, **learner_opts}
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.0, **learner_opts), engine)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, [f"Short answer {i}." for i in range(3)])
    return h, uid


def _folders(h, uid) -> list[str]:
    return sorted(p.name for p in (Path(h.config.adapters_path) / str(uid)).iterdir())


def test_a_refused_new_adapter_is_judged_again_at_half_its_weight_delta(tmp_path, tiny_model_path, shared_tiny_engine, recorded):
    judged, trained, verdicts = recorded
    h, uid = _user(tmp_path, tiny_model_path, shared_tiny_engine)
    verdicts += [False, True]
    result = learn_user(h.config, h.store, user_id=uid)
    assert result["status"] == "promoted" and len(trained) == 1, "a retry costs a gate pass, not a training run"
    full, half = judged[0]["weights"], judged[1]["weights"]
    assert full.keys() == half.keys() and any("lora_B" in k for k in full)
    for k in full:
        # No adapter before: B starts at zero, so half of B is exactly half of every weight delta B @ A.
        want = 0.5 * full[k] if "lora_B" in k else full[k]
        assert torch_close(half[k], want), k
    assert any(full[k].abs().sum() > 0 for k in full if "lora_B" in k), "the candidate moved"
    assert "gate_answers.json" not in judged[1]["files"]
    assert [(a["step"], a["promote"], a["reasons"]) for a in result["attempts"]] == [(1.0, False, ["refused #1"]), (0.5, True, [])]
    assert h.store.list_runs(user_id=uid)[0]["metrics"]["attempts"][1]["step"] == 0.5
    assert torch_close(weights(h.store.active_adapter(user_id=uid)["path"])[next(iter(full))], half[next(iter(full))])
    assert _folders(h, uid) == ["v0001"], "the refused full step leaves nothing behind"


def test_a_refused_continued_adapter_moves_halfway_from_the_active_one(tmp_path, tiny_model_path, shared_tiny_engine, recorded):
    judged, trained, verdicts = recorded
    h, uid = _user(tmp_path, tiny_model_path, shared_tiny_engine)
    verdicts += [True]
    assert learn_user(h.config, h.store, user_id=uid)["status"] == "promoted"
    v1 = weights(h.store.active_adapter(user_id=uid)["path"])
    edit_answers(h, uid, ["Newer."] * 2, questions=["q one", "q two"])
    verdicts += [False, False, True]
    h.config.learner.gate_retries = 2
    result = learn_user(h.config, h.store, user_id=uid)
    assert result["status"] == "promoted" and [a["step"] for a in result["attempts"]] == [1.0, 0.5, 0.25]
    full, quarter = judged[1]["weights"], judged[3]["weights"]
    for k in v1:
        assert torch_close(quarter[k], v1[k] + 0.25 * (full[k] - v1[k])), k
    assert judged[3]["active"] == judged[1]["active"] is not None, "judged against the same active adapter"
    assert _folders(h, uid) == ["v0001", "v0002"]


def test_a_run_refused_after_its_retries_is_rejected_once(tmp_path, tiny_model_path, shared_tiny_engine, recorded):
    judged, trained, verdicts = recorded
    h, uid = _user(tmp_path, tiny_model_path, shared_tiny_engine, gate_retries=2, gate_retry_step=0.25)
    verdicts += [False, False, False]
    result = learn_user(h.config, h.store, user_id=uid)
    assert result["status"] == "rejected" and result["reasons"] == ["refused #3"]
    assert [a["step"] for a in result["attempts"]] == [1.0, 0.25, 0.0625] and len(trained) == 1
    assert h.store.active_adapter(user_id=uid) is None
    assert [a["status"] for a in h.store.list_adapters(user_id=uid)] == ["rejected"]
    assert _folders(h, uid) == ["v0001"] and len(h.store.list_runs(user_id=uid)) == 1


def test_no_retry_by_default(tmp_path, tiny_model_path, shared_tiny_engine, recorded):
    from heed.config import LearnerConfig

    assert LearnerConfig().gate_retries == 0
    judged, trained, verdicts = recorded
    h, uid = _user(tmp_path, tiny_model_path, shared_tiny_engine, gate_retries=0)
    verdicts += [False]
    assert learn_user(h.config, h.store, user_id=uid)["status"] == "rejected"
    assert len(judged) == 1 and verdicts == []


def test_a_crash_while_retrying_leaves_no_folder_and_the_feedback_unconsumed(tmp_path, tiny_model_path, shared_tiny_engine, recorded, monkeypatch):
    import learner.run

    judged, trained, verdicts = recorded
    h, uid = _user(tmp_path, tiny_model_path, shared_tiny_engine)
    verdicts += [False]

    def crash(**kw):
        raise OSError("disk full")

    monkeypatch.setattr(learner.run, "shrink_step", crash)
    result = learn_user(h.config, h.store, user_id=uid)
    assert result["status"] == "failed" and "disk full" in result["error"]
    assert _folders(h, uid) == [] and h.store.count_unconsumed(user_id=uid) == 3


def test_a_shorter_step_refuses_an_adapter_that_does_not_continue_the_start(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, shape in (("start", (8, 4)), ("cand", (16, 4))):
        (tmp_path / name).mkdir()
        save_file({"x.lora_A.weight": torch.zeros(shape)}, str(tmp_path / name / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not continue"):
        shrink_step(start_dir=str(tmp_path / "start"), candidate_dir=tmp_path / "cand", out_dir=tmp_path / "out", t=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        shrink_step(start_dir=None, candidate_dir=tmp_path / "cand", out_dir=tmp_path / "out", t=1.0)


def test_heed_learn_says_a_run_took_a_shorter_step_and_why(tmp_path, tiny_model_path, shared_tiny_engine, recorded, capsys):
    import yaml

    from heed.cli import main

    judged, trained, verdicts = recorded
    h, uid = _user(tmp_path, tiny_model_path, shared_tiny_engine)
    config_file = tmp_path / "heed.yaml"
    config_file.write_text(yaml.safe_dump(h.config.to_dict()))
    verdicts += [False, True]
    assert main(["--config", str(config_file), "learn", "--once", "--user", "alice"]) == 0
    out = capsys.readouterr().out
    assert "alice: promoted v1 (100% of its step refused: refused #1; promoted at 50%)" in out, out


def torch_close(a, b) -> bool:
    import torch

    return torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5)


def test_a_runs_refused_steps_are_described_in_order():
    from learner.shrink import describe_attempts

    tries = [{"step": 1.0, "reasons": ["drift 3.5 > 2.0"]}, {"step": 0.5, "reasons": ["held-out answers less likely"]},
             {"step": 0.25, "reasons": ["x"]}]
    assert describe_attempts(tries, "rejected") == ["100% of its step refused: drift 3.5 > 2.0",
                                                    "50% of its step refused: held-out answers less likely", "rejected at 25%"]
    assert describe_attempts(tries[:1], "rejected") == [] and describe_attempts([], "promoted") == []
