"""A real browser against a real `heed serve` on the tiny model: every kind of feedback through the page,
then the store must hold exactly those events for that user and none for another.

Headless Debian Chromium (`make browser` installs it) driven by Playwright; never a browser download.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
OUT = REPO / "test-output"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    data = tmp_path / "data"
    heed = [sys.executable, "-m", "heed.cli", "--config", str(REPO / "configs" / "tiny.yaml"), "--data-dir", str(data)]
    for name in ("alice", "bob"):
        subprocess.run(heed + ["user", "add", name, "--password-stdin"], input=f"{name}-password\n", text=True,
                       check=True, capture_output=True, timeout=120)
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(heed + ["serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine: importing gradio and torch alone can take a minute
        while True:
            if proc.poll() is not None:
                raise AssertionError("heed serve exited:\n" + (tmp_path / "serve.log").read_text())
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("heed serve did not start:\n" + (tmp_path / "serve.log").read_text()) from None
                time.sleep(0.3)
        yield url, data
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _settle(page, pause: float = 0.4) -> None:
    """Wait until no event is pending or streaming in the page."""
    time.sleep(pause)
    page.wait_for_function("!document.querySelector('.generating, .pending')", timeout=90_000)
    time.sleep(0.3)


def _answers_stored(data: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{data / 'heed.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM messages WHERE role = 'assistant'").fetchone()[0]


def _await_answer(page, data: Path, stored: int) -> None:
    """Wait until an answer beyond the ``stored`` ones is in the store, then until the page settles.

    Under load a click can land while a reply still streams, and an answer that is not stored yet
    cannot take a vote or be picked: the store, not a pause, says when an answer is done.
    """
    deadline = time.monotonic() + 90
    while _answers_stored(data) <= stored:
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.2)
    _settle(page, 1.0)


def _send(page, box, text: str, data: Path) -> None:
    stored = _answers_stored(data)
    box.fill(text)
    box.press("Enter")
    _await_answer(page, data, stored)


def test_feedback_of_every_kind_through_the_browser_lands_in_the_store(server):
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian chromium is not installed (run `make browser`)")
    from playwright.sync_api import sync_playwright

    from heed.store import Store

    url, data = server
    OUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(90_000)  # CI machines are shared: a loaded one answers in seconds, not milliseconds
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("input", timeout=30_000)
        fields = page.locator("input")
        fields.nth(0).fill("alice")
        fields.nth(1).fill("alice-password")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#heed-chat", timeout=30_000)
        _settle(page, 1.0)
        chat = page.locator("#heed-chat")
        box = page.locator("#heed-msg textarea")

        _send(page, box, "What is water?", data)
        chat.get_by_role("button", name="Dislike").last.click()
        _settle(page)
        page.locator("#heed-reasons").get_by_label("Too long").check()
        page.get_by_label("Comment (optional)").fill("way too wordy")
        page.get_by_role("button", name="Save feedback").click()
        _settle(page)

        chat.get_by_role("button", name="Edit").last.click()
        chat.locator("textarea.edit-textarea").first.fill("Water is **H2O**: two hydrogen atoms and one oxygen atom.")
        chat.get_by_role("button", name="Submit").click()
        _settle(page)
        assert chat.locator("strong", has_text="H2O").count() == 1, "the edited answer is shown, as Markdown"

        _send(page, box, 'And ice? <img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>', data)
        assert "<img src=x" in chat.inner_text(), "HTML in a message is shown as text"
        assert page.evaluate("window.__pwned") is None, "and never runs"

        answers = chat.locator(".bot-row")
        answers.nth(0).click()
        _settle(page)
        assert page.locator("#heed-focus").inner_text().startswith("Answer 1"), "clicking an answer selects it"
        answers.nth(1).click()
        _settle(page)
        page.get_by_label("Tell Heed what to change in answer 2").fill("shorter please")
        page.get_by_label("Remember this for future chats").check()
        stored = _answers_stored(data)
        page.get_by_role("button", name="Rewrite the answer").click()
        _await_answer(page, data, stored)

        stored = _answers_stored(data)
        chat.get_by_role("button", name="Retry").last.click()
        _await_answer(page, data, stored)
        # (Gradio 6 nests a group's element inside another with the same id, hence .first.)
        page.locator("#heed-compare").first.wait_for(state="visible")  # two answers side by side
        page.get_by_role("button", name="Keep the second").click()
        page.locator("#heed-compare").first.wait_for(state="hidden")
        _settle(page)
        page.locator("#heed-stars").get_by_text("★★★★", exact=True).click()
        _settle(page)
        assert not page.locator("#heed-compare").first.is_visible(), "rating the chat does not bring the comparison back"
        page.screenshot(path=str(OUT / "browser-chat.png"))

        page.get_by_role("tab", name="What Heed has learned").click()
        _settle(page)
        assert page.locator(".heed-note input[type=text], .heed-note textarea").first.input_value() == "shorter please"
        page.screenshot(path=str(OUT / "browser-learned.png"))
        page.set_viewport_size({"width": 400, "height": 860})
        page.get_by_role("tab", name="Chat").click()
        _settle(page)
        page.screenshot(path=str(OUT / "browser-narrow.png"))
        page.locator("#heed-logout").click()
        page.wait_for_selector("button:has-text('Login')", timeout=30_000)
        assert page.locator("#heed-chat").count() == 0, "logging out leaves the chat"
        browser.close()
    assert errors == [], errors

    store = Store(data / "heed.db")
    alice, bob = store.user_id("alice"), store.user_id("bob")
    (conv,) = store.list_conversations(user_id=alice)
    events = store.list_feedback(user_id=alice)
    assert sorted(f["kind"] for f in events) == ["comparison", "correction", "edit", "rating", "thumb"]
    by = {f["kind"]: f for f in events}
    history = store.history(user_id=alice, conversation_id=conv["id"])
    everything = store.history(user_id=alice, conversation_id=conv["id"], include_inactive=True)
    first_answer = history[1]
    assert by["thumb"]["message_id"] == first_answer["id"]
    assert by["thumb"]["payload"] == {"up": False, "reasons": ["too long"], "comment": "way too wordy"}
    assert by["edit"]["payload"]["after"] == first_answer["content"] == "Water is **H2O**: two hydrogen atoms and one oxygen atom."
    assert first_answer["original_content"] == by["edit"]["payload"]["before"]
    assert by["correction"]["payload"]["instruction"] == "shorter please"
    assert by["comparison"]["payload"]["chosen_id"] == history[3]["id"], "the picked answer continues the chat"
    assert any(m["id"] == by["comparison"]["payload"]["rejected_id"] and m["status"] == "alternative" for m in everything)
    assert by["rating"]["payload"] == {"stars": 4}
    assert history[2]["content"].startswith("And ice? <img src=x")
    assert [n["text"] for n in store.list_notes(user_id=alice)] == ["shorter please"]
    assert store.list_conversations(user_id=bob) == [] and store.list_feedback(user_id=bob) == []
    assert store.list_notes(user_id=bob) == []
