"""Isolation over HTTP against a real `heed serve`: bob, logged in through the login form, calls every
event the app exposes — named or not, by fn_index through /gradio_api/queue/join and the SSE stream,
including events gr.render created in alice's session — with alice's conversation, message, feedback,
note and adapter ids, directly (no browser). Nothing of alice's comes back and nothing of hers changes.
"""
from __future__ import annotations

import pytest
from test_isolation_world import SECRET, foreign_references, snapshot, world_server

from bench.load import GradioClient


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path, shared_tiny_engine):
    return world_server(tmp_path_factory, tiny_model_path, shared_tiny_engine)


def _bob(served) -> GradioClient:
    bob = GradioClient(served["url"])
    assert bob.login("bob", "bob-password-1")
    assert bob.call("page_load").ok
    return bob


def _id_variants(w: dict) -> list[tuple[str, int]]:
    """One value of each kind of id alice owns (two of the commonest)."""
    return ([("conversation", c) for c in w["conversations"]] + [("message", m) for m in w["answers"][:2]] +
            [("feedback", w["feedback"][0]), ("note", w["notes"][0]), ("adapter version", w["versions"][0])])


def _inputs(client: GradioClient, dep: dict, value) -> list:
    kinds = {c["id"]: c.get("type") for c in client.config()["components"]}
    return [None if kinds.get(i) == "state" else value for i in dep["inputs"]]


def _event_data(value) -> dict:
    # Every field any Gradio event data class reads, all pointing at alice's id.
    return {"index": value, "value": None, "liked": True, "selected": True, "previous_value": None, "row_value": [value],
            "col_value": [value], "_data": {"index": value}}


def test_every_event_refuses_alices_ids_to_bob(served, record_property):
    heed, w = served["heed"], served["world"]
    bob = _bob(served)
    config = bob.config()
    info = bob.http.get("/gradio_api/info")
    assert info.status_code == 200
    named = set(info.json().get("named_endpoints", {})) | set(info.json().get("unnamed_endpoints", {}))
    deps = {d["id"]: d for d in config["dependencies"]}
    assert all(name.lstrip("/") in {d.get("api_name") for d in deps.values()} for name in named)
    static = sorted(deps)
    rendered = [i for i in served["rendered"] if i not in deps]
    assert len(static) >= 20, "the app exposes fewer events than expected: did /config change shape?"
    assert rendered, "the notes tab rendered no per-note events in alice's session"

    before = snapshot(heed.store, w["alice"], heed.config.adapters_path)
    calls, leaks, refused = 0, [], 0
    for fn in static + rendered:
        dep = deps.get(fn, {"inputs": [], "targets": [[None]]})
        variants = _id_variants(w)[:1] if dep.get("api_name") in ("learn_now",) else _id_variants(w)
        for kind, value in variants:
            for session in (None, served["alice"].session_hash):  # bob's own session, and alice's (a stolen hash)
                r = bob.call(fn, _inputs(bob, dep, value) if fn in deps else [None, value, value][:3], event_data=_event_data(value),
                             trigger_id=dep["targets"][0][0] if dep.get("targets") else None, session_hash=session)
                calls += 1
                refused += not r.ok
                if SECRET in r.text:
                    leaks.append(f"fn {fn} ({dep.get('api_name')}) with alice's {kind} id {value}"
                                 f"{' in her session' if session else ''}")
    assert leaks == [], f"alice's text reached bob: {leaks[:5]}"
    assert snapshot(heed.store, w["alice"], heed.config.adapters_path) == before, "bob's calls changed alice's data"
    assert foreign_references(heed.store, w["bob"]) == []
    assert calls >= 200 and refused > 0
    record_property("http_isolation_calls", calls)


def test_the_rest_api_routes_refuse_alices_ids_too(served):
    """/gradio_api/call/<name> and /gradio_api/run/<name> reach the same handlers without a queue session."""
    heed, w = served["heed"], served["world"]
    bob = _bob(served)
    before = snapshot(heed.store, w["alice"], heed.config.adapters_path)
    for dep in bob.config()["dependencies"]:
        name = dep.get("api_name")
        if not name or name in ("learn_now",):
            continue
        for _, value in _id_variants(w)[:3]:
            data = _inputs(bob, dep, value)
            r = bob.http.post(f"/gradio_api/call/{name}", json={"data": data})
            if r.status_code == 200 and "event_id" in r.json():
                with bob.http.stream("GET", f"/gradio_api/call/{name}/{r.json()['event_id']}") as s:
                    body = "".join(s.iter_text())
                assert SECRET not in body, f"/call/{name} returned alice's text"
            run = bob.http.post(f"/gradio_api/run/{name}", json={"data": data})
            assert SECRET not in run.text, f"/run/{name} returned alice's text"
    assert snapshot(heed.store, w["alice"], heed.config.adapters_path) == before


def test_alice_still_sees_her_own_data_after_the_attempts(served):
    """The refusals above are not because the server is broken: alice's own session still works."""
    alice = served["alice"]
    r = alice.call("chat_open", [None, served["world"]["conversations"][0]])
    assert r.ok and SECRET in r.text


def test_a_deleted_users_session_stops_working(served):
    heed = served["heed"]
    uid = heed.add_user("leaver", "leaver-pw")
    client = GradioClient(served["url"])
    assert client.login("leaver", "leaver-pw")
    assert client.call("chat_send", [None, "hello"]).ok
    heed.delete_user(uid)
    r = client.call("chat_send", [None, "still here?"])
    # Two layers refuse, and which one answers first depends on timing: the session guard (once its
    # cached look-up of the login expires) with a 401, or the handler with a warning.
    refused_by_guard = r.status == 401 and "account was removed" in (r.error or "")
    refused_by_handler = not r.ok and any("no longer exists" in x for x in r.warnings)
    assert refused_by_guard or refused_by_handler, r.warnings or r.error
    with heed.store.db.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM messages WHERE user_id = ?", [uid]).fetchone()[0] == 0


def test_a_stolen_session_hash_opens_nothing(served):
    """Gradio keys a session (its state, its streamed replies, its rendered events) by a hash the browser
    picks; the app binds each hash to the login that first used it."""
    import httpx

    alice, url = served["alice"], served["url"]
    stolen = alice.session_hash
    bob = _bob(served)
    r = bob.call("page_load", session_hash=stolen)
    assert r.status == 403 and SECRET not in r.text
    for path in (f"/gradio_api/queue/data?session_hash={stolen}", f"/gradio_api/deep_link?session_hash={stolen}",
                 f"/gradio_api/heartbeat/{stolen}"):
        with bob.http.stream("GET", path) as resp:
            assert resp.status_code == 403, path
    assert bob.http.post("/gradio_api/cancel", json={"session_hash": stolen, "fn_index": 0, "event_id": "x"}).status_code == 403
    anonymous = httpx.Client(base_url=url)
    assert anonymous.post("/gradio_api/cancel", json={"session_hash": stolen, "fn_index": 0, "event_id": "x"}).status_code == 403
    assert anonymous.get(f"/gradio_api/queue/data?session_hash={stolen}").status_code in (401, 403)
    # Alice's own session goes on working.
    assert alice.call("chat_open", [None, served["world"]["conversations"][0]]).ok
