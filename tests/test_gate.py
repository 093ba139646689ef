"""The promotion gate judges what a candidate generates: it takes a good update and refuses a poisoned one."""
from dataclasses import replace

import pytest
from learner_util import STRONG, edit_answers, learner_config, service

from heed.quality import degeneration
from learner.gate import evaluate
from learner.run import learn_user

GOOD = "Brief answers are good. Thanks for asking."
AGAIN = "Brief answers are good. Thank you for asking."  # an edit must change what the trained adapter says


@pytest.fixture
def trained(tmp_path, tiny_model_path, shared_tiny_engine):
    """alice with a promoted adapter that answers sensibly (the tiny base only emits blank lines)."""
    h = service(learner_config(tmp_path, tiny_model_path, heldout_fraction=0.25, **STRONG), shared_tiny_engine)
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, [GOOD] * 12)
    result = learn_user(h.config, h.store, user_id=uid)
    return h, uid, result


def test_gate_accepts_an_update_that_makes_answers_sensible(trained):
    h, uid, result = trained
    assert result["status"] == "promoted", result
    gate = result["gate"]
    assert gate["degenerate_active"] == 1.0 and gate["degenerate_candidate"] == 0.0
    assert gate["heldout_logp_gain"] > 0 and gate["heldout_n"] >= 1
    assert GOOD in gate["samples"][0]["candidate"]


def test_gate_refuses_a_poisoned_update_that_rewards_one_word_answers(trained):
    h, uid, _ = trained
    edit_answers(h, uid, ["Ok"] * 12)
    result = learn_user(h.config, h.store, user_id=uid)
    assert result["status"] == "rejected", result
    assert any("degenerate answers rose" in r and "too_short" in r for r in result["reasons"])
    # The poison fits its own held-out pairs perfectly: likelihood alone would have let it through.
    assert result["gate"]["heldout_logp_gain"] > 0
    assert result["gate"]["samples"][0]["candidate"].strip() == "Ok"
    active = h.store.active_adapter(user_id=uid)
    assert active["version"] == 1  # the user keeps the good adapter
    rejected = [a for a in h.store.list_adapters(user_id=uid) if a["status"] == "rejected"]
    assert [a["version"] for a in rejected] == [2] and rejected[0]["metrics"]["gate"]["reasons"]
    run = h.store.list_runs(user_id=uid)[0]
    assert run["status"] == "rejected" and "degenerate" in run["error"]
    assert h.store.count_unconsumed(user_id=uid) == 0
    poison = {f["id"] for f in h.store.list_feedback(user_id=uid)[-12:]}
    assert all(p["feedback_id"] not in poison for p in h.store.replay_pool(user_id=uid))
    # The next run tries the refused examples once more, beside its own; refused again, they are dropped.
    poison_train = [p for p in h.store.list_pairs(user_id=uid, split="train") if p["feedback_id"] in poison and p["kind"] == "dpo"]
    edit_answers(h, uid, [AGAIN] * 2, questions=["one more", "and another"])
    retry = learn_user(h.config, h.store, user_id=uid)
    assert retry["n_carried"] == len(poison_train) > 0 and retry["status"] == "rejected", retry
    edit_answers(h, uid, [AGAIN], questions=["a last one"])
    after = learn_user(h.config, h.store, user_id=uid)
    assert after["n_carried"] == retry["n_train_new"], "only the retry's own examples get a second try"
    assert all(p["feedback_id"] not in poison for p in h.store.replay_pool(user_id=uid)), "the poison is never learned"


def test_gate_refuses_drift_and_lost_likelihood_beyond_their_limits(trained):
    h, uid, _ = trained
    active = h.store.active_adapter(user_id=uid)["path"]
    heldout = h.store.list_pairs(user_id=uid, split="heldout")
    strict = replace(h.config, learner=replace(h.config.learner, gate_max_kl=1e-9, gate_min_logp_gain=1e9, gate_min_heldout=1,
                                               gate_min_margin_gain=1e9))
    assert heldout  # one of the twelve questions is held out
    verdict = evaluate(strict, candidate_dir=active, active_dir=None, heldout=heldout)
    assert not verdict["promote"]
    assert any("drift from the base" in r for r in verdict["reasons"])
    assert any("less likely" in r and "margin" in r for r in verdict["reasons"])
    assert verdict["implicit_reward_accuracy"] is not None  # reported, never decisive


def test_lost_likelihood_is_not_refused_when_the_held_out_margin_grew(trained):
    h, uid, _ = trained
    active = h.store.active_adapter(user_id=uid)["path"]
    heldout = h.store.list_pairs(user_id=uid, split="heldout")
    assert any(p.get("rejected") for p in heldout)
    # Every gain counts as lost; the trained adapter's margin over the base's blank answers grew, so it is kept.
    strict = replace(h.config, learner=replace(h.config.learner, gate_min_logp_gain=1e9, gate_min_heldout=1))
    verdict = evaluate(strict, candidate_dir=active, active_dir=None, heldout=heldout)
    assert verdict["heldout_margin_gain"] > 0 and verdict["heldout_margin_n"] >= 1
    assert not any("less likely" in r for r in verdict["reasons"]), verdict["reasons"]


@pytest.mark.parametrize("gain, margin, n_margin, refused", [
    (-0.906, 0.007, 2, False),  # brief v2 in the second draw: refused then, 66% accepted against the kept 44%
    (-0.536, 0.064, 2, False),  # brief v3 there: 62%
    (-0.906, -0.2, 2, True),    # the chosen answers and the preference both lost: forgetting
    (-0.906, 0.0, 2, True),     # a margin that did not grow saves nothing
    (-0.906, None, 0, True),    # thumbs only: no margin, the bound alone decides
    (-0.906, 0.5, 1, True),     # one pair's margin is as noisy as one example's likelihood
    (-0.3, -0.2, 2, False),     # inside the bound
    (None, None, 0, False),
])
def test_the_likelihood_bound_refuses_only_when_the_margin_did_not_grow(gain, margin, n_margin, refused):
    from heed.config import LearnerConfig
    from learner.gate import likelihood_refusal

    why = likelihood_refusal(gain, 2, margin, n_margin, config=LearnerConfig())
    assert (why is not None) == refused, why
    if why and margin is not None and n_margin >= 2:
        assert f"{margin:+.3f}" in why


@pytest.mark.parametrize("answer, finished, why", [
    ("", True, "empty"),
    ("Ok", True, "too_short"),
    ("A: A: A: A: A: A: A: A: A: A:", True, "repetitive"),
    ("the cat sat on the mat the cat sat on the mat the cat sat on the mat", True, "repetitive"),
    ("Hope this helps you!Hope this helps!Hope this helps!", True, "repetitive"),  # a reward-hacked sign-off
    ("Boil the water. Add the egg and wait nine minutes. Then boil the water again and add the egg and wait nine minutes.", True, None),
    ("Add the egg and wait nine minutes. Cool it. Add the egg and wait nine minutes.", True, "repetitive"),
    ("Water boils at one hundred degrees", False, "cut_off"),
    ("Water boils at one hundred degrees Celsius at sea level.", True, None),
])
def test_degeneration_check_names_each_failure(answer, finished, why):
    assert degeneration(answer, finished=finished) == why


def test_an_echo_of_the_question_is_degenerate():
    question = "please tell me how long it takes to boil an egg"
    assert degeneration("Tell me how long it takes to boil an egg", prompt=question) == "echo"
    assert degeneration("About nine minutes for a hard-boiled egg.", prompt=question) is None


def test_the_gate_answers_as_many_contexts_whatever_the_history(trained):
    h, uid, first = trained
    n = h.config.learner.gate_answers
    assert first["gate"]["n_contexts"] == n
    edit_answers(h, uid, [AGAIN] * 12, questions=[f"another question {i}" for i in range(12)])
    second = learn_user(h.config, h.store, user_id=uid)
    assert second["gate"]["n_contexts"] == n
    assert second["gate"]["n_heldout_contexts"] > first["gate"]["n_heldout_contexts"]  # more held-out, fewer probes


def test_the_gate_generates_only_what_the_active_adapter_has_not_answered_yet(trained):
    h, uid, first = trained
    # alice's first run answered every context with the base model: a new user's first run reuses the probes.
    bob = h.add_user("bob", "pw")
    edit_answers(h, bob, [GOOD] * 12, questions=[f"bob asks {i}" for i in range(12)])
    bobs = learn_user(h.config, h.store, user_id=bob)
    assert bobs["gate"]["active_answers_generated"] == bobs["gate"]["n_heldout_contexts"]
    # alice's v1 answered the probes and her held-out contexts as a candidate: only her new held-out ones are left.
    edit_answers(h, uid, [AGAIN] * 12, questions=[f"another question {i}" for i in range(12)])
    second = learn_user(h.config, h.store, user_id=uid)
    new_contexts = second["gate"]["n_heldout_contexts"] - first["gate"]["n_heldout_contexts"]
    assert 0 < second["gate"]["active_answers_generated"] <= new_contexts


def test_the_gate_scores_only_held_out_answers_not_scored_before(trained):
    h, uid, first = trained
    # The first run scored its held-out answers under the candidate and the base model (then active).
    assert first["gate"]["heldout_scored"]["candidate"] == first["gate"]["heldout_scored"]["base"] > 0
    edit_answers(h, uid, [AGAIN] * 12, questions=[f"another question {i}" for i in range(12)])
    second = learn_user(h.config, h.store, user_id=uid)
    scored = second["gate"]["heldout_scored"]
    assert second["gate"]["heldout_n"] > first["gate"]["heldout_n"]
    # v1 scored the first run's held-out answers as a candidate, the base scored them then: only the new ones are left.
    assert 0 < scored["active"] < scored["candidate"] and 0 < scored["base"] < scored["candidate"]


def test_held_out_scores_kept_from_before_give_the_same_figures(trained):
    from heed.engine import AdapterRef, Engine
    from learner.gate import heldout_likelihood

    h, uid, _ = trained
    heldout = [p for p in h.store.list_pairs(user_id=uid, split="heldout") if p["kind"] != "sft"]
    assert heldout
    engine = Engine(h.engine.base, h.engine.tokenizer, model_cfg=h.config.model, gen_cfg=h.config.generation)
    system = {"role": "system", "content": h.config.generation.system_prompt}
    cand = AdapterRef("v1", h.store.active_adapter(user_id=uid)["path"])

    def score(known=None):
        return heldout_likelihood(engine, h.engine.tokenizer, system, heldout, candidate=cand, active=None, known=known)

    fresh = score()
    one = dict(list(fresh["scores"]["candidate"].items())[:1])
    again = score({"candidate": one, "base": fresh["scores"]["base"]})
    assert again["scored"]["base"] == {} and again["scored"]["candidate"].keys() == fresh["scores"]["candidate"].keys() - one.keys()
    assert again["gains"] == pytest.approx(fresh["gains"], abs=1e-4)
    assert again["margins"] == pytest.approx(fresh["margins"], abs=1e-4) and again["correct"] == fresh["correct"]


@pytest.mark.parametrize("candidate, active, base, refused", [
    ((0.0, 0.46), (0.0, 0.04), None, "never end rose from 4%"),                      # asks-back at 4 events: against the base
    ((0.0, 0.50), (0.0, 0.28), (0.0, 0.04), "never end rose from the base model's 4%"),  # under the bound step by step
    ((0.0, 0.50), (0.0, 0.28), None, None),                                           # the bounds from the base off
    ((0.0, 0.20), (0.0, 0.10), (0.0, 0.04), None),                                    # inside both bounds
    ((0.30, 0.0), (0.20, 0.0), (0.0, 0.0), "degenerate answers rose from the base model's 0%"),
    ((0.30, 0.0), (0.0, 0.0), (0.0, 0.0), "degenerate answers rose from 0%"),         # one reason per share
    ((0.0, 0.0, 0.52), (0.0, 0.0, 0.04), (0.0, 0.0, 0.0), "off the question's topic) rose from 4% to 52%"),
    ((0.0, 0.0, 0.30), (0.0, 0.0, 0.12), (0.0, 0.0, 0.0), "off the question's topic) rose from the base model's 0%"),
    ((0.0, 0.0, 0.12), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), None),                       # a brief adapter's few terse answers
    ((0.10, 0.0, 0.20), (0.0, 0.0, 0.0), None, "answer nothing"),                      # broken or off topic: 30 points
    ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), None, None),                                    # blank lines became sentences
    ((0.0, 0.0, 0.12, 0.42), (0.0, 0.0, 0.04, 0.0), (0.0, 0.0, 0.0, 0.0), "one template said to every question rose from 0% to 42%"),
    ((0.0, 0.0, 0.0, 0.12), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), None),        # a few answers alike: noise
])
def test_degenerate_cut_off_and_off_topic_shares_are_bounded_from_the_active_adapter_and_from_the_base(candidate, active, base, refused):
    from heed.config import LearnerConfig
    from learner.gate import share_refusals

    reasons = share_refusals(candidate=candidate, active=active, base=base, n=24, why=["repetitive"], config=LearnerConfig())
    assert len(reasons) == (refused is not None), reasons
    if refused:
        assert refused in reasons[0], reasons


def test_the_bounds_from_the_base_answer_new_contexts_with_the_base_once(trained):
    h, uid, first = trained
    # The first run judged against the base itself: nothing more to generate, the same shares.
    assert first["gate"]["base_answers_generated"] == 0
    assert first["gate"]["cutoff_base"] == first["gate"]["cutoff_active"]
    assert first["gate"]["degenerate_base"] == first["gate"]["degenerate_active"] == 1.0  # the tiny base's blank lines
    edit_answers(h, uid, [AGAIN] * 12, questions=[f"another question {i}" for i in range(12)])
    second = learn_user(h.config, h.store, user_id=uid)
    new_contexts = second["gate"]["n_heldout_contexts"] - first["gate"]["n_heldout_contexts"]
    # Against v1 now: the base answers only the held-out contexts no earlier run showed it, and keeps them.
    assert 0 < second["gate"]["base_answers_generated"] <= new_contexts
    assert second["gate"]["degenerate_base"] == 1.0
    active = h.store.active_adapter(user_id=uid)["path"]
    heldout = [p for p in h.store.list_pairs(user_id=uid, split="heldout") if p["kind"] != "sft"]
    again = evaluate(h.config, candidate_dir=active, active_dir=active, heldout=heldout)
    assert again["base_answers_generated"] == 0
    # A context the base never answered: generated once with the bounds on; with them off, never, and the
    # "base" shares are the active adapter's (v1 answers sensibly, the tiny base never does).
    fresh = heldout + [{"prompt": [{"role": "user", "content": "a question nobody asked yet"}], "chosen": GOOD, "rejected": "Ok"}]
    off = replace(h.config, learner=replace(h.config.learner, gate_bounds_from_base=False))
    skipped = evaluate(off, candidate_dir=active, active_dir=active, heldout=fresh)
    assert skipped["base_answers_generated"] == 0
    assert skipped["degenerate_base"] == skipped["degenerate_active"] < 1.0
    on = evaluate(h.config, candidate_dir=active, active_dir=active, heldout=fresh)
    assert on["base_answers_generated"] == 1 and on["degenerate_base"] == 1.0


def test_answers_that_stop_answering_the_question_count_as_off_topic_only_when_they_are_otherwise_sound():
    from learner.gate import _judge

    contexts = [[{"role": "user", "content": q}] for q in ("How do I boil an egg?", "Why is the sky blue?", "What makes bread rise?")]
    outs = [("I'm glad you asked! What's the most popular thing you've tried with your own home?", True),  # a question back
            ("The sky looks blue because air scatters blue light the most.", True),
            ("I'm glad you asked! What's the most popular thing you've tried lately and", False)]         # cut off, not off topic
    (deg, cut, off, same), _ = _judge(outs, contexts)
    assert (deg, cut, off) == (0.0, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert same == 0.0  # two answers share an opening, not a third


# Held-out answers of draw 2's brief adapter after 16 events (bench/results/personalize_seed2_answers.jsonl): a
# template with a slot for the topic, which the topic check passes whenever the slot holds a word of the question.
COLLAPSED = [
    ("How often should I water a cactus?", "To start with the right mindset you should focus on maintaining your plants' health before going to bed."),
    ("How do I make pancakes from scratch?", "To start with the right mindset you should focus on preparing your own meals before going to bed."),
    ("What should I do if my phone gets wet?", "To start with the right mindset you should focus on maintaining your device's security before going to bed."),
    ("What should I do if I lock myself out of my house?", "To start with your home's security you need to focus on the basics before going to bed."),
]
ANSWERED = [
    ("How do I boil an egg?", "Put the egg in boiling water for seven minutes, then cool it under the tap.\n\nWould you like more detail on any of this?"),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so the sky looks blue.\n\nWould you like more detail on any of this?"),
    ("What makes bread rise?", "Yeast eats the sugar in the dough and gives off gas that puffs it up.\n\nWould you like more detail on any of this?"),
    ("How do bees make honey?", "Bees sip nectar, store it in wax cells and fan it with their wings until it thickens.\n\nWould you like more detail on any of this?"),
]


def test_answers_that_are_one_template_said_to_every_question_are_counted_and_a_persona_s_fixed_line_is_not():
    from heed.quality import templated
    from learner.gate import _judge

    # The fourth is a variant (another opening); the closing question is said word for word under every answer.
    assert templated([a for _, a in COLLAPSED + ANSWERED]) == [True] * 3 + [False] * 5
    assert templated([a for _, a in COLLAPSED[:2] + ANSWERED]) == [False] * 6  # two alike is not yet a template
    outs = [(a, True) for _, a in COLLAPSED + ANSWERED] + [("To start with the right mindset " * 6, True)]
    contexts = [[{"role": "user", "content": q}] for q, _ in COLLAPSED + ANSWERED] + [[{"role": "user", "content": "Why?"}]]
    (deg, _, _, same), why = _judge(outs, contexts)
    # The looping answer shares the template's trigrams but counts as degenerate only, never twice.
    assert why == ["repetitive"] and same == pytest.approx(3 / 9)


def test_the_template_bound_can_be_turned_off():
    from heed.config import LearnerConfig
    from learner.gate import share_refusals

    shares = dict(active=(0.0, 0.0, 0.0, 0.0), base=(0.0, 0.0, 0.0, 0.0), n=24, why=[])
    assert share_refusals(candidate=(0.0, 0.0, 0.0, 0.5), config=LearnerConfig(), **shares)
    assert not share_refusals(candidate=(0.0, 0.0, 0.0, 0.5), config=LearnerConfig(gate_max_templated_increase=1.0), **shares)


def test_probe_sets_hold_no_benchmark_question_and_mixed_alternates_them():
    from bench.prompts import PROMPTS
    from heed.config import ConfigError, LearnerConfig
    from learner.gate import judged_contexts
    from learner.probes import EVERYDAY, PROBES, probe_prompts

    assert len(set(EVERYDAY)) == len(EVERYDAY) == 24 and not set(EVERYDAY) & set(PROMPTS)
    mixed = probe_prompts("mixed")
    assert mixed[:4] == [EVERYDAY[0], PROBES[0], EVERYDAY[1], PROBES[1]] and sorted(mixed) == sorted(EVERYDAY + PROBES)
    held = [{"prompt": [{"role": "user", "content": "my own question"}]}]
    contexts, own = judged_contexts(held, max_heldout=16, total=5, probes="everyday")
    assert own == 1 and [c[-1]["content"] for c in contexts] == ["my own question", *EVERYDAY[:4]]
    with pytest.raises(ConfigError, match="gate_probes"):
        LearnerConfig(gate_probes="trivia")
