"""The learned tab's "learn now": a real learner run in a child process, polled like the page's timer does."""
from __future__ import annotations

import time

import gradio as gr

from chat_app.handlers import Handlers
from chat_app_helpers import Session
from heed.service import Heed


def test_learn_now_trains_in_the_background_and_the_next_conversation_says_so(tiny_config, shared_tiny_engine):
    heed = Heed(tiny_config, engine=shared_tiny_engine)
    alice = heed.add_user("alice", "alice-password")
    heed.add_user("bob", "bob-password")
    h = Handlers(heed)
    s = Session(h, "alice")
    out = s.open()
    assert out["timer"].active is False and "No adapter yet" in out["adapter_md"]
    for i, q in enumerate(["What is water?", "What is ice?", "What is steam?", "What is snow?"]):
        s.send(q)
        s("edit", evt=gr.EditData(None, {"index": 2 * i + 1, "value": f"Short answer number {i}.", "previous_value": None}))

    t0 = time.monotonic()
    out = s("learn_now")
    assert out["info"].startswith("Learning started") and out["timer"].active is True
    assert time.monotonic() - t0 < 2, "the handler returns at once; training runs in another process"
    assert "already going" in s("learn_now")["warning"], "a second click while it runs starts nothing"
    assert "warning" not in Session(h, "bob").open(), "other users are not held up"

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = s("learn_poll")
        if "timer" in out:  # the run ended: the whole tab was refreshed
            break
        assert "Learning" in out["learn_status"]
        time.sleep(0.5)
    assert out["timer"].active is False
    assert "promoted v1" in out["learn_status"], out["learn_status"]
    assert "In use: v1" in out["adapter_md"] and "4 feedback events" in out["adapter_md"]
    assert out["rollback_to"]["value"] == 1
    (run,) = heed.store.list_runs(user_id=alice)
    assert run["status"] == "promoted" and run["n_feedback"] == 4

    out = s("new_chat")
    assert "learned from your feedback" in out["notice"]["value"] and "v1" in out["notice"]["value"]
    s.send("Hello")
    assert heed.store.get_conversation(user_id=alice, conversation_id=s.state["conv"])["adapter_version"] == 1
    assert s("new_chat")["notice"]["visible"] is False, "said once, not in every conversation"

    out = s("rollback", 0)
    assert "base model" in out["info"] and heed.store.active_adapter(user_id=alice) is None
    assert heed.store.list_runs(user_id=heed.user_id("bob")) == []


def test_the_adapter_summary_says_how_many_examples_a_refused_run_left_to_retry():
    from chat_app.views import adapter_markdown

    def summary(**metrics):
        active = {"version": 3, "created_at": time.time(), "n_feedback": 4, "metrics": {"n_train_new": 3, "n_replay": 8, **metrics}}
        return adapter_markdown({"active": active, "unconsumed_feedback": 0})

    assert "(3 new training examples, 5 retried after a refused run, 8 replayed)" in summary(n_carried=5)
    assert "retried" not in summary(n_carried=0) and "retried" not in summary()
