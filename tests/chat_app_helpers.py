"""Shared pieces for the chat UI tests: a fake login request and a way to run handlers like Gradio does."""
from __future__ import annotations

import inspect
from types import SimpleNamespace


def login(name: str, session: str | None = None):
    """What Gradio hands a handler as ``gr.Request`` after a login: only the name and the session matter."""
    return SimpleNamespace(username=name, session_hash=session or f"session-{name}")


def run(result):
    """All updates of a handler call (a generator handler yields several; others return one)."""
    return list(result) if inspect.isgenerator(result) else [result]


def last(result) -> dict:
    return run(result)[-1]


def messages(update: dict) -> list[dict]:
    """The chat messages a screen update shows."""
    return update["chat"]["value"]


class Session:
    """One browser session of one user: keeps the server-side state between events, as gr.State does."""

    def __init__(self, handlers, name: str, session: str | None = None) -> None:
        self.h = handlers
        self.request = login(name, session)
        self.state = None
        self.updates: list[dict] = []

    def __call__(self, method: str, *args, evt=None) -> dict:
        fn = getattr(self.h, method)
        call_args = [self.state, *args, self.request] + ([evt] if evt is not None else [])
        self.updates = run(fn(*call_args))
        for u in self.updates:
            if "state" in u:
                self.state = u["state"]
        return self.updates[-1]

    def open(self) -> dict:
        return self("load")

    def send(self, text: str) -> dict:
        return self("send", text)
