"""learner.spare_end: DPO and KTO judge a rejected answer by what it says, never lowering where it ends."""
from dataclasses import replace

import pytest
from learner_util import learner_config

from learner.train import SpareEnd

END = 2


def test_a_rejected_answers_end_is_left_out_of_the_dpo_loss_and_the_chosen_keeps_its_own():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, END, 9], "rejected_ids": [7, END, 9]},
            {"prompt_ids": [5], "chosen_ids": [10, END, 9], "rejected_ids": [11, 12, 13, 14]}]  # the second cut off: no end
    plain = DataCollatorForPreference(pad_token_id=0)
    spared = SpareEnd(DataCollatorForPreference(pad_token_id=0), END, phase="dpo")
    before, after = plain(rows), spared(rows)
    assert after["input_ids"].tolist() == before["input_ids"].tolist()
    assert after["completion_mask"][:2].tolist() == before["completion_mask"][:2].tolist(), "chosen rows untouched"
    assert after["completion_mask"][2].tolist() == [0, 0, 1, 0, 0, 0], "rejected: the answer, not its end or what follows"
    assert after["completion_mask"][3].tolist() == before["completion_mask"][3].tolist() == [0, 1, 1, 1, 1, 0]
    assert spared.spared == 1
    same = [{"prompt_ids": [5], "chosen_ids": [7, END, 9], "rejected_ids": [7, END, 9]}]  # extension_pairs 'sft': a zero margin
    assert SpareEnd(DataCollatorForPreference(pad_token_id=0), END, phase="dpo")(same)["completion_mask"].tolist() == [[0, 1, 1, 1]] * 2


def test_an_undesirable_answers_end_is_left_out_of_the_kto_loss_and_the_kl_rows_are_untouched():
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rows = [{"prompt_ids": [5], "completion_ids": [7, END, 9], "KL_completion_ids": [8, END, 9], "label": True},
            {"prompt_ids": [5], "completion_ids": [8, END, 9], "KL_completion_ids": [7, END, 9], "label": False}]
    plain = DataCollatorForUnpairedPreference(pad_token_id=0)
    before, after = plain(rows), SpareEnd(DataCollatorForUnpairedPreference(pad_token_id=0), END, phase="kto")(rows)
    assert after["completion_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert after["KL_completion_mask"].tolist() == before["KL_completion_mask"].tolist()


def _end_logprob(model_path, adapter, prompt: list[dict], answer: str) -> float:
    """log p(end of turn | prompt, answer) under the base with ``adapter``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), str(adapter)).eval()
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = list(ids) + tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return float(torch.log_softmax(logits, -1)[tok.eos_token_id])


def test_sparing_the_end_keeps_an_answer_that_an_edit_only_added_to_more_likely_to_end(tmp_path, tiny_model_path):
    from learner.train import train_adapter

    # An edit that adds a closing question: in DPO's margin the shared answer cancels and "stop here" is pushed down.
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"An answer {i}.\n\nWant more?",
              "rejected": f"An answer {i}.", "weight": 1.0} for i in range(4)]
    probe = ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "question 9"}], "An answer 9.")
    config = learner_config(tmp_path, tiny_model_path, epochs=3, batch_size=2, learning_rate=1e-2, dtype="float32",
                            sft_weight=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config.generation.system_prompt = "Be brief."
    end = {}
    for spare in (False, True):
        c = replace(config, learner=replace(config.learner, spare_end=spare))
        out = tmp_path / f"spare_{spare}"
        metrics = train_adapter(c, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=out)
        assert ("dpo_ends_spared" in metrics) == spare
        end[spare] = _end_logprob(tiny_model_path, out, *probe)
    # Both learn "go on" from the added question; only without sparing is the end itself pushed down.
    assert end[True] > end[False] + 0.5, end
