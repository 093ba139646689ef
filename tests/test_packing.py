"""learner.packing: a batch's shared prefixes computed once, with the numbers of the padded batch."""
from __future__ import annotations

import pytest

from learner.packing import ancestor_mask, plan_segments, shared_prefixes, token_tree


def test_a_token_tree_holds_each_shared_prefix_once():
    rows = [[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 8, 1], [4]]
    tree = token_tree(rows)
    assert tree.size == 7  # 5 6 7 8 | 9 | 1 | 4
    for row, path in zip(rows, tree.index):
        assert [tree.tokens[n] for n in path] == row
        assert [tree.positions[n] for n in path] == list(range(len(row)))
        assert all(tree.parents[n] < n for n in path), "a parent precedes its children"
    assert tree.index[2][:4] == tree.index[0], "a row that extends another reuses all of it"


def test_a_node_attends_to_itself_and_its_ancestors_only():
    tree = token_tree([[1, 2, 3], [1, 2, 4]])
    mask = ancestor_mask(tree.parents, width=5)
    a, b = tree.index
    assert mask[b[2]].nonzero().flatten().tolist() == [b[0], b[1], b[2]]
    assert not mask[b[2], a[2]] and not mask[a[2], b[2]], "two branches never see each other"
    assert mask[4].nonzero().flatten().tolist() == [4], "padding attends to itself, so no softmax row is empty"


def test_segments_keep_rows_that_share_a_start_together_within_the_budget():
    prompt = list(range(10))
    rows = [prompt + [20, 21], prompt + [30, 31, 32], prompt + [20, 21, 22], [7] * 11]
    segments = plan_segments(rows, budget=16)
    assert sorted(r for s in segments for r in s) == [0, 1, 2, 3]
    for seg in segments:
        assert token_tree([rows[r] for r in seg]).size <= 16 or len(seg) == 1
    assert any({0, 2} <= set(s) for s in segments), "a row and its extension share a segment"
    assert plan_segments([[1] * 40], budget=8) == [[0]], "a row longer than the budget is a segment of its own"


def _padded(rows, pad=0):
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def _lora_model(path, attn: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the outputs, so its gradients are compared too
    return model


def _log_probs_and_grads(model, ids, mask, *, packed: bool):
    import torch

    model.zero_grad()
    with shared_prefixes(model, enabled=packed) as stats:
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    logp.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logp.detach(), grads, stats.as_dict()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefixes_give_the_padded_batchs_log_probs_and_gradients(tiny_model_path, attn):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "how do I boil an egg"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = tok("Boil it for eight minutes, then cool it in cold water.", add_special_tokens=False)["input_ids"]
    other = tok("Put it in water.", add_special_tokens=False)["input_ids"]
    # DPO's layout: chosen rows, then rejected rows; pair 0's chosen answer extends its rejected one.
    rows = [prompt + answer + [7, 8, 9], prompt + other, prompt + answer, list(prompt[:5]) + other]
    ids, mask = _padded(rows, pad=tok.pad_token_id or 0)
    model = _lora_model(tiny_model_path, attn)
    plain, g_plain, none = _log_probs_and_grads(model, ids, mask, packed=False)
    packed, g_packed, stats = _log_probs_and_grads(model, ids, mask, packed=True)
    assert none["packed_calls"] == 0 and stats["packed_calls"] == 1
    assert stats["packed_tokens"] < stats["real_tokens"] < stats["padded_tokens"]
    assert (packed - plain).abs().max() < 1e-5
    assert float((g_packed - g_plain).norm() / g_plain.norm()) < 1e-5
    assert "forward" not in model.get_base_model().base_model.__dict__, "the backbone's own forward is back"


def test_a_batch_it_cannot_pack_exactly_is_computed_as_given(tiny_model_path):
    import torch

    model = _lora_model(tiny_model_path, "sdpa")
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=left_padded).logits
        with shared_prefixes(model) as stats:
            got = model(input_ids=ids, attention_mask=left_padded).logits
            model(input_ids=ids, attention_mask=left_padded, use_cache=True)
    assert stats.calls == 0 and torch.equal(got, want)


def test_the_backbone_gets_its_forward_back_when_the_block_fails(tiny_model_path):
    model = _lora_model(tiny_model_path, "sdpa")
    backbone = model.get_base_model().base_model
    with pytest.raises(RuntimeError):
        with shared_prefixes(model):
            assert "forward" in backbone.__dict__
            raise RuntimeError("training failed")
    assert "forward" not in backbone.__dict__


def test_training_with_shared_prefixes_takes_the_same_steps_on_fewer_tokens(tmp_path, tiny_model_path):
    from dataclasses import replace

    from learner.train import train_adapter
    from learner_util import learner_config

    config = learner_config(tmp_path, tiny_model_path, epochs=3, batch_size=2, dtype="float32")
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"An answer {i}.\n\nHope this helps!",
              "rejected": f"An answer {i}.", "weight": 1.0} for i in range(4)]
    kto = [{"prompt": [{"role": "user", "content": f"vote {i}"}], "completion": f"reply {i}", "label": i % 2} for i in range(4)]
    runs = {}
    for packed in (False, True):
        c = replace(config, learner=replace(config.learner, shared_prefixes=packed))
        runs[packed] = train_adapter(c, init_adapter=None, dpo_pairs=pairs, kto_examples=kto, out_dir=tmp_path / str(packed))
    assert runs[True]["dpo_losses"] == pytest.approx(runs[False]["dpo_losses"], abs=1e-4)
    assert runs[True]["kto_losses"] == pytest.approx(runs[False]["kto_losses"], abs=1e-4)
    assert runs[True]["packed_tokens"] < runs[True]["padded_tokens"] and "packed_tokens" not in runs[False]


def test_answers_scored_together_get_the_log_probs_each_gets_alone(tiny_model_path):
    import torch

    from learner.packing import answer_log_probs

    model = _lora_model(tiny_model_path, "sdpa")
    prompt = [3, 4, 5, 6, 7]
    sequences = [(prompt + [9, 10, 11], 5), (prompt + [9, 12], 5), ([8, 8] + [13, 14, 15, 16], 2), (prompt + [9, 10, 11, 17], 6)]
    with torch.inference_mode():
        alone = []
        for ids, start in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1:len(ids) - 1]
            alone.append(torch.log_softmax(logits, -1))
        # max_tokens=12: several forward passes, each with the shared prefixes of the sequences in it.
        for max_tokens in (12, 1024):
            picked = answer_log_probs(model, sequences, max_tokens=max_tokens)
            full = answer_log_probs(model, sequences, full=True, max_tokens=max_tokens)
            for (ids, start), want, got, got_full in zip(sequences, alone, picked, full):
                assert torch.allclose(got_full, want, atol=1e-5)
                assert torch.allclose(got, want.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0], atol=1e-5)


def test_the_lm_head_scores_only_answer_tokens_and_trains_the_same_losses(tmp_path, tiny_model_path, monkeypatch):
    from dataclasses import replace

    import trl.trainer.utils as tu
    from trl.kernels.chunked_logprob import _use_triton as trls_own

    import learner.train as train
    from learner_util import learner_config

    config = learner_config(tmp_path, tiny_model_path, epochs=2, batch_size=2, dtype="float32")
    pairs = [{"prompt": [{"role": "user", "content": f"a rather long question number {i} with many words"}],
              "chosen": f"Short {i}.", "rejected": f"A much longer answer number {i}, padded out.", "weight": 1.0} for i in range(4)]
    kto = [{"prompt": [{"role": "user", "content": f"vote {i}"}], "completion": f"reply {i}", "label": i % 2} for i in range(4)]
    real = tu._ChunkedLogProbFunction
    scored: dict[str, list[int]] = {}

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            scored[arm].append(hidden.shape[0])
            return real.apply(hidden, *args)

    monkeypatch.setattr(tu, "_ChunkedLogProbFunction", Counting)
    runs = {}
    for arm in ("every position", "answers only"):
        scored[arm] = []
        if arm == "every position":
            monkeypatch.setattr(tu, "_use_triton", trls_own)
            monkeypatch.setattr(train, "score_answer_tokens_only", lambda: False)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(tu, "_ChunkedLogProbFunction", Counting)
        c = replace(config, learner=replace(config.learner, shared_prefixes=False))
        runs[arm] = train.train_adapter(c, init_adapter=None, dpo_pairs=pairs, kto_examples=kto, out_dir=tmp_path / arm.replace(" ", "_"))
    assert runs["answers only"]["head_scores_answers_only"] and not runs["every position"]["head_scores_answers_only"]
    assert len(scored["answers only"]) == len(scored["every position"]) > 0
    # Prompts and padding are most of these rows: the head now sees far fewer positions, for the same numbers.
    assert sum(scored["answers only"]) < 0.6 * sum(scored["every position"])
    assert runs["answers only"]["dpo_losses"] == pytest.approx(runs["every position"]["dpo_losses"], abs=1e-5)
    assert runs["answers only"]["kto_losses"] == pytest.approx(runs["every position"]["kto_losses"], abs=1e-5)
