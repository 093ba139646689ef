"""`heed export`: TRL-format JSONL that `datasets` loads and a plain TRL script trains on."""
import json

import pytest
from learner_util import ask, edit_answers, learner_config, service

from learner.export import export_jsonl


@pytest.fixture
def alice(tmp_path, tiny_model_path):
    config = learner_config(tmp_path, tiny_model_path)
    config.generation.do_sample = True  # distinct answers to vote on
    h = service(config)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good.", "Thanks for asking.", "Water boils at 100 degrees Celsius."])
    for i, up in enumerate([True, False, True]):
        _, mid = ask(h, uid, f"vote {i}")
        h.thumb(uid, mid, up)
    return h, uid


def one_trl_step(fmt, path, model_path, out_dir):
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds = load_dataset("json", data_files=str(path), split="train")
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    common = dict(output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True,
                  bf16=False, gradient_checkpointing=False, activation_checkpointing=False, save_strategy="no",
                  disable_tqdm=True, max_length=128)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if fmt == "dpo":
        from trl import DPOConfig, DPOTrainer
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=ds, processing_class=tok, peft_config=lora)
    elif fmt == "kto":
        from trl import KTOConfig, KTOTrainer
        trainer = KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=ds, processing_class=tok, peft_config=lora)
    else:
        from trl import SFTConfig, SFTTrainer
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=ds, processing_class=tok, peft_config=lora)
    return ds, trainer.train()


@pytest.mark.parametrize("fmt, columns, n", [
    ("dpo", {"prompt", "chosen", "rejected"}, 3),  # the three edits
    ("kto", {"prompt", "completion", "label"}, 9),  # each edit as a good and a bad answer, plus three thumbs
    ("sft", {"prompt", "completion"}, 5),  # three edits and two thumbs-up
])
def test_export_loads_with_datasets_and_trains_one_step_with_trl(alice, tmp_path, tiny_model_path, fmt, columns, n):
    h, uid = alice
    out = tmp_path / "export" / f"alice-{fmt}.jsonl"
    assert export_jsonl(h.config, h.store, user_id=uid, fmt=fmt, out=out) == n
    ds, result = one_trl_step(fmt, out, tiny_model_path, tmp_path / "trl")
    assert set(ds.column_names) == columns and len(ds) == n
    assert result.global_step == 1
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prompt"][0] == {"role": "system", "content": h.config.generation.system_prompt}
    assert row["prompt"][-1]["role"] == "user"
    if fmt == "dpo":
        assert row["chosen"] == [{"role": "assistant", "content": "Brief answers are good."}]


def test_export_through_the_cli_writes_only_that_users_rows(alice, tmp_path, capsys):
    import yaml

    from heed.cli import main

    h, uid = alice
    bob = h.add_user("bob", "pw")
    edit_answers(h, bob, ["Bob's private answer."])
    cfg = tmp_path / "heed.yaml"
    cfg.write_text(yaml.safe_dump(h.config.to_dict()))
    out = tmp_path / "alice.jsonl"
    assert main(["--config", str(cfg), "export", "--user", "alice", "--format", "dpo", "--out", str(out)]) == 0
    assert "wrote 3 rows" in capsys.readouterr().out
    assert "Bob's private answer" not in out.read_text()
    assert main(["--config", str(cfg), "export", "--user", "nobody", "--format", "dpo", "--out", str(out)]) == 2
    assert len(out.read_text().splitlines()) == 3  # a failed export leaves the earlier file alone


def test_export_rejects_an_unknown_format(alice, tmp_path):
    h, uid = alice
    with pytest.raises(ValueError, match="unknown export format"):
        export_jsonl(h.config, h.store, user_id=uid, fmt="csv", out=tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
