"""The "What Heed has learned about you" tab: standing notes, adapter versions, rollback, learn now."""
from __future__ import annotations

import gradio as gr

from . import views
from .base import Refused, guarded


class LearnedHandlers:
    """Mixed into Handlers (needs Base's _login, heed)."""

    def learned(self, state, request, *, progress: dict | None = None) -> dict:
        uid, state = self._login(state, request)
        status = self.heed.adapter_status(uid)
        progress = progress if progress is not None else self.heed.learn_progress(uid)
        choices = views.rollback_choices(status)
        active = status["active"]["version"] if status["active"] else 0
        return {
            "state": state,
            "notes_data": [{"id": n["id"], "text": n["text"], "active": bool(n["active"])} for n in self.heed.notes(uid)],
            "adapter_md": views.adapter_markdown(status),
            "gate_md": views.gate_markdown(status),
            "versions": gr.update(value=views.version_rows(status) or [["", "none yet", "", "", ""]]),
            "runs": gr.update(value=views.runs_rows(status["runs"]) or [["", "", "none yet", "", "", "", ""]]),
            "rollback_to": gr.update(choices=choices, value=active),
            "learn_status": views.progress_html(progress),
            "learn_btn": gr.update(interactive=not progress.get("running")),
            "timer": gr.Timer(active=bool(progress.get("running"))),
        }

    @guarded(view="learned")
    def show_learned(self, state, request: gr.Request) -> dict:
        return self.learned(state, request)

    @guarded(view="learned")
    def note_add(self, state, text, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if not isinstance(text, str):
            raise Refused("a note must be text")
        if any(n["text"].strip().casefold() == text.strip().casefold() for n in self.heed.notes(uid)):
            raise Refused("you already have that note")
        self.heed.add_note(uid, text)
        return {**self.learned(state, request), "note_new": "", "info": "Note added. It applies from your next message."}

    @guarded(view="learned")
    def note_save(self, state, note_id, text, active, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if not isinstance(text, str) or not isinstance(active, bool):
            raise Refused("a note is a text and an on/off switch")
        self.heed.update_note(uid, self._index(note_id), text=text, active=active)
        return {**self.learned(state, request), "info": "Note saved."}

    @guarded(view="learned")
    def note_delete(self, state, note_id, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        self.heed.delete_note(uid, self._index(note_id))
        return {**self.learned(state, request), "info": "Note deleted."}

    @guarded(view="learned")
    def rollback(self, state, version, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        allowed = {v for _, v in views.rollback_choices(self.heed.adapter_status(uid))}
        if isinstance(version, bool) or version not in allowed:
            raise Refused("pick one of your adapter versions (or the base model)")
        self.heed.rollback(uid, version or None)
        what = f"v{version}" if version else "the base model"
        return {**self.learned(state, request), "info": f"Heed will use {what} from your next conversation."}

    @guarded(view="learned")
    def learn_now(self, state, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        started = self.heed.learn_in_background(uid)
        out = self.learned(state, request)
        out["warning" if not started["started"] else "info"] = (
            "Learning started. You can keep chatting." if started["started"] else started["reason"][0].upper() + started["reason"][1:])
        return out

    @guarded(view="learned")
    def learn_poll(self, state, request: gr.Request) -> dict:
        """Timer tick while a run goes: progress, then the result and the refreshed versions."""
        uid, state = self._login(state, request)
        progress = self.heed.learn_progress(uid)
        if progress.get("running"):
            return {"learn_status": views.progress_html(progress), "learn_btn": gr.update(interactive=False)}
        return self.learned(state, request, progress=progress)
