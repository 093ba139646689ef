"""Every kind of feedback given through the chat UI lands in the store in the shape the learner reads:
built into training examples by learner.pairs.build_examples, each as DESIGN.md's table says."""
from __future__ import annotations

import gradio as gr
import pytest

from chat_app.handlers import Handlers
from chat_app_helpers import Session
from conftest import make_config
from heed.service import Heed
from learner.pairs import build_examples


@pytest.fixture(scope="module")
def sampling_engine(tiny_model_path, tmp_path_factory):
    """The tiny model with sampling on: its greedy answers are blank, and a correction needs a non-empty answer."""
    from heed.engine import Engine

    return Engine.load(make_config(tmp_path_factory.mktemp("sampling"), tiny_model_path, generation={"do_sample": True}))


def test_every_feedback_kind_becomes_the_training_signal_design_md_describes(tmp_path, tiny_model_path, sampling_engine):
    heed = Heed(make_config(tmp_path / "data", tiny_model_path, generation={"do_sample": True}), engine=sampling_engine)
    alice = heed.add_user("alice", "alice-password")
    heed.add_user("bob", "bob-password")
    h = Handlers(heed)
    s = Session(h, "alice")
    s.open()
    for q in ["Tell me about cats", "And dogs?", "And birds?", "And fish?"]:
        s.send(q)
    conv = s.state["conv"]
    answer = [m for m in heed.history(alice, conv) if m["role"] == "assistant"]  # chat messages 1, 3, 5, 7

    s("like", evt=gr.LikeData(None, {"index": 1, "value": None, "liked": True}))
    s("like", evt=gr.LikeData(None, {"index": 3, "value": None, "liked": False}))
    s("save_feedback", ["too long"], "rambles")
    s("edit", evt=gr.EditData(None, {"index": 5, "value": "Birds have feathers.", "previous_value": None}))
    s("select", evt=gr.SelectData(None, {"index": 7, "value": None}))
    s("correct", "shorter", False)
    corrected = heed.history(alice, conv)[7]
    s.send("And snakes?")
    snake = heed.history(alice, conv)[9]
    s("retry", evt=gr.RetryData(None, {"index": 8, "value": None}))
    picked = s.state["pending"]["alternative"]
    s("choose_second")
    s.send("And newts?")
    newt = heed.history(alice, conv)[11]
    s("rate", 5)

    feedback = heed.store.list_feedback(user_id=alice)
    assert sorted(f["kind"] for f in feedback) == ["comparison", "correction", "edit", "rating", "thumb", "thumb"]
    examples = build_examples(heed.store, user_id=alice, feedback=feedback, heldout_fraction=0.0)
    by = {}
    for e in examples:
        by.setdefault((e["source"], e["kind"]), []).append(e)

    def prompt_before(message):
        return [{"role": m["role"], "content": m["content"]} for m in heed.history(alice, conv) if m["position"] < message["position"]]

    # Thumbs: a lone vote is a KTO example with its label; a rated-5 conversation weighs 1.5x.
    (up,) = by[("thumb", "kto")][:1]
    labels = sorted((e["completion"], e["label"]) for e in by[("thumb", "kto")])
    assert labels == sorted([(answer[0]["content"], 1), (answer[1]["content"], 0)])
    assert up["prompt"] == prompt_before(answer[0]) and up["weight"] == pytest.approx(1.5)
    # Edit: chosen = the user's text, rejected = the model's; plus an SFT target.
    (pair,) = by[("edit", "dpo")]
    assert pair["chosen"] == "Birds have feathers." and pair["rejected"] == answer[2]["content"]
    assert by[("edit", "sft")][0]["completion"] == "Birds have feathers."
    # Correction: the pair sits on the context WITHOUT the instruction.
    (pair,) = by[("correction", "dpo")]
    assert pair["chosen"] == corrected["content"].strip() and pair["rejected"] == answer[3]["content"]
    assert pair["prompt"] == prompt_before(answer[3]) and "shorter" not in str(pair["prompt"])
    assert by[("correction", "sft")][0]["completion"] == corrected["content"].strip()
    # Comparison: the picked answer over the other.
    (pair,) = by[("comparison", "dpo")]
    chosen = heed.store.get_message(user_id=alice, message_id=picked)
    assert pair["chosen"] == chosen["content"] and pair["rejected"] == snake["content"]
    # Rating: a 5-star conversation labels its otherwise-unjudged answers as good.
    rated = {e["completion"]: e["label"] for e in by[("rating", "kto")]}
    assert rated.get(newt["content"]) == 1
    assert answer[0]["content"] not in rated, "an answer with its own vote gets no rating label"
    # Bob gave nothing: nothing to learn for him.
    bob = heed.user_id("bob")
    assert heed.store.list_feedback(user_id=bob) == []
    assert build_examples(heed.store, user_id=bob, feedback=[], heldout_fraction=0.0) == []
