"""Authentication of the running web app (a real `heed serve`): login form, lockout, logout, what the
server binds to and which files it will hand out."""
from __future__ import annotations

import time
from urllib.parse import quote

import httpx
import pytest
from test_isolation_world import SECRET, world_server

from bench.load import GradioClient


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path, shared_tiny_engine):
    return world_server(tmp_path_factory, tiny_model_path, shared_tiny_engine)


def test_nothing_answers_without_a_login(served):
    anonymous = httpx.Client(base_url=served["url"])
    assert anonymous.get("/config").status_code == 401
    assert anonymous.get("/gradio_api/info").status_code == 401
    r = anonymous.post("/gradio_api/queue/join", json={"data": [None], "fn_index": 1, "session_hash": "anon1"})
    assert r.status_code == 401
    assert anonymous.post("/gradio_api/call/chat_send", json={"data": [None, "hi"]}).status_code == 401
    assert anonymous.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400


def test_repeated_failed_logins_lock_the_account_for_a_while(served):
    heed = served["heed"]
    heed.add_user("locky", "locky-right")  # the server's config: 3 failures, 2 s lockout
    client = httpx.Client(base_url=served["url"])
    t0 = time.perf_counter()
    for _ in range(3):
        assert client.post("/login", data={"username": "locky", "password": "guess"}).status_code == 400
    assert (time.perf_counter() - t0) / 3 > 0.01, "each guess should cost a slow password check"
    assert client.post("/login", data={"username": "locky", "password": "locky-right"}).status_code == 400, "not locked"
    time.sleep(2.2)
    assert client.post("/login", data={"username": "locky", "password": "locky-right"}).json() == {"success": True}


def test_logout_ends_the_session_on_the_server(served):
    url = served["url"]
    client = GradioClient(url)
    assert client.login("bob", "bob-password-1")
    stolen = dict(client.http.cookies)  # what a copied cookie would carry
    assert client.call("page_load").ok
    assert client.logout() in (302, 307)
    replay = httpx.Client(base_url=url, cookies=stolen)
    assert replay.get("/config").status_code == 401, "the old session cookie still works after logout"
    r = replay.post("/gradio_api/queue/join", json={"data": [None], "fn_index": 1, "session_hash": "after-logout"})
    assert r.status_code == 401


def test_a_password_change_ends_the_sessions_opened_before_it(served):
    heed, url = served["heed"], served["url"]
    uid = heed.add_user("changer", "changer-old-1")
    client = GradioClient(url)
    assert client.login("changer", "changer-old-1")
    assert client.call("page_load").ok
    stolen = dict(client.http.cookies)
    heed.store.set_password(user_id=uid, password="changer-new-1")  # what `heed user passwd` does, from another process
    time.sleep(1.2)  # the server re-reads a user's password date at most once a second
    after = client.call("page_load")
    assert after.status == 401 and "sign in again" in after.error
    assert httpx.Client(base_url=url, cookies=stolen).get("/config").status_code == 401, "the old cookie works again"
    fresh = GradioClient(url)
    assert not fresh.login("changer", "changer-old-1")
    assert fresh.login("changer", "changer-new-1") and fresh.call("page_load").ok


def test_a_deleted_users_login_does_not_carry_over_to_a_new_user_of_that_name(served):
    heed, url = served["heed"], served["url"]
    uid = heed.add_user("ghost", "ghost-password-1")
    client = GradioClient(url)
    assert client.login("ghost", "ghost-password-1") and client.call("page_load").ok
    heed.delete_user(uid)
    heed.add_user("ghost", "someone-else-9")
    time.sleep(1.2)
    assert client.call("page_load").status == 401


def test_the_server_listens_on_loopback_only(served):
    port = served["config"].app.port
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":  # LISTEN
                listening.append(addr)
    assert listening, f"nothing listens on port {port}"
    assert set(listening) <= {"0100007F", "00000000000000000000000001000000"}, f"listening beyond loopback: {listening}"


def test_serve_launches_with_safe_settings(tiny_model_path, tmp_path, shared_tiny_engine, monkeypatch):
    """What `heed serve` passes to Gradio: no share link, no extra file folders, nothing kept in the browser."""
    import gradio as gr
    from conftest import make_config

    from chat_app.app import serve
    from heed.service import Heed

    seen = {}

    def fake_launch(self, *args, **kwargs):
        seen.update(kwargs, blocks=self)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    config = make_config(tmp_path / "data", tiny_model_path)
    serve(Heed(config, engine=shared_tiny_engine), host=config.app.host, port=config.app.port)
    assert seen["server_name"] == "127.0.0.1"
    assert seen.get("share") in (None, False)
    assert not seen.get("allowed_paths"), "no folder (least of all data/) may be served as files"
    assert seen.get("run_history") is False
    assert seen.get("show_error") in (None, False)
    assert callable(seen["auth"])
    blocks = seen["blocks"]
    assert not [d for d in blocks.config["dependencies"] if "flag" in str(d.get("api_name", "")).lower()]
    assert "flag" not in str([c.get("props", {}).get("value") for c in blocks.config["components"]]).lower()


def _file_urls(served) -> dict[str, str]:
    config, heed = served["config"], served["heed"]
    adapter = heed.store.active_adapter(user_id=served["world"]["alice"])["path"]
    paths = {
        "database": str(config.db_path.resolve()),
        "database (relative)": "data/heed.db",
        "adapter weights": f"{adapter}/adapter_model.safetensors",
        "config": str(served["config_file"]),
        "passwd": "/etc/passwd",
        "passwd (traversal)": "../../../../../../etc/passwd",
        "passwd (encoded)": quote("/etc/passwd", safe=""),
        "server itself": f"http://127.0.0.1:{config.app.port}/config",
    }
    return paths


def test_no_file_path_reads_a_file(served):
    bob = GradioClient(served["url"])
    assert bob.login("bob", "bob-password-1")
    secret_bytes = served["config"].db_path.read_bytes()[:16]
    for what, path in _file_urls(served).items():
        for route in (f"/gradio_api/file={path}", f"/gradio_api/file/{path}", f"/file={path}"):
            r = bob.http.get(route)
            assert r.status_code in (400, 403, 404), f"{what} via {route}: {r.status_code}"
            assert b"root:x:0:0" not in r.content and secret_bytes not in r.content and SECRET.encode() not in r.content


def test_a_file_path_inside_an_event_reads_no_file(served):
    bob = GradioClient(served["url"])
    assert bob.login("bob", "bob-password-1")
    assert bob.call("page_load").ok
    for what, path in _file_urls(served).items():
        filedata = {"path": path, "url": None, "orig_name": "x.txt", "meta": {"_type": "gradio.FileData"}}
        for data in ([None, filedata], [None, {"files": [filedata], "text": "hi"}], [None, [filedata]]):
            r = bob.call("chat_send", data)
            assert "root:x:0:0" not in r.text and SECRET not in r.text, f"{what} leaked through an event"
        r = bob.call("chat_edit", [None], event_data={"index": 1, "value": filedata, "previous_value": None})
        assert "root:x:0:0" not in r.text and SECRET not in r.text
    # Nothing was written for those calls: every stored message is plain text.
    with served["heed"].store.db.connect() as db:
        contents = [r[0] for r in db.execute("SELECT content FROM messages WHERE user_id = ?", [served["world"]["bob"]])]
    assert not [c for c in contents if "gradio.FileData" in c or "root:x" in c]
