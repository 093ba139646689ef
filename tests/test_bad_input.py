"""Bad input through the service API and the config: property-based (hypothesis), modest counts.

Every call either succeeds and stores exactly the cleaned text, or raises a clear
error (InputError / NotFound / ConfigError naming the key) and leaves every table
exactly as it was.
"""
from __future__ import annotations

import inspect
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heed.config import ConfigError, describe, load_config
from heed.service import Heed, InputError
from heed.store import NotFound

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                    derandomize=True)
MB = 1_000_000

# Text that breaks naive code: control characters, lone surrogates, markup, right-to-left marks, NULs, sizes.
nasty_char = st.one_of(st.characters(categories=["Cs"]), st.characters(categories=["Cc"]), st.characters(codec="utf-8"),
                       st.sampled_from(["\x00", "\u202e", "\ufeff", "\r", "\u2028", "'", '"', "\\", "<", "&"]))
nasty_piece = st.one_of(nasty_char, st.sampled_from(["%s", "{0}", "<b>", "</textarea>", "javascript:", "\r\n", "NULL"]))
nasty_text = st.one_of(
    st.lists(nasty_piece, max_size=40).map("".join),
    st.sampled_from(["", " ", "\n\t\r", "\x00", "\x00\x00 ", "\ud800", "a\udfffb", "<script>alert(1)</script>",
                     "<img src=x onerror=alert(1)>", "'); DROP TABLE messages;--", "x" * MB, "é" * MB, "\x00" * MB,
                     "{{7*7}}", "${jndi:ldap://x}", "\u202eevil"]),
)
wrong_ids = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=True), st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=2), st.integers(), max_size=1), st.integers(max_value=0),
                      st.integers(min_value=2**63), st.binary(max_size=3))


def counts(store) -> dict:
    with store.db.connect() as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(rowid AS TEXT))), 0) FROM {t}").fetchone() for t in tables}


def dump(store) -> str:
    """Every table's content, for 'nothing changed' checks."""
    with store.db.connect() as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return json.dumps({t: [list(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY rowid")] for t in tables}, default=str)


def expected_clean(text: str) -> str:
    text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_model_path, shared_tiny_engine):
    from conftest import make_config

    heed = Heed(make_config(tmp_path_factory.mktemp("bad"), tiny_model_path), engine=shared_tiny_engine)
    uid = heed.add_user("alice", "pw")
    conv = heed.start_conversation(uid)
    answer = heed.chat(uid, conv, "hello").wait()
    return heed, uid, conv, answer.message_id, answer.user_message_id


def _fresh_answer(heed, uid):
    conv = heed.start_conversation(uid)
    reply = heed.chat(uid, conv, "hi").wait()
    return conv, reply.message_id, reply.user_message_id


TEXT_OPS = {
    "chat": lambda h, u, conv, mid, umid, t: h.chat(u, conv, t),
    "edit": lambda h, u, conv, mid, umid, t: h.edit(u, mid, t),
    "correct": lambda h, u, conv, mid, umid, t: h.correct(u, mid, t),
    "resend": lambda h, u, conv, mid, umid, t: h.resend(u, umid, t),
    "add_note": lambda h, u, conv, mid, umid, t: h.add_note(u, t),
    "rename_conversation": lambda h, u, conv, mid, umid, t: h.rename_conversation(u, conv, t),
    "thumb_comment": lambda h, u, conv, mid, umid, t: h.thumb(u, mid, False, reasons=[t], comment=t),
}


def stored_texts(heed, uid) -> str:
    """Everything of the user's that holds text, as one string."""
    with heed.store.db.connect() as db:
        rows = [r[0] for r in db.execute("SELECT content FROM messages WHERE user_id = ?", [uid])]
        rows += [r[0] for r in db.execute("SELECT payload FROM feedback WHERE user_id = ?", [uid])]
        rows += [r[0] for r in db.execute("SELECT text FROM notes WHERE user_id = ?", [uid])]
        rows += [r[0] for r in db.execute("SELECT title FROM conversations WHERE user_id = ?", [uid])]
    return "\n".join(rows)


@SETTINGS
@given(op=st.sampled_from(sorted(op for op in TEXT_OPS if hasattr(Heed, op.replace("_comment", "")))), text=nasty_text)
def test_text_is_stored_cleanly_or_refused_with_nothing_written(svc, record_property, op, text):
    heed, uid, *_ = svc
    record_property("inputs_tried", 1)
    conv, mid, umid = _fresh_answer(heed, uid)
    before = dump(heed.store)
    try:
        result = TEXT_OPS[op](heed, uid, conv, mid, umid, text)
        if hasattr(result, "wait"):
            result.wait()
    except InputError as exc:
        assert str(exc), "an InputError must say what is wrong"
        assert len(str(exc)) < 300, "the error must not echo the whole input"
        assert dump(heed.store) == before, f"{op} refused the input but changed the store"
        return
    clean = expected_clean(text)
    assert clean.strip() or op == "thumb_comment", f"{op} accepted an empty text"
    assert stored_as_given(heed, uid, op, conv, mid, result) == stored_expectation(op, clean)
    stored_texts(heed, uid).encode("utf-8")  # no lone surrogate reached the database


def stored_expectation(op: str, clean: str):
    if op == "thumb_comment":
        return {"comment": clean[:2000], "reasons": [clean[:40]]}
    if op == "add_note":
        return clean.strip()
    return clean


def stored_as_given(heed, uid, op, conv, mid, result):
    store = heed.store
    if op in ("chat", "resend"):
        return store.get_message(user_id=uid, message_id=result.user_message_id)["content"]
    if op == "edit":
        return store.get_message(user_id=uid, message_id=mid)["content"]
    if op == "correct":
        return store.list_feedback(user_id=uid, kind="correction")[-1]["payload"]["instruction"]
    if op == "add_note":
        return next(n["text"] for n in heed.notes(uid) if n["id"] == result)
    if op == "rename_conversation":
        return store.get_conversation(user_id=uid, conversation_id=conv)["title"]
    payload = store.thumb_for(user_id=uid, message_id=mid)["payload"]
    return {"comment": payload["comment"], "reasons": payload["reasons"]}


def id_taking_methods() -> list[tuple[str, list[str]]]:
    out = []
    for name, fn in inspect.getmembers(Heed, predicate=inspect.isfunction):
        if name.startswith("_"):
            continue
        params = [p for p in inspect.signature(fn).parameters if p == "user_id" or p.endswith("_id") or p == "version"]
        if params:
            out.append((name, params))
    return out


SKIP_FOR_IDS = {"delete_user", "learn", "learn_in_background"}  # valid-id behaviour is tested elsewhere; slow or destructive


@SETTINGS
@given(data=st.data())
def test_ids_of_the_wrong_type_get_a_clear_error_and_change_nothing(svc, record_property, data):
    heed, uid, conv, mid, umid = svc
    record_property("inputs_tried", 1)
    name, params = data.draw(st.sampled_from([m for m in id_taking_methods() if m[0] not in SKIP_FOR_IDS]), label="method")
    bad_param = data.draw(st.sampled_from(params), label="param")
    bad = data.draw(wrong_ids, label="value")
    good = {"user_id": uid, "conversation_id": conv, "message_id": mid, "chosen_id": mid, "other_id": mid,
            "feedback_id": 1, "note_id": 1, "version": None}
    sig = inspect.signature(getattr(Heed, name))
    kwargs = {}
    for p, param in sig.parameters.items():
        if p == "self":
            continue
        if p == bad_param:
            kwargs[p] = bad
        elif p in good:
            kwargs[p] = good[p]
        elif param.default is not inspect.Parameter.empty:
            continue
        elif p in ("text", "new_text", "instruction", "title"):
            kwargs[p] = "fine text"
        elif p == "up":
            kwargs[p] = True
        elif p == "stars":
            kwargs[p] = 3
        else:
            pytest.fail(f"Heed.{name}: no value for {p!r}")
    if bad is None and sig.parameters[bad_param].default is None:
        return  # None is that argument's documented default
    before = dump(heed.store)
    with pytest.raises((InputError, NotFound)) as info:
        result = getattr(heed, name)(**kwargs)
        if hasattr(result, "wait"):
            result.wait()
    assert bad_param in str(info.value) or "not found" in str(info.value)
    assert dump(heed.store) == before


@pytest.mark.parametrize("up", ["false", 0, 1, "yes", [True], {"liked": True}])
def test_a_vote_must_be_true_false_or_nothing(svc, up):
    heed, uid, conv, mid, _ = svc
    with pytest.raises(InputError, match="up"):
        heed.thumb(uid, mid, up)


@pytest.mark.parametrize("stars", [0, 6, -1, 2.5, "5", None, True, 10**30])
def test_a_rating_is_one_to_five(svc, stars):
    heed, uid, conv, *_ = svc
    with pytest.raises(InputError):
        heed.rate(uid, conv, stars)


def test_a_crash_while_generating_stores_the_question_but_no_half_answer(svc, monkeypatch):
    heed, uid, conv, *_ = svc
    conv = heed.start_conversation(uid)

    def exploding(msgs, adapter=None, gen=None, **kw):
        yield "partial "
        raise RuntimeError("out of memory")

    monkeypatch.setattr(heed.engine, "stream", exploding)
    reply = heed.chat(uid, conv, "question")
    with pytest.raises(RuntimeError):
        reply.wait()
    monkeypatch.undo()
    history = heed.history(uid, conv)
    # The question is kept (acknowledged); the broken answer is stored as stopped or not at all, never duplicated.
    assert [m["role"] for m in history][:1] == ["user"] and len([m for m in history if m["role"] == "user"]) == 1
    again = heed.chat(uid, conv, "question again").wait()
    assert heed.history(uid, conv)[-1]["id"] == again.message_id


# -- the config ----------------------------------------------------------------------------------------
ABSURD = [float("nan"), float("inf"), float("-inf"), -10**18, 10**18, 10**100, None, [], {}, {"a": 1}, "", "   ", True, -1, 0, "1e9", [1, 2]]
KEYS = [k for k, _, _ in describe()]


def _override(key: str, value):
    parts = key.split(".")
    return {parts[0]: {parts[1]: value}} if len(parts) == 2 else {key: value}


@SETTINGS
@given(key=st.sampled_from(KEYS), value=st.one_of(st.sampled_from(ABSURD), st.integers(), st.floats(), st.text(max_size=8),
                                                   st.lists(st.integers(), max_size=2)))
def test_config_values_are_accepted_or_refused_naming_the_key(record_property, key, value):
    record_property("inputs_tried", 1)
    try:
        config = load_config(None, overrides=_override(key, value))
    except ConfigError as exc:
        assert key in str(exc), f"the error for {key}={value!r} does not name the key: {exc}"
        return
    section, _, name = key.rpartition(".")
    got = getattr(getattr(config, section) if section else config, name)
    assert type(got) in (type(dict(describe_defaults())[key]), float, str), f"{key} accepted {value!r} as {got!r}"


def describe_defaults():
    return [(k, d) for k, d, _ in describe()]


@pytest.mark.parametrize("key", [k for k, d, _ in describe() if isinstance(d, (int, float)) and not isinstance(d, bool)])
def test_numbers_refuse_nan_infinity_and_wrong_types(key):
    for value in [float("nan"), float("inf"), 10**100, "12", [], None, True]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, overrides=_override(key, value))


@pytest.mark.parametrize("where", ["", "model.", "generation.", "store.", "learner.", "app."])
def test_unknown_keys_are_refused_by_name(where):
    key = f"{where}no_such_knob"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides=_override(key, 1))


def test_a_broken_config_file_is_a_clear_error(tmp_path):
    for text, match in [("model: [1, 2]", "model"), ("- a\n- b", "mapping"), ("model: {device: tpu}", "model.device"),
                        ("{{{{", "YAML"), ("learner:\n  seed: -5", "learner.seed"), ("app:\n  port: 70000", "app.port")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
