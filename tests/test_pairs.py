"""Every row of DESIGN.md's feedback-to-signal table, through the service, into training examples."""
import pytest
from learner_util import ask, learner_config, service

from learner.pairs import build_examples, split_for


@pytest.fixture
def h(tmp_path, tiny_model_path):
    # Sampling: the tiny model's greedy answers are all blank lines, and a correction needs a non-empty rewrite.
    config = learner_config(tmp_path, tiny_model_path)
    config.generation.do_sample = True
    return service(config)


def examples(h, uid, *, heldout_fraction=0.0, feedback=None):
    all_fb = h.store.list_feedback(user_id=uid)
    return build_examples(h.store, user_id=uid, feedback=feedback if feedback is not None else all_fb,
                          heldout_fraction=heldout_fraction, all_feedback=all_fb)


def only(exs, kind):
    found = [e for e in exs if e["kind"] == kind]
    assert len(found) == 1, exs
    return found[0]


def two_answers(h, uid, question, other):
    """(first answer's id, a regenerated answer's id) with ``other`` as its text: greedy decoding would repeat the first."""
    _, first = ask(h, uid, question)
    second = h.regenerate(uid, first).wait().message_id
    h.store.set_message_content(user_id=uid, message_id=second, content=other)
    return first, second


def test_edit_becomes_a_preference_pair_and_an_sft_example(h):
    uid = h.add_user("alice", "pw")
    conv, mid = ask(h, uid, "What is water?")
    original = h.store.get_message(user_id=uid, message_id=mid)["content"]
    h.edit(uid, mid, "Water is H2O.")
    exs = examples(h, uid)
    pair, sft = only(exs, "dpo"), only(exs, "sft")
    assert pair["chosen"] == "Water is H2O." and pair["rejected"] == original
    assert sft["completion"] == "Water is H2O."
    assert pair["prompt"] == [{"role": "user", "content": "What is water?"}] == sft["prompt"]
    assert pair["source"] == "edit"


def test_context_is_the_chat_history_up_to_the_answer(h):
    uid = h.add_user("alice", "pw")
    conv, first = ask(h, uid, "Hi")
    _, second = ask(h, uid, "Tell me about tea", conversation=conv)
    ask(h, uid, "And coffee?", conversation=conv)  # after the answer: not part of its context
    h.edit(uid, second, "Tea is a drink.")
    pair = only(examples(h, uid), "dpo")
    first_text = h.store.get_message(user_id=uid, message_id=first)["content"]
    assert pair["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first_text},
                              {"role": "user", "content": "Tell me about tea"}]


def test_correction_pairs_on_the_context_without_the_correction(h):
    uid = h.add_user("alice", "pw")
    conv, mid = ask(h, uid, "Explain tides")
    original = h.store.get_message(user_id=uid, message_id=mid)["content"]
    corrected = h.correct(uid, mid, "answer in one sentence").wait()
    pair = only(examples(h, uid), "dpo")
    assert pair["source"] == "correction"
    assert pair["rejected"] == original and pair["chosen"] == corrected.text.strip()
    # The instruction rode on the regeneration only: the pair's context is the plain question.
    assert pair["prompt"] == [{"role": "user", "content": "Explain tides"}]
    assert "one sentence" not in repr(pair["prompt"])
    assert only(examples(h, uid), "sft")["completion"] == corrected.text.strip()


def test_comparison_becomes_a_pair_of_the_picked_over_the_other(h):
    uid = h.add_user("alice", "pw")
    first, second = two_answers(h, uid, "Name a colour", "Blue.")
    h.choose(uid, second, first)
    pair = only(examples(h, uid), "dpo")
    assert pair["source"] == "comparison" and pair["chosen"] == "Blue."
    assert pair["rejected"] == h.store.get_message(user_id=uid, message_id=first)["content"]
    assert pair["prompt"] == [{"role": "user", "content": "Name a colour"}]


def test_choosing_between_identical_answers_teaches_nothing(h):
    uid = h.add_user("alice", "pw")
    _, first = ask(h, uid, "Name a colour")
    second = h.regenerate(uid, first).wait().message_id
    same = h.store.get_message(user_id=uid, message_id=first)["content"]
    h.store.set_message_content(user_id=uid, message_id=second, content=same + "  ")  # greedy decoding repeats itself
    h.choose(uid, second, first)
    assert examples(h, uid) == []


def test_thumbs_up_and_down_on_one_context_become_a_pair(h):
    uid = h.add_user("alice", "pw")
    first, second = two_answers(h, uid, "Name a fruit", "An apple.")
    h.thumb(uid, first, False)
    h.thumb(uid, second, True)
    exs = examples(h, uid)
    pair = only(exs, "dpo")
    assert pair["chosen"] == "An apple." and pair["source"] == "thumb"
    assert not [e for e in exs if e["kind"] == "kto"]


def test_a_new_thumb_pairs_with_an_older_consumed_one(h):
    uid = h.add_user("alice", "pw")
    first, second = two_answers(h, uid, "Name a fruit", "An apple.")
    h.thumb(uid, first, False)
    old = h.store.list_feedback(user_id=uid)
    h.thumb(uid, second, True)
    new = [f for f in h.store.list_feedback(user_id=uid) if f["id"] not in {o["id"] for o in old}]
    pair = only(examples(h, uid, feedback=new), "dpo")
    assert pair["chosen"] == "An apple."


def test_lone_thumbs_become_kto_examples(h):
    uid = h.add_user("alice", "pw")
    _, up = ask(h, uid, "Say hi")
    _, down = ask(h, uid, "Say bye")
    h.thumb(uid, up, True)
    h.thumb(uid, down, False)
    kto = {e["prompt"][-1]["content"]: e for e in examples(h, uid) if e["kind"] == "kto"}
    assert kto["Say hi"]["label"] == 1 and kto["Say bye"]["label"] == 0
    assert kto["Say hi"]["completion"] == h.store.get_message(user_id=uid, message_id=up)["content"]


def test_a_thumb_on_an_edited_answer_defers_to_the_edit(h):
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "Say hi")
    h.thumb(uid, mid, False)
    h.edit(uid, mid, "Hi!")
    assert sorted(e["kind"] for e in examples(h, uid)) == ["dpo", "sft"]


def test_rating_weighs_its_conversation_and_labels_unjudged_answers(h):
    uid = h.add_user("alice", "pw")
    conv, edited = ask(h, uid, "First question")
    _, unjudged = ask(h, uid, "Second question", conversation=conv)
    h.edit(uid, edited, "A better first answer.")
    h.rate(uid, conv, 5)
    exs = examples(h, uid)
    assert only(exs, "dpo")["weight"] == 1.5
    kto = only(exs, "kto")
    assert kto["label"] == 1 and kto["completion"] == h.store.get_message(user_id=uid, message_id=unjudged)["content"]
    h.rate(uid, conv, 1)
    exs = examples(h, uid)
    assert only(exs, "dpo")["weight"] == 0.5 and only(exs, "kto")["label"] == 0
    h.rate(uid, conv, 3)
    assert [e["kind"] for e in examples(h, uid) if e["source"] == "rating"] == []


def test_split_is_deterministic_and_the_same_for_every_signal_about_one_answer(h):
    uid = h.add_user("alice", "pw")
    for i in range(30):
        _, mid = ask(h, uid, f"question {i}")
        h.edit(uid, mid, f"answer {i}")
    first = examples(h, uid, heldout_fraction=0.3)
    again = examples(h, uid, heldout_fraction=0.3)
    assert [e["split"] for e in first] == [e["split"] for e in again]
    by_feedback = {}
    for e in first:
        by_feedback.setdefault(e["feedback_id"], set()).add(e["split"])
    assert all(len(s) == 1 for s in by_feedback.values())  # the pair and the sft example of one edit agree
    heldout = sum(e["split"] == "heldout" for e in first) / len(first)
    assert 0.1 < heldout < 0.5
    assert split_for(user_id=1, key="3:1", heldout_fraction=0.0) == "train"


def test_a_question_asked_again_lands_on_the_same_side_whatever_the_store_ids(h):
    alice, bob = h.add_user("alice", "pw"), h.add_user("bob", "pw")
    for i in range(12):
        _, mid = ask(h, alice, f"question {i}")
        h.edit(alice, mid, f"answer {i}")
        # Another user's chats in between shift every conversation id, as concurrent users do.
        ask(h, bob, f"bob {i}")
        _, mid = ask(h, alice, f"question {i}")
        h.edit(alice, mid, f"answer {i} again")
    sides: dict = {}
    for e in examples(h, alice, heldout_fraction=0.5):
        sides.setdefault(e["prompt"][-1]["content"], set()).add(e["split"])
    assert len(sides) == 12 and all(len(s) == 1 for s in sides.values())
    assert {next(iter(s)) for s in sides.values()} == {"train", "heldout"}


def test_another_users_feedback_never_enters_the_examples(h):
    alice, bob = h.add_user("alice", "pw"), h.add_user("bob", "pw")
    _, mid = ask(h, bob, "Bob's question")
    h.edit(bob, mid, "Bob's answer.")
    bob_fb = h.store.list_feedback(user_id=bob)
    assert build_examples(h.store, user_id=alice, feedback=bob_fb, heldout_fraction=0.0) == []


def test_a_corrected_answer_the_user_then_edits_pairs_their_edit_over_the_original(h):
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "Explain tides")
    original = h.store.get_message(user_id=uid, message_id=mid)["content"]
    fixed = h.correct(uid, mid, "answer in one sentence").wait()
    h.edit(uid, fixed.message_id, "The moon pulls the sea.")
    pairs = {e["source"]: e for e in examples(h, uid) if e["kind"] == "dpo"}
    assert pairs["correction"]["chosen"] == "The moon pulls the sea." and pairs["correction"]["rejected"] == original
    assert pairs["edit"]["rejected"] == fixed.text.strip()
    assert pairs["correction"]["prompt"] == pairs["edit"]["prompt"] == [{"role": "user", "content": "Explain tides"}]


def test_a_corrected_answer_voted_down_is_not_a_chosen_answer(h):
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "Explain tides")
    fixed = h.correct(uid, mid, "answer in one sentence").wait()
    h.thumb(uid, fixed.message_id, False)
    exs = examples(h, uid)
    assert [e["source"] for e in exs] == ["thumb"] and exs[0]["kind"] == "kto" and exs[0]["label"] == 0


def test_an_answer_edited_twice_teaches_the_last_version(h):
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "Say hi")
    h.edit(uid, mid, "Hello.")
    h.edit(uid, mid, "Hi there!")
    pairs = [e for e in examples(h, uid) if e["kind"] == "dpo"]
    assert [p["chosen"] for p in pairs] == ["Hi there!", "Hi there!"]
    assert pairs[1]["rejected"] == "Hello."


def test_edit_weight_counts_the_users_own_words_above_a_pick_or_a_vote(h):
    uid = h.add_user("alice", "pw")
    _, edited = ask(h, uid, "What is water?")
    h.edit(uid, edited, "Water is H2O.")
    _, corrected = ask(h, uid, "Explain tides")
    fixed = h.correct(uid, corrected, "answer in one sentence").wait()
    h.edit(uid, fixed.message_id, "The moon pulls the sea.")
    _, plain = ask(h, uid, "Why is the sky blue?")
    h.correct(uid, plain, "shorter please").wait()
    _, voted = ask(h, uid, "Name a fruit")
    h.thumb(uid, voted, True)
    all_fb = h.store.list_feedback(user_id=uid)
    exs = build_examples(h.store, user_id=uid, feedback=all_fb, heldout_fraction=0.0, edit_weight=2.0)
    weight = {(e["source"], e["kind"], e.get("chosen") or e.get("completion")): e["weight"] for e in exs}
    assert weight[("edit", "dpo", "Water is H2O.")] == weight[("edit", "sft", "Water is H2O.")] == 2.0
    assert weight[("correction", "dpo", "The moon pulls the sea.")] == 2.0, "a correction the user then edited is their words"
    others = [e for e in exs if e["source"] in ("thumb",) or (e["source"] == "correction" and e["chosen" if e["kind"] == "dpo" else "completion"] != "The moon pulls the sea.")]
    assert others and all(e["weight"] == 1.0 for e in others), "model answers the user only picked or voted on keep weight 1"


def test_an_edits_weight_becomes_that_many_training_rows(tiny_model_path):
    from transformers import AutoTokenizer

    from learner.rows import _Rows

    rows = _Rows(AutoTokenizer.from_pretrained(tiny_model_path), "Be brief.", 128)
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Hello hello hello."}
    assert len(rows.dpo([{**pair, "weight": 2.0}, {**pair, "weight": 1.0}])) == 3


def test_rows_that_trl_will_cut_at_max_length_are_counted(tiny_model_path):
    from transformers import AutoTokenizer

    from learner.rows import _Rows

    rows = _Rows(AutoTokenizer.from_pretrained(tiny_model_path), "Be brief.", 128)
    short = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Hello hello."}
    rows.dpo([short])
    rows.kto([{"prompt": short["prompt"], "completion": "Hello.", "label": 1}])
    assert rows.cut == 0
    long = " ".join(f"word{i}" for i in range(200))
    rows.dpo([{**short, "rejected": long, "weight": 2.0}])  # one row counted, however many copies train
    rows.kto([{"prompt": short["prompt"], "completion": long, "label": 0}])
    assert rows.cut == 2


def test_a_pick_is_preferred_but_not_imitated_unless_the_user_also_votes_it_up(h):
    uid = h.add_user("alice", "pw")
    first, second = two_answers(h, uid, "Name a colour", "Blue.")
    h.choose(uid, second, first)
    assert only(examples(h, uid), "dpo")["imitate"] is False  # "the better of two" is not "good"
    h.thumb(uid, second, True)
    assert only(examples(h, uid), "dpo")["imitate"] is True


def test_a_corrected_answer_is_imitated_only_once_the_user_confirms_it(h):
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "Explain tides")
    corrected = h.correct(uid, mid, "answer in one sentence").wait()
    assert only(examples(h, uid), "dpo")["imitate"] is False
    h.thumb(uid, corrected.message_id, True)
    assert only(examples(h, uid), "dpo")["imitate"] is True

    _, other = ask(h, uid, "Explain wind")
    fixed = h.correct(uid, other, "answer in one sentence").wait()
    h.edit(uid, fixed.message_id, "Air moves from high to low pressure.")
    pairs = {e["chosen"]: e for e in examples(h, uid) if e["kind"] == "dpo" and e["source"] == "correction"}
    assert pairs["Air moves from high to low pressure."]["imitate"] is True


def test_edits_and_opposite_votes_are_imitated(h):
    uid = h.add_user("alice", "pw")
    _, mid = ask(h, uid, "What is water?")
    h.edit(uid, mid, "Water is H2O.")
    first, second = two_answers(h, uid, "Name a fruit", "An apple.")
    h.thumb(uid, first, False)
    h.thumb(uid, second, True)
    assert [e["imitate"] for e in examples(h, uid) if e["kind"] == "dpo"] == [True, True]


def test_what_the_sft_term_imitates_follows_the_config(tmp_path, tiny_model_path):
    from learner.rows import split_imitated

    config = learner_config(tmp_path, tiny_model_path)
    edit, pick = {"chosen": "a", "imitate": True}, {"chosen": "b", "imitate": False}
    assert split_imitated([edit, pick], config) == ([edit], [pick])
    # Nothing endorsed to anchor on: DPO alone would reward-hack, so the picks are imitated after all.
    assert split_imitated([pick], config) == ([pick], [])
    config.learner.imitate = "all"
    assert split_imitated([edit, pick], config) == ([edit, pick], [])
    config.learner.imitate = "endorsed"
    config.learner.dpo_loss = "none"  # the SFT term alone cannot train a pair it does not imitate
    assert split_imitated([edit, pick], config) == ([edit], [])


def test_the_store_keeps_whether_a_pair_is_imitated(h):
    uid = h.add_user("alice", "pw")
    first, second = two_answers(h, uid, "Name a colour", "Blue.")
    h.choose(uid, second, first)
    _, mid = ask(h, uid, "What is water?")
    h.edit(uid, mid, "Water is H2O.")
    assert h.store.acquire_lease(user_id=uid, holder="test", seconds=60)
    run = h.store.start_run(user_id=uid)
    h.store.promote(user_id=uid, run_id=run, holder="test", version=None, path=None, feedback_ids=[],
                    pairs=examples(h, uid), metrics={})
    stored = {p["chosen"]: p["imitate"] for p in h.store.list_pairs(user_id=uid, kind="dpo")}
    assert stored == {"Blue.": 0, "Water is H2O.": 1}
