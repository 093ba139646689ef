"""What every handler shares: who is asking, the session, refusals, and the screen.

Trust rules, for every event (each one is also a public HTTP endpoint):
- the user is ``request.username`` from the login cookie, looked up in the
  users table; nothing in the inputs or event data names a user;
- message and conversation ids never travel to the browser: the session
  (a gr.State, held on the server per browser session) keeps the open
  conversation, the focused answer and a pending comparison; an index from
  event data is looked up in the user's own active history;
- every store call carries the user id, so an id that is not the user's is
  NotFound and changes nothing.

Handlers return a dict of updates keyed by widget name (app.py maps names to
components; keys an event does not output are dropped). ``warning`` and
``info`` become toasts.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading

# Gradio at import time: it reads handlers' type hints (gr.Request, gr.LikeData, ...) to
# inject the login and the event data. Only `heed serve` and the UI tests import chat_app.
import gradio as gr

from heed.service import Heed, InputError
from heed.store import NotFound, StoreError

from . import views
from .sanitize import to_display

log = logging.getLogger(__name__)


class Refused(Exception):
    """The request cannot be done as asked; the message says why (shown as a toast)."""


REFUSALS = (Refused, InputError, NotFound, StoreError)


def refusal_text(exc: Exception) -> str:
    if isinstance(exc, NotFound):
        return "That is not in your conversations any more (it may have been deleted)."
    text = str(exc) or "That cannot be done."
    return text[0].upper() + text[1:]


def new_session(uid: int | None = None) -> dict:
    return {"uid": uid, "conv": None, "focus": None, "pending": None, "confirm_delete": False, "notice": "",
            "shown_conv": -1, "shown_focus": -1}


def _request_in(args, kwargs):
    req = kwargs.get("request")
    if req is None:
        req = next((a for a in args if hasattr(a, "username") and hasattr(a, "session_hash")), None)
    return req


def guarded(fn=None, *, view: str = "screen"):
    """Refusals (bad input, not found, not allowed) become a warning plus a fresh view
    (the chat screen, or the learned tab with ``view="learned"``); nothing else is caught."""
    if fn is None:
        return functools.partial(guarded, view=view)
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self, *args, **kwargs):
            try:
                yield from fn(self, *args, **kwargs)
            except REFUSALS as exc:
                yield self._refused(exc, args, kwargs, view)
        return gen

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except REFUSALS as exc:
            return self._refused(exc, args, kwargs, view)
    return call


class Base:
    def __init__(self, heed: Heed) -> None:
        self.heed = heed
        self._guard = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}
        self._stops: dict[str, threading.Event] = {}

    # -- identity and session ----------------------------------------------------
    def _login(self, state, request) -> tuple[int, dict]:
        name = getattr(request, "username", None)
        if not isinstance(name, str) or not name:
            raise Refused("please log in again")
        try:
            uid = self.heed.user_id(name)
        except NotFound:
            raise Refused("your account no longer exists") from None
        if not isinstance(state, dict) or state.get("uid") != uid:
            # A session never carries one user's ids into another user's login.
            state = new_session(uid)
        return uid, state

    def _key(self, request) -> str:
        return f"{getattr(request, 'username', '')}:{getattr(request, 'session_hash', None) or ''}"

    def _busy_lock(self, request) -> threading.Lock:
        with self._guard:
            if len(self._busy) > 10_000:
                for k in [k for k, v in self._busy.items() if not v.locked()]:
                    del self._busy[k]
                    self._stops.pop(k, None)
            return self._busy.setdefault(self._key(request), threading.Lock())

    def _stop_event(self, request) -> threading.Event:
        with self._guard:
            return self._stops.setdefault(self._key(request), threading.Event())

    def _refused(self, exc: Exception, args, kwargs, view: str = "screen") -> dict:
        out = {"warning": refusal_text(exc)}
        request = _request_in(args, kwargs)
        state = args[0] if args else kwargs.get("state")
        try:
            uid, state = self._login(state, request)
            out.update(self.learned(state, request) if view == "learned" else self.screen(uid, state, force=True))
        except REFUSALS as again:
            log.info("refusal screen unavailable: %s", again)
        out["warning"] = refusal_text(exc)
        return out

    # -- reading the user's own data -----------------------------------------------
    def _conversation(self, uid: int, state: dict) -> dict | None:
        if state["conv"] is None:
            return None
        try:
            return self.heed.store.get_conversation(user_id=uid, conversation_id=state["conv"])
        except NotFound:
            state.update(conv=None, focus=None, pending=None, confirm_delete=False)
            return None

    def _history(self, uid: int, state: dict) -> list[dict]:
        return self.heed.history(uid, state["conv"]) if self._conversation(uid, state) else []

    @staticmethod
    def _index(value) -> int:
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise Refused("that is not in your conversations")
        return value

    def _message_at(self, uid: int, state: dict, index, role: str | None = "assistant") -> dict:
        history = self._history(uid, state)
        i = self._index(index)
        if not 0 <= i < len(history) or (role and history[i]["role"] != role):
            raise Refused("that message is not in this conversation" if role != "assistant"
                          else "feedback goes on Heed's answers in this conversation")
        return history[i]

    def _focused(self, uid: int, state: dict, *, default_last: bool = False) -> dict:
        history = self._history(uid, state)
        answers = [m for m in history if m["role"] == "assistant"]
        msg = next((m for m in answers if m["id"] == state.get("focus")), None)
        if msg is None and default_last and answers:
            msg = answers[-1]
        if msg is None:
            raise Refused("select an answer first (click it in the chat)")
        return msg

    def _thumbs(self, uid: int, conv_id: int) -> dict[int, dict]:
        return {f["message_id"]: f for f in self.heed.store.list_feedback(user_id=uid, kind="thumb", conversation_id=conv_id)}

    # -- the screen -------------------------------------------------------------------
    def screen(self, uid: int, state: dict, *, force: bool = False, busy: bool = False, refresh_feedback: bool = False) -> dict:
        """Every widget of the chat tab, re-read from the store.

        Text the user may be typing (the title, the focused answer's comment) is
        only reset when the conversation or the focus changed (or when asked).
        """
        conv = self._conversation(uid, state)
        history = self.heed.history(uid, conv["id"]) if conv else []
        thumbs = self._thumbs(uid, conv["id"]) if conv else {}
        answers = [m for m in history if m["role"] == "assistant"]
        focus = next((m for m in answers if m["id"] == state.get("focus")), None)
        state["focus"] = focus["id"] if focus else None
        pending = self._pending(uid, state, history)
        convs = self.heed.list_conversations(uid)
        vote = thumbs.get(focus["id"]) if focus else None
        target = focus or (answers[-1] if answers else None)  # what a correction applies to
        active = self.heed.store.active_adapter(user_id=uid)
        rating = None
        if conv:
            rated = self.heed.store.list_feedback(user_id=uid, kind="rating", conversation_id=conv["id"])
            rating = rated[0]["payload"]["stars"] if rated else None
        out = {
            "state": state,
            "chat": gr.update(value=views.chat_messages(history), feedback_value=views.feedback_values(history, {k: v["payload"]["up"] for k, v in thumbs.items()}),
                              label=views.chat_label(conv, active["version"] if active else None),
                              # Room for the two answers side by side without pushing the input off screen.
                              height=views.CHAT_HEIGHT_COMPARING if pending else views.CHAT_HEIGHT),
            "convs": gr.update(choices=views.conversation_choices(convs), value=conv["id"] if conv else None),
            "notice": gr.update(value=state.get("notice") or "", visible=bool(state.get("notice"))),
            "conv_tools": gr.update(visible=conv is not None),
            "delete_confirm": gr.update(visible=bool(state.get("confirm_delete")) and conv is not None),
            "convs_empty": gr.update(visible=not convs),
            "rate_row": gr.update(visible=conv is not None),
            "focus_info": views.focus_markdown(focus, number=answers.index(focus) + 1 if focus else None, thumb=vote),
            "feedback_box": gr.update(visible=vote is not None),
            "reasons": gr.update(visible=vote is not None and not vote["payload"]["up"]),
            "tools": gr.update(visible=bool(answers)),
            "correct_box": gr.update(visible=bool(answers)),
            "correction": gr.update(label=f"Tell Heed what to change in answer {answers.index(target) + 1}" if target else "Tell Heed what to change"),
            "compare": gr.update(visible=pending is not None),
            "alt_a": to_display(pending[0]["content"]) if pending else "",
            "alt_b": to_display(pending[1]["content"]) if pending else "",
            "rating": gr.update(value=rating, interactive=conv is not None),
            "send": gr.update(visible=not busy),
            "stop": gr.update(visible=busy),
        }
        if force or state.get("shown_conv") != state["conv"]:
            out["title"] = gr.update(value=conv["title"] if conv else "")
            state["shown_conv"] = state["conv"]
        if force or refresh_feedback or state.get("shown_focus") != state["focus"]:
            fb = thumbs.get(focus["id"]) if focus else None
            out["reasons"]["value"] = list((fb or {}).get("payload", {}).get("reasons") or [])
            out["comment"] = gr.update(value=(fb or {}).get("payload", {}).get("comment") or "")
            out["correction"]["value"] = ""
            state["shown_focus"] = state["focus"]
        return out

    def _pending(self, uid: int, state: dict, history: list[dict]) -> tuple[dict, dict] | None:
        """The (first, second) answers waiting for the user's pick, if still valid."""
        p = state.get("pending")
        if not p:
            return None
        try:
            first = self.heed.store.get_message(user_id=uid, message_id=p["original"])
            second = self.heed.store.get_message(user_id=uid, message_id=p["alternative"])
        except NotFound:
            state["pending"] = None
            return None
        if first["status"] != "active" or not history or history[-1]["id"] != first["id"] or second["status"] != "alternative":
            state["pending"] = None
            return None
        return first, second
