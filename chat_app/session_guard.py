"""A Gradio session belongs to the login that opened it.

Gradio keys a browser session (its gr.State values, its pending messages, its
gr.render-ed events) by a ``session_hash`` the client picks, and checks only
that the caller is logged in, not that it is the same login. Anyone logged in
who learns another user's hash (a log line, a shared screenshot of the network
tab) could read that session: ``/gradio_api/queue/data`` streams its replies,
``/gradio_api/deep_link`` copies its component values, and gr.render functions
re-render from its state (alice's notes, with bob's cookie).

This ASGI middleware binds each session hash to the first logged-in user who
uses it and answers 403 to any other caller (logged in or not) that names it,
wherever the hash travels: query string, JSON body, or URL path.

It also ends logins that predate a password change (``heed user passwd``,
possibly from another process): Gradio's login tokens never expire, so a
token issued before the change is dropped and its caller gets 401.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from http.cookies import CookieError, SimpleCookie
from typing import Callable
from urllib.parse import parse_qs

_PATH_HASH = re.compile(r"^(?:/gradio_api)?/(?:heartbeat/([^/]+)$|stream/([^/]+)/[^/]+/[^/]+/)")
_MAX_BODY = 64 * 1024 * 1024  # only JSON bodies are read here; no event needs more


class SessionGuard:
    def __init__(self, app, *, max_sessions: int = 200_000,
                 credentials_changed_at: Callable[[str], float | None] | None = None, recheck_seconds: float = 1.0) -> None:
        self.app = app
        self.max_sessions = max_sessions
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        # token -> when its login request started (read off the /login response's cookie). Gradio keeps
        # tokens in memory, so a token this guard never dated was issued after the guard started.
        self._token_issued: OrderedDict[str, float] = OrderedDict()
        self._started = time.time()
        self._changed_at = credentials_changed_at
        self._recheck = recheck_seconds
        self._changed_cache: dict[str, tuple[float, float | None]] = {}

    # -- who is asking, and for which sessions -----------------------------------------
    @staticmethod
    def _login(scope) -> tuple[str, str] | None:
        """(user, token) of the request's valid login cookie, or None."""
        gradio_app = scope.get("app")
        tokens, cookie_id = getattr(gradio_app, "tokens", None), getattr(gradio_app, "cookie_id", None)
        if not tokens or cookie_id is None:
            return None
        raw = "; ".join(v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"cookie")
        cookies = SimpleCookie()
        try:
            cookies.load(raw)
        except CookieError:  # a malformed Cookie header means: no login
            return None
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            if name in cookies and cookies[name].value in tokens:
                token = cookies[name].value
                return tokens[token], token
        return None

    def _outdated(self, user: str, token: str) -> bool:
        """True when ``user``'s password changed (or the user was deleted) after ``token`` was issued."""
        if self._changed_at is None:
            return False
        now = time.time()
        with self._lock:
            issued = self._token_issued.get(token, self._started)
            cached = self._changed_cache.get(user)
        if cached is None or now - cached[0] >= self._recheck:
            cached = (now, self._changed_at(user))
            with self._lock:
                self._changed_cache[user] = cached
        changed = cached[1]
        return changed is None or changed >= issued

    @staticmethod
    def _hashes(scope, body: bytes) -> set[str]:
        found = set(parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", []))
        m = _PATH_HASH.match(scope.get("path", ""))
        if m:
            found.add(m.group(1) or m.group(2))
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("session_hash") is not None:
                found.add(str(data["session_hash"]))
        return found

    def _allowed(self, hashes: set[str], user: str | None) -> bool:
        with self._lock:
            for h in hashes:
                owner = self._owners.get(h)
                if owner is not None and owner != user:
                    return False
            if user is not None:
                for h in hashes:
                    self._owners[h] = user
                    self._owners.move_to_end(h)
                while len(self._owners) > self.max_sessions:
                    self._owners.popitem(last=False)
        return True

    def _date_login(self, send, started: float):
        """``send``, noting the issue time of any login token the response sets."""
        async def dated(message):
            if message.get("type") == "http.response.start":
                for k, v in message.get("headers", []):
                    if k.lower() != b"set-cookie" or not v.startswith(b"access-token"):
                        continue
                    token = v.split(b";", 1)[0].split(b"=", 1)[-1].decode("latin-1").strip('"')
                    with self._lock:
                        self._token_issued[token] = started
                        while len(self._token_issued) > self.max_sessions:
                            self._token_issued.popitem(last=False)
            await send(message)
        return dated

    # -- ASGI ----------------------------------------------------------------------------
    @staticmethod
    async def _refuse(send, status: int, detail: str) -> None:
        payload = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path", "").endswith("/login"):
            send = self._date_login(send, time.time())
        headers = dict(scope.get("headers", []))
        body, messages = b"", []
        if scope.get("method") == "POST" and b"json" in headers.get(b"content-type", b""):
            more = True
            while more:
                message = await receive()
                messages.append(message)
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > _MAX_BODY:
                    return await self._refuse(send, 413, "The request is too large.")
        login = self._login(scope)
        if login and self._outdated(*login):
            # Forget the token everywhere Gradio looks it up, so the old cookie stays dead.
            getattr(scope.get("app"), "tokens", {}).pop(login[1], None)
            return await self._refuse(send, 401, "Your password changed or your account was removed: sign in again.")
        if not self._allowed(self._hashes(scope, body), login[0] if login else None):
            return await self._refuse(send, 403, "This session belongs to another login.")
        if not messages:
            return await self.app(scope, receive, send)

        async def replay():
            if messages:
                return messages.pop(0)
            return await receive()

        return await self.app(scope, replay, send)
