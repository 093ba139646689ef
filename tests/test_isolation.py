"""Isolation through the service API and the CLI: bob, handed every id alice owns, reads and
changes nothing of hers.

The service methods are enumerated from ``heed.service.Heed`` itself, so a method
added later is called too (or the test says how to describe its arguments).
"""
from __future__ import annotations

import inspect
import itertools
import time

import pytest
from test_isolation_world import SECRET, build_world, foreign_references, snapshot

from heed.service import Heed, InputError, Reply
from heed.store import NotFound, StoreError

# Public methods that take no user_id, and why that is safe.
NOT_USER_SCOPED = {
    "open": "constructor",
    "add_user": "creates a new account; returns only its id",
    "authenticate": "takes a name and password, returns an id or None",
    "user_id": "name -> id lookup used by the CLI (admin)",
}
# Called last: bob deleting his own account must leave alice's intact.
LAST = ("delete_user",)
CLEAR_ERRORS = (NotFound, InputError, StoreError)


def _world(tmp_path, tiny_model_path, engine):
    from conftest import make_config

    config = make_config(tmp_path / "data", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0})
    heed = Heed(config, engine=engine)
    return heed, build_world(heed)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_path, shared_tiny_engine):
    return _world(tmp_path_factory.mktemp("iso"), tiny_model_path, shared_tiny_engine)


def argument_sets(method, w: dict) -> list[dict]:
    """Every way of calling ``method`` as bob with alice's ids (one id-bearing argument at a time)."""
    choices: dict[str, list] = {}
    for name, param in inspect.signature(method).parameters.items():
        if name == "self":
            continue
        if name == "user_id":
            choices[name] = [w["bob"]]
        elif name == "conversation_id":
            choices[name] = w["conversations"]
        elif name in ("message_id", "chosen_id"):
            choices[name] = w["messages"]
        elif name == "other_id":
            choices[name] = w["answers"][1:3]
        elif name == "feedback_id":
            choices[name] = w["feedback"]
        elif name == "note_id":
            choices[name] = w["notes"]
        elif name == "version":
            choices[name] = w["versions"] + [None]
        elif name in ("text", "new_text", "instruction", "title", "comment"):
            choices[name] = ["bob was here"]
        elif name == "up":
            choices[name] = [True, None]
        elif name == "stars":
            choices[name] = [1]
        elif name == "active":
            choices[name] = [False]
        elif param.default is not inspect.Parameter.empty:
            continue
        else:
            pytest.fail(f"Heed.{method.__name__}: no isolation value for required argument {name!r}; add one to argument_sets")
    keys = list(choices)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(choices[k] for k in keys))]


def call_as_bob(heed: Heed, name: str, kwargs: dict) -> str:
    """Call and fully consume the result; returns its text (for the secret scan) or the error."""
    try:
        result = getattr(heed, name)(**kwargs)
        if isinstance(result, Reply):
            result.wait()
            return f"{result.text} {result.message_id} {result.user_message_id}"
        if name == "learn_in_background" and result.get("started"):
            # Let the child finish (it finds no feedback of bob's) before anything else is compared.
            deadline = time.time() + 120
            while heed.learn_progress(kwargs["user_id"])["running"] and time.time() < deadline:
                time.sleep(0.5)
            return repr(result) + repr(heed.learn_progress(kwargs["user_id"]))
        return repr(result)
    except CLEAR_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def user_scoped_methods() -> list[str]:
    names = []
    for name, fn in inspect.getmembers(Heed, predicate=inspect.isfunction):
        if name.startswith("_"):
            continue
        if "user_id" in inspect.signature(fn).parameters:
            names.append(name)
        else:
            assert name in NOT_USER_SCOPED, (f"Heed.{name} takes no user_id: if it reads or writes user data it must; "
                                             f"otherwise list it in NOT_USER_SCOPED with why")
    return sorted(names, key=lambda n: n in LAST)


def test_every_service_method_refuses_alices_ids_to_bob(tmp_path, tiny_model_path, shared_tiny_engine, record_property):
    heed, w = _world(tmp_path, tiny_model_path, shared_tiny_engine)
    before = snapshot(heed.store, w["alice"], heed.config.adapters_path)
    calls = 0
    for name in user_scoped_methods():
        for kwargs in argument_sets(getattr(Heed, name), w):
            out = call_as_bob(heed, name, kwargs)
            calls += 1
            assert SECRET not in out, f"Heed.{name}({kwargs}) returned alice's text: {out[:300]}"
            after = snapshot(heed.store, w["alice"], heed.config.adapters_path)
            assert after == before, f"Heed.{name}({kwargs}) changed alice's data"
    assert calls >= 40
    assert foreign_references(heed.store, w["bob"]) == []
    record_property("service_isolation_calls", calls)
    record_property("service_methods_checked", len(user_scoped_methods()))


def test_reads_with_alices_ids_are_not_found_not_empty(world):
    """Bob gets a clear 'not found', the same as for an id that does not exist."""
    heed, w = world
    b = w["bob"]
    for conv in w["conversations"]:
        for fn in (lambda: heed.history(b, conv), lambda: heed.adapter_for(b, conv), lambda: heed.rate(b, conv, 2),
                   lambda: heed.chat(b, conv, "hi")):
            with pytest.raises(NotFound):
                fn()
    for mid in w["answers"]:
        for fn in (lambda: heed.thumb(b, mid, True), lambda: heed.edit(b, mid, "x"), lambda: heed.correct(b, mid, "shorter"),
                   lambda: heed.regenerate(b, mid)):
            with pytest.raises(NotFound):
                fn()
    with pytest.raises(NotFound):
        heed.rollback(b, w["versions"][0])
    assert heed.adapter_status(b)["active"] is None
    assert [c["id"] for c in heed.list_conversations(b)] == [w["bob_conversation"]]
    assert heed.notes(b) == []


def test_bob_still_works_normally_after_the_attempts(world):
    heed, w = world
    b = w["bob"]
    reply = heed.chat(b, w["bob_conversation"], "still here?").wait()
    assert heed.thumb(b, reply.message_id, True) > 0


# -- the CLI -------------------------------------------------------------------------------------------
CLI_USER_COMMANDS = {
    # (subcommand, action or None): argv builder (bob's name plus alice's ids where the command takes one)
    ("user", "passwd"): lambda w: ["user", "passwd", "bob", "--password-stdin"],
    ("user", "add"): lambda w: ["user", "add", "alice", "--password-stdin"],
    ("adapters", "list"): lambda w: ["adapters", "list", "--user", "bob"],
    ("adapters", "rollback"): lambda w: ["adapters", "rollback", "--user", "bob", "--version", str(w["versions"][0])],
    ("learn", None): lambda w: ["learn", "--once", "--user", "bob"],
    ("export", "dpo"): lambda w: ["export", "--user", "bob", "--format", "dpo", "--out", "{out}/dpo.jsonl"],
    ("export", "kto"): lambda w: ["export", "--user", "bob", "--format", "kto", "--out", "{out}/kto.jsonl"],
    ("export", "sft"): lambda w: ["export", "--user", "bob", "--format", "sft", "--out", "{out}/sft.jsonl"],
    ("user", "delete"): lambda w: ["user", "delete", "bob"],
}


def _commands_taking_a_user() -> set[str]:
    from heed.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = set()
    for name, p in sub.choices.items():
        dests = {a.dest for a in p._actions}
        if "user" in dests or "name" in dests:
            out.add(name)
    return out


def test_every_cli_command_that_takes_a_user_is_covered():
    covered = {cmd for cmd, _ in CLI_USER_COMMANDS}
    assert _commands_taking_a_user() <= covered, "a CLI command takes a user and is not in CLI_USER_COMMANDS"


def test_cli_commands_for_bob_leave_alice_untouched(tmp_path, tiny_model_path, shared_tiny_engine, capsys, monkeypatch, record_property):
    import io

    import yaml

    from heed.cli import main

    heed, w = _world(tmp_path, tiny_model_path, shared_tiny_engine)
    config_file = tmp_path / "heed.yaml"
    cfg = heed.config.to_dict()
    config_file.write_text(yaml.safe_dump(cfg))
    before = snapshot(heed.store, w["alice"], heed.config.adapters_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for (cmd, action), build in CLI_USER_COMMANDS.items():
        argv = ["--config", str(config_file)] + [a.replace("{out}", str(out_dir)) for a in build(w)]
        monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password\n"))
        code = main(argv)
        printed = capsys.readouterr()
        assert SECRET not in printed.out + printed.err, f"heed {' '.join(argv[2:])} printed alice's text"
        if cmd == "user" and action == "add":
            assert code == 2 and "already exists" in printed.err
        elif cmd == "adapters" and action == "rollback":
            assert code == 2 and "not found" in printed.err
        else:
            assert code == 0, f"heed {' '.join(argv[2:])} failed: {printed.err}"
        assert snapshot(heed.store, w["alice"], heed.config.adapters_path) == before, f"heed {' '.join(argv[2:])} changed alice's data"
    for f in out_dir.iterdir():
        assert SECRET not in f.read_text(encoding="utf-8"), f"export for bob wrote alice's text into {f.name}"
    assert heed.authenticate("alice", "alice-password-1") == w["alice"]
    assert "bob" not in [u["name"] for u in heed.store.list_users()]
    record_property("cli_isolation_commands", len(CLI_USER_COMMANDS))
