"""The chat UI's handlers, called directly with typed Gradio event data and a fake login (tiny model)."""
from __future__ import annotations

import threading

import gradio as gr
import pytest

from chat_app.handlers import Handlers
from chat_app_helpers import Session, last, login, messages, run
from heed.service import Heed


@pytest.fixture
def svc(tiny_config, shared_tiny_engine):
    return Heed(tiny_config, engine=shared_tiny_engine)


@pytest.fixture
def h(svc):
    svc.add_user("alice", "alice-password")
    svc.add_user("bob", "bob-password")
    return Handlers(svc)


def uid(h, name):
    return h.heed.user_id(name)


def feedback(h, name, kind=None):
    return h.heed.store.list_feedback(user_id=uid(h, name), kind=kind)


def chatting(h, name="alice", *texts):
    s = Session(h, name)
    s.open()
    for t in texts or ("What is water?",):
        s.send(t)
    return s


def like(index, liked, value=None):
    return gr.LikeData(None, {"index": index, "value": value, "liked": liked})


def test_send_streams_the_answer_then_stores_both_turns(h):
    s = Session(h, "alice")
    s.open()
    s.send("Hello there")
    assert len(s.updates) >= 3, "a first screen, streamed pieces, a final screen"
    assert s.updates[0]["msg"] == "" and s.updates[0]["stop"]["visible"] is True
    final = s.updates[-1]
    assert final["send"]["visible"] is True and final["stop"]["visible"] is False
    history = h.heed.history(uid(h, "alice"), s.state["conv"])
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert [m["content"] for m in messages(final)] == [m["content"] for m in history]
    assert final["convs"]["choices"] == [("Hello there", s.state["conv"])]


@pytest.mark.parametrize("bad", ["", "   \n", "x" * 8001, None, 5])
def test_empty_or_overlong_message_is_refused_and_stores_nothing(h, bad):
    s = Session(h, "alice")
    s.open()
    out = s.send(bad)
    assert out["warning"]
    assert "msg" not in out, "the typed text stays so the user can fix it"
    assert h.heed.list_conversations(uid(h, "alice")) == []


def test_html_and_scripts_in_messages_are_shown_as_text(h):
    s = chatting(h, "alice", "Hi <script>alert(1)</script> <img src=x onerror=alert(2)> `<b>code</b>`")
    shown = messages(s.updates[-1])[0]["content"]
    assert "<script" not in shown and "<img" not in shown and "&lt;script>" in shown
    assert "`<b>code</b>`" in shown, "code spans are left alone (Markdown shows them verbatim)"
    stored = h.heed.history(uid(h, "alice"), s.state["conv"])[0]["content"]
    assert stored.startswith("Hi <script>"), "the store keeps what the user typed"


def test_thumbs_down_with_reasons_then_change_and_withdraw_keeps_one_vote(h):
    s = chatting(h)
    answer = h.heed.history(uid(h, "alice"), s.state["conv"])[1]
    out = s("like", evt=like(1, False))
    assert "warning" not in out and out["feedback_box"]["visible"] and out["reasons"]["visible"]
    s("like", evt=like(1, False))  # a double click
    out = s("save_feedback", ["too long", "wrong"], "  far too wordy ")
    assert out["info"] == "Feedback saved."
    (vote,) = feedback(h, "alice", "thumb")
    assert vote["message_id"] == answer["id"]
    assert vote["payload"] == {"up": False, "reasons": ["wrong", "too long"], "comment": "far too wordy"}
    s("like", evt=like(1, True))
    (vote,) = feedback(h, "alice", "thumb")
    assert vote["payload"] == {"up": True, "reasons": [], "comment": ""}, "a changed vote drops the old reasons"
    out = s("like", evt=like(1, ""))  # clicking the highlighted thumb again withdraws the vote
    assert feedback(h, "alice") == []
    assert out["feedback_box"]["visible"] is False


def test_reasons_need_a_vote_and_known_tags(h):
    s = chatting(h)
    s("select", evt=gr.SelectData(None, {"index": 1, "value": None}))
    assert "like or dislike" in s("save_feedback", ["too long"], "")["warning"].lower()
    s("like", evt=like(1, False))
    assert "reasons are" in s("save_feedback", ["rude"], "")["warning"].lower()
    assert "reasons are" in s("save_feedback", "too long", "")["warning"].lower()
    assert "at most" in s("save_feedback", [], "x" * 2001)["warning"].lower()
    assert feedback(h, "alice", "thumb")[0]["payload"]["reasons"] == []


def test_a_thumb_clicked_while_the_answer_streams_lands_once_it_is_stored(h):
    s = Session(h, "alice")
    s.open()
    stream = h.send(s.state, "What is water?", s.request)
    next(stream), next(stream)  # the first screen, then the "…" placeholder: the answer is not stored yet
    votes: list[dict] = []
    clicker = threading.Thread(target=lambda: votes.append(h.like(s.state, s.request, like(1, True, "…"))))
    clicker.start()
    clicker.join(timeout=0.5)
    assert clicker.is_alive(), "the vote waits for the answer instead of failing"
    rest = list(stream)
    clicker.join(timeout=30)
    assert not clicker.is_alive() and "warning" not in votes[0], votes[0].get("warning")
    answer = h.heed.history(uid(h, "alice"), s.state["conv"])[1]
    (vote,) = feedback(h, "alice", "thumb")
    assert vote["message_id"] == answer["id"] and vote["payload"]["up"] is True
    assert rest and rest[-1]["send"]["visible"] is True


def test_a_thumb_on_text_the_answer_does_not_start_with_is_refused_after_the_stream(h):
    s = Session(h, "alice")
    s.open()
    stream = h.send(s.state, "What is water?", s.request)
    next(stream), next(stream)
    votes: list[dict] = []
    clicker = threading.Thread(target=lambda: votes.append(h.like(s.state, s.request, like(1, True, "Something else entirely"))))
    clicker.start()
    list(stream)
    clicker.join(timeout=30)
    assert "changed meanwhile" in votes[0]["warning"]
    assert feedback(h, "alice") == []


@pytest.mark.parametrize("index", [0, 2, 99, -1, "1", None, True, [1, 1], 2**80])
def test_feedback_on_anything_but_the_users_own_answer_is_refused(h, index):
    s = chatting(h)
    out = s("like", evt=like(index, False))
    assert out["warning"]
    assert feedback(h, "alice") == []


def test_unknown_vote_values_are_refused(h):
    s = chatting(h)
    for liked in ["Funny", 3, {"up": True}]:
        assert s("like", evt=like(1, liked))["warning"]
    assert feedback(h, "alice") == []


def test_the_user_comes_from_the_login_never_from_the_session(h):
    alice = chatting(h, "alice")
    conv = alice.state["conv"]
    # Bob's request arriving with Alice's session state (as if it were replayed) gets a fresh session.
    out = h.like(alice.state, login("bob"), like(1, False))
    assert out["warning"] and out["state"]["uid"] == uid(h, "bob") and out["state"]["conv"] is None
    out = h.open_conversation(out["state"], conv, login("bob"))
    assert out["warning"] and out["state"]["conv"] is None
    assert out["convs"]["choices"] == []
    assert feedback(h, "alice") == [] and feedback(h, "bob") == []
    assert h.load(None, login("mallory"))["warning"], "an unknown name is refused"


def test_edit_replaces_the_answer_and_keeps_the_original(h):
    s = chatting(h)
    before = h.heed.history(uid(h, "alice"), s.state["conv"])[1]
    edit = gr.EditData(None, {"index": 1, "value": [{"type": "text", "text": "Water is H2O."}],
                              "previous_value": [{"type": "text", "text": before["content"]}]})
    out = s("edit", evt=edit)
    assert out["info"].startswith("Edit saved")
    assert messages(out)[1]["content"] == "Water is H2O."
    msg = h.heed.store.get_message(user_id=uid(h, "alice"), message_id=before["id"])
    assert msg["content"] == "Water is H2O." and msg["original_content"] == before["content"]
    again = gr.EditData(None, {"index": 1, "value": "Water is H2O.", "previous_value": "Water is H2O."})
    s("edit", evt=again)  # submitting the same text again stores nothing new
    assert len(feedback(h, "alice", "edit")) == 1


def test_edit_text_round_trips_through_the_escaped_display(h):
    s = chatting(h)
    shown = "Use &lt;b> for bold, `<i>` stays"
    s("edit", evt=gr.EditData(None, {"index": 1, "value": shown, "previous_value": None}))
    assert h.heed.history(uid(h, "alice"), s.state["conv"])[1]["content"] == "Use <b> for bold, `<i>` stays"


@pytest.mark.parametrize("value", ["", "   ", "x" * 8001, None, [{"type": "file", "path": "/etc/passwd"}]])
def test_bad_edits_are_refused_and_the_chat_is_restored(h, value):
    s = chatting(h)
    before = h.heed.history(uid(h, "alice"), s.state["conv"])
    out = s("edit", evt=gr.EditData(None, {"index": 1, "value": value, "previous_value": None}))
    assert out["warning"]
    assert [m["content"] for m in messages(out)] == [m["content"] for m in before]
    assert h.heed.history(uid(h, "alice"), s.state["conv"]) == before and feedback(h, "alice") == []


def test_an_edit_based_on_a_stale_view_is_refused(h):
    s = chatting(h)
    out = s("edit", evt=gr.EditData(None, {"index": 1, "value": "new", "previous_value": "something else entirely"}))
    assert "changed meanwhile" in out["warning"] and feedback(h, "alice") == []


def test_editing_a_question_branches_the_conversation(h):
    s = chatting(h, "alice", "What is water?", "And ice?")
    s("edit", evt=gr.EditData(None, {"index": 2, "value": "And steam?", "previous_value": "And ice?"}))
    history = h.heed.history(uid(h, "alice"), s.state["conv"])
    assert [m["content"] for m in history if m["role"] == "user"] == ["What is water?", "And steam?"]
    assert len(history) == 4
    everything = h.heed.store.history(user_id=uid(h, "alice"), conversation_id=s.state["conv"], include_inactive=True)
    assert any(m["content"] == "And ice?" and m["status"] == "superseded" for m in everything)


def test_correction_rewrites_the_answer_in_place_and_can_become_a_standing_note(h):
    s = chatting(h, "alice", "What is water?", "And ice?")
    original = h.heed.history(uid(h, "alice"), s.state["conv"])[3]
    out = s("correct", "shorter please", True)
    assert "Saved as a standing preference" in out["info"]
    history = h.heed.history(uid(h, "alice"), s.state["conv"])
    assert len(history) == 4 and history[3]["id"] != original["id"] and history[3]["instruction"] == "shorter please"
    (fb,) = feedback(h, "alice", "correction")
    assert fb["payload"]["original_message_id"] == original["id"] and fb["payload"]["instruction"] == "shorter please"
    assert [n["text"] for n in h.heed.notes(uid(h, "alice"))] == ["shorter please"]
    assert "shorter please" in h.heed.system_prompt(uid(h, "alice"))
    out = s("correct", "Shorter please", True)
    assert "already saved" in out["info"] and len(h.heed.notes(uid(h, "alice"))) == 1


@pytest.mark.parametrize("bad", ["", "  ", "x" * 501, None])
def test_bad_corrections_are_refused_and_store_nothing(h, bad):
    s = chatting(h)
    before = h.heed.history(uid(h, "alice"), s.state["conv"])
    assert s("correct", bad, True)["warning"]
    assert h.heed.history(uid(h, "alice"), s.state["conv"]) == before
    assert feedback(h, "alice") == [] and h.heed.notes(uid(h, "alice")) == []


def test_regenerate_then_pick_the_second_answer(h):
    s = chatting(h)
    first = h.heed.history(uid(h, "alice"), s.state["conv"])[1]
    out = s("retry", evt=gr.RetryData(None, {"index": 0, "value": "What is water?"}))
    assert out["compare"]["visible"] is True and out["info"].startswith("Which answer")
    alternative = s.state["pending"]["alternative"]
    out = s("choose_second")
    assert out["compare"]["visible"] is False
    (fb,) = feedback(h, "alice", "comparison")
    assert fb["payload"]["chosen_id"] == alternative and fb["payload"]["rejected_id"] == first["id"]
    assert h.heed.history(uid(h, "alice"), s.state["conv"])[1]["id"] == alternative, "the pick continues the chat"
    out = s("choose_first")  # a late second click changes nothing
    assert "nothing to choose" in out["info"] and len(feedback(h, "alice", "comparison")) == 1


def test_only_the_latest_answer_can_be_regenerated(h):
    s = chatting(h, "alice", "What is water?", "And ice?")
    for index in [0, 1, 3, 7, "2"]:
        assert s("retry", evt=gr.RetryData(None, {"index": index, "value": None}))["warning"]
    assert s.state["pending"] is None


def test_undo_takes_back_the_last_exchange_and_returns_the_text(h):
    s = chatting(h, "alice", "What is water?", "And ice?")
    assert s("undo", evt=gr.UndoData(None, {"index": 0, "value": None}))["warning"]
    out = s("undo", evt=gr.UndoData(None, {"index": 2, "value": None}))
    assert out["msg"] == "And ice?" and len(messages(out)) == 2


def test_rating_the_conversation_keeps_only_the_latest(h):
    s = Session(h, "alice")
    s.open()
    assert "start a conversation" in s("rate", 4)["warning"].lower()
    s.send("Hi")
    s("rate", 2)
    s("rate", "5")
    (rating,) = feedback(h, "alice", "rating")
    assert rating["payload"] == {"stars": 5}
    for bad in [0, 6, 2.5, "five", None, True]:
        assert s("rate", bad)["warning"]
    assert feedback(h, "alice", "rating")[0]["payload"] == {"stars": 5}


def test_feedback_on_a_deleted_conversation_is_refused(h):
    s = chatting(h)
    conv = s.state["conv"]
    s("delete_ask")
    assert s("delete_confirm")["info"].startswith("Conversation deleted")
    assert h.heed.list_conversations(uid(h, "alice")) == []
    assert s("like", evt=like(1, False))["warning"]
    assert s("rate", 3)["warning"]
    assert s("open_conversation", conv)["warning"]
    assert feedback(h, "alice") == []


def test_delete_needs_the_confirmation_step(h):
    s = chatting(h)
    s("delete_confirm")
    assert len(h.heed.list_conversations(uid(h, "alice"))) == 1
    s("delete_ask")
    s("delete_cancel")
    s("delete_confirm")
    assert len(h.heed.list_conversations(uid(h, "alice"))) == 1


def test_each_user_lists_opens_and_renames_only_their_own_conversations(h):
    alice = chatting(h, "alice", "first")
    first = alice.state["conv"]
    alice("new_chat")
    alice.send("second")
    bob = chatting(h, "bob", "bob's own")
    assert [t for t, _ in alice.updates[-1]["convs"]["choices"]] == ["second", "first"]
    assert [t for t, _ in bob.updates[-1]["convs"]["choices"]] == ["bob's own"]
    assert bob("open_conversation", first)["warning"]
    out = alice("open_conversation", str(first))
    assert [m["content"] for m in messages(out)][0] == "first" and out["title"]["value"] == "first"
    alice("rename", "Renamed")
    assert h.heed.list_conversations(uid(h, "alice"))[0]["title"] == "Renamed"
    assert alice("rename", "   ")["warning"]


def test_a_second_generation_in_the_same_session_waits_for_the_first(h):
    s = chatting(h)
    first = h.send(s.state, "one", s.request)
    next(first)  # the first answer is streaming
    out = last(h.send(s.state, "two", s.request))
    assert "still answering" in out["warning"]
    other_tab = last(h.send(None, "from another tab", login("alice", "another-session")))
    assert "warning" not in other_tab, "another session of the same user is not blocked"
    run(first)
    assert "warning" not in last(h.send(s.state, "three", s.request))


def test_stop_ends_the_stream_and_keeps_what_was_written(h):
    s = chatting(h)
    stream = h.send(s.state, "Tell me more", s.request)
    next(stream)
    assert h.stop(s.state, s.request) == {}
    rest = run(stream)
    assert rest[-1]["send"]["visible"] is True
    history = h.heed.history(uid(h, "alice"), s.state["conv"])
    assert [m["role"] for m in history][-2:] == ["user", "assistant"]


def test_notes_can_be_added_edited_switched_off_and_deleted_by_their_owner_only(h):
    s = Session(h, "alice")
    s.open()
    out = s("note_add", "Answer briefly")
    (note,) = out["notes_data"]
    assert note["text"] == "Answer briefly" and note["active"] is True
    assert "already have" in s("note_add", "answer briefly ")["warning"]
    s("note_save", note["id"], "Answer very briefly", False)
    assert "Answer very briefly" not in h.heed.system_prompt(uid(h, "alice")), "a switched-off note is not followed"
    bob = Session(h, "bob")
    assert bob("note_delete", note["id"])["warning"]
    assert bob("note_save", note["id"], "hijacked", True)["warning"]
    assert s("note_save", note["id"], "", True)["warning"]
    assert h.heed.notes(uid(h, "alice"))[0]["text"] == "Answer very briefly"
    s("note_delete", note["id"])
    assert h.heed.notes(uid(h, "alice")) == []


def test_rollback_accepts_only_the_users_own_versions(h):
    s = Session(h, "alice")
    out = s.open()
    assert out["rollback_to"]["choices"] == [("Base model (no adapter)", 0)]
    for bad in [1, 7, -1, "x", None]:
        assert s("rollback", bad)["warning"]
    assert "base model" in s("rollback", 0)["info"]


def test_the_app_builds_with_named_undocumented_endpoints(svc):
    from chat_app.app import build_app

    demo = build_app(svc)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"chat_send", "chat_like", "chat_edit", "chat_retry", "chat_correct", "chat_choose_first", "chat_rate",
            "chat_feedback", "notes_add", "adapter_rollback", "learn_now"} <= names
    assert all(d.api_visibility != "public" for d in demo.fns.values())
    chatbot = next(b for b in demo.blocks.values() if isinstance(b, gr.Chatbot))
    assert chatbot.editable == "all" and chatbot.sanitize_html and chatbot.allow_tags is False
