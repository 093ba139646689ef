"""The spine, end to end on the tiny model: alice's edits -> learner -> her adapter; bob is untouched."""
from learner_util import STRONG, edit_answers, learner_config, service

from learner.gate import sequence_ids

STYLE = ["Brief answers are good.", "Thanks for asking.", "Brief answers are good. Thanks for asking.",
         "Sure, here is a short answer.", "I think the answer is yes."]


def margins(config, adapter_dir, pairs):
    """logp(chosen) - logp(rejected) of each pair under the base (adapter_dir None) or an adapter."""
    import torch
    from peft import PeftModel

    from heed.engine import load_base

    model, tok = load_base(config)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    system = {"role": "system", "content": config.generation.system_prompt}

    def logp(msgs, answer):
        ids, start = sequence_ids(tok, msgs, answer)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1:-1]
        return float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[start:])[:, None]).sum())

    return [logp([system, *p["prompt"]], p["chosen"]) - logp([system, *p["prompt"]], p["rejected"]) for p in pairs]


def test_alices_edits_raise_her_heldout_margin_and_leave_bob_byte_identical(tmp_path, tiny_model_path):
    config = learner_config(tmp_path, tiny_model_path, heldout_fraction=0.3, **STRONG)
    h = service(config)
    alice, bob = h.add_user("alice", "pw"), h.add_user("bob", "pw")
    bob_questions = ["hello there", "what is water", "tell me a fact"]

    def bob_replies():
        conv = h.start_conversation(bob)
        return [h.chat(bob, conv, q).wait().text for q in bob_questions]

    bob_before = bob_replies()
    alice_conv = h.start_conversation(alice)
    alice_before = h.chat(alice, alice_conv, "what is water").wait().text

    edit_answers(h, alice, [STYLE[i % len(STYLE)] for i in range(14)])
    result = h.learn(alice)
    assert result["status"] == "promoted", result
    assert h.store.count_unconsumed(user_id=alice) == 0

    heldout = h.store.list_pairs(user_id=alice, split="heldout", kind="dpo")
    assert heldout, "the split kept some of alice's pairs out of training"
    trained_on = {p["feedback_id"] for p in h.store.replay_pool(user_id=alice)}
    assert not trained_on & {p["feedback_id"] for p in heldout}
    before = margins(config, None, heldout)
    after = margins(config, h.store.active_adapter(user_id=alice)["path"], heldout)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0
    assert all(a > b for a, b in zip(after, before))

    # The next session serves alice's adapter; the chat engine now has it loaded.
    alice_conv = h.start_conversation(alice)
    alice_after = h.chat(alice, alice_conv, "what is water").wait().text
    assert alice_after != alice_before and any(s in alice_after for s in STYLE)
    assert bob_replies() == bob_before
    assert h.store.active_adapter(user_id=bob) is None
