"""A two-user world for the isolation tests: alice owns everything (with secret text in every
kind of record and a trained, active adapter); bob owns almost nothing.

``snapshot`` reads every row of a user from every table that has a ``user_id``
column (found from the schema, so a table added later is covered too) and hashes
their adapter files, so "nothing of alice's changed" is one equality.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SECRET = "ZQX-ALICE-SECRET"


def build_world(heed) -> dict:
    """Alice: two conversations, edits, thumbs, an alternative, a pick, a rating, a note, an
    active adapter and unconsumed feedback after it. Bob: one conversation of his own."""
    a = heed.add_user("alice", "alice-password-1")
    b = heed.add_user("bob", "bob-password-1")
    conv = heed.start_conversation(a, title=f"{SECRET}-title")
    first = heed.chat(a, conv, f"my pin is {SECRET}-pin").wait()
    edit = heed.edit(a, first.message_id, f"edited {SECRET}-edit")
    second = heed.chat(a, conv, f"second {SECRET}-question").wait()
    thumb = heed.thumb(a, second.message_id, False, reasons=["wrong"], comment=f"{SECRET}-comment")
    alt = heed.regenerate(a, second.message_id).wait()
    pick = heed.choose(a, alt.message_id, second.message_id)
    rating = heed.rate(a, conv, 5)
    note = heed.add_note(a, f"{SECRET}-note")
    run = heed.learn(a)
    assert run["status"] == "promoted", run
    # Bound to the new adapter, with fresh (unconsumed) feedback after the run.
    conv2 = heed.start_conversation(a)
    third = heed.chat(a, conv2, f"third {SECRET}-after-learning").wait()
    thumb2 = heed.thumb(a, third.message_id, True, comment=f"{SECRET}-up")
    edit2 = heed.edit(a, third.message_id, f"edited again {SECRET}-edit2")

    bob_conv = heed.start_conversation(b)
    bob_reply = heed.chat(b, bob_conv, "bob's own question").wait()

    messages = [m["id"] for c in (conv, conv2) for m in heed.store.history(user_id=a, conversation_id=c, include_inactive=True)]
    return {
        "alice": a, "bob": b,
        "conversations": [conv, conv2],
        "messages": messages,
        "answers": [first.message_id, second.message_id, alt.message_id, third.message_id],
        "feedback": [edit, thumb, pick, rating, thumb2, edit2],
        "notes": [note],
        "versions": [run["version"]],
        "bob_conversation": bob_conv, "bob_message": bob_reply.message_id,
    }


def user_tables(store) -> list[str]:
    with store.db.connect() as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return sorted(n for n in names if any(c[1] == "user_id" for c in db.execute(f"PRAGMA table_info({n})")))


def snapshot(store, user_id: int, adapters_path: Path | None = None) -> dict:
    """Every row of ``user_id`` in every table (and their adapter files' hashes)."""
    out: dict = {}
    with store.db.connect() as db:
        out["users"] = [tuple(r) for r in db.execute("SELECT * FROM users WHERE id = ?", [user_id])]
        for table in user_tables(store):
            out[table] = [tuple(r) for r in db.execute(f"SELECT * FROM {table} WHERE user_id = ? ORDER BY rowid", [user_id])]
    if adapters_path is not None:
        folder = adapters_path / str(user_id)
        out["files"] = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}
    return out


def foreign_references(store, user_id: int) -> list[str]:
    """Rows of ``user_id`` that point at another user's conversation or message (must be none)."""
    bad = []
    with store.db.connect() as db:
        for table in user_tables(store):
            cols = {c[1] for c in db.execute(f"PRAGMA table_info({table})")}
            for col, parent in (("conversation_id", "conversations"), ("message_id", "messages")):
                if col in cols:
                    rows = db.execute(
                        f"SELECT t.rowid FROM {table} t JOIN {parent} p ON p.id = t.{col} WHERE t.user_id = ? AND p.user_id != ?",
                        [user_id, user_id]).fetchall()
                    bad += [f"{table}.{col} row {r[0]}" for r in rows]
    return bad


def test_the_world_has_secret_text_in_every_kind_of_record(tmp_path, tiny_model_path, shared_tiny_engine):
    from conftest import make_config

    from heed.service import Heed

    heed = Heed(make_config(tmp_path, tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0}),
                engine=shared_tiny_engine)
    w = build_world(heed)
    snap = snapshot(heed.store, w["alice"], heed.config.adapters_path)
    text = repr(snap)
    for table in ("conversations", "messages", "feedback", "notes", "pairs", "adapters", "learner_runs"):
        assert snap[table], f"alice has no {table} rows"
    assert text.count(SECRET) >= 8
    assert any(name.endswith("adapter_model.safetensors") for name in snap["files"])
    assert heed.store.count_unconsumed(user_id=w["alice"]) >= 2
    assert SECRET not in repr(snapshot(heed.store, w["bob"]))


# -- one real `heed serve` on alice's and bob's world, shared by the HTTP tests ------------------------------
_SERVER: dict = {}


def world_server(tmp_path_factory, tiny_model_path, engine) -> dict:
    """Build the world, start `heed serve` on it (once per test run) and open alice's browser session.

    Returns {"url", "heed", "world", "config", "alice" (a logged-in GradioClient with a conversation open,
    an answer focused and the notes tab rendered), "rendered" (fn ids of events created by gr.render in
    alice's session), "log"}.
    """
    if _SERVER:
        if _SERVER["proc"].poll() is not None:
            raise RuntimeError("the shared test server died: " + Path(_SERVER["log"]).read_text(errors="replace")[-3000:])
        return _SERVER
    import atexit

    import yaml
    from conftest import make_config

    from bench.load import GradioClient, free_port, start_server, stop_server
    from heed.service import Heed

    root = tmp_path_factory.mktemp("served")
    config = make_config(root / "data", tiny_model_path, learner={"gate_enabled": False, "heldout_fraction": 0.0},
                         app={"port": free_port(), "login_max_failures": 3, "login_lockout_seconds": 2})
    heed = Heed(config, engine=engine)
    world = build_world(heed)
    config_file = root / "heed.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    log = root / "serve.log"
    proc, url = start_server(config_file, log_path=log)
    atexit.register(stop_server, proc)

    alice = GradioClient(url)
    assert alice.login("alice", "alice-password-1")
    alice.call("page_load")
    opened = alice.call("chat_open", [None, world["conversations"][0]])
    assert opened.ok and SECRET in opened.text, "alice cannot see her own conversation over HTTP"
    liked = alice.call("chat_like", [None], event_data={"index": 1, "value": None, "liked": True})
    assert liked.ok, liked.warnings or liked.error
    assert alice.call("learned_show").ok
    # The browser runs gr.render's function when its input state changes; a raw client calls it itself.
    renders = [d["id"] for d in alice.config()["dependencies"] if d.get("render_id") is not None]
    rendered = set()
    for fn in renders:
        out = alice.call(fn)
        for m in _messages(out.text):
            rendered |= {d["id"] for d in ((m.get("output") or {}).get("render_config") or {}).get("dependencies", [])}
    rendered = sorted(rendered - set(renders))
    _SERVER.update(url=url, heed=heed, world=world, config=config, config_file=config_file, alice=alice, proc=proc,
                   rendered=rendered, log=str(log), stop=lambda: stop_server(proc))
    return _SERVER


def _messages(text: str) -> list[dict]:
    import json

    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
