"""The chat tab's events: one small handler per event (see base.py for the trust rules)."""
from __future__ import annotations

import html
import threading

import gradio as gr

from heed.service import clean_text

from . import views
from .base import Base, Refused, guarded, new_session
from .learned import LearnedHandlers
from .sanitize import from_display, text_of, to_display

COMMENT_LIMIT = 2000
# A vote clicked while its answer streams waits for the answer to be stored, at most this long.
VOTE_WAIT_S = 300.0


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _begins(partial: str, full: str) -> bool:
    """Is ``partial`` (what the chat showed mid-stream, maybe the "…" placeholder) the start of ``full``?"""
    head = " ".join(partial.rstrip("…").split())
    return " ".join(full.split()).startswith(head)


class Handlers(LearnedHandlers, Base):
    # -- page and conversations ------------------------------------------------------
    @guarded
    def load(self, state, request: gr.Request) -> dict:
        uid, _ = self._login(None, request)
        state = new_session(uid)
        self._announce(uid, state)
        return {**self.screen(uid, state, force=True), **self.learned(state, request),
                "user_badge": f'<span class="heed-signed">Signed in as </span><b>{html.escape(request.username)}</b>'}

    def _announce(self, uid: int, state: dict) -> None:
        """A new conversation says so when a newer adapter was promoted since the user's last one."""
        status = self.heed.adapter_status(uid)
        if status["new_since_last_session"]:
            state["notice"] = views.news_markdown(status["active"])
            self.heed.mark_adapter_seen(uid)

    @guarded
    def new_chat(self, state, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        state.update(conv=None, focus=None, pending=None, confirm_delete=False, notice="")
        self._announce(uid, state)
        return {**self.screen(uid, state, force=True), "msg": ""}

    @guarded
    def open_conversation(self, state, conv_id, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if isinstance(conv_id, str) and conv_id.isdigit():
            conv_id = int(conv_id)
        conv_id = self._index(conv_id)
        self.heed.store.get_conversation(user_id=uid, conversation_id=conv_id)
        state.update(conv=conv_id, focus=None, pending=None, confirm_delete=False, notice="")
        return self.screen(uid, state, force=True)

    @guarded
    def rename(self, state, title, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if self._conversation(uid, state) is None:
            raise Refused("open a conversation to rename it")
        self.heed.rename_conversation(uid, state["conv"], title)
        return {**self.screen(uid, state, force=True), "info": "Renamed."}

    @guarded
    def delete_ask(self, state, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        state["confirm_delete"] = self._conversation(uid, state) is not None
        return self.screen(uid, state)

    @guarded
    def delete_cancel(self, state, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        state["confirm_delete"] = False
        return self.screen(uid, state)

    @guarded
    def delete_confirm(self, state, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if not state.get("confirm_delete") or self._conversation(uid, state) is None:
            state["confirm_delete"] = False
            return self.screen(uid, state)
        self.heed.delete_conversation(uid, state["conv"])
        state.update(conv=None, focus=None, pending=None, confirm_delete=False, notice="")
        return {**self.screen(uid, state, force=True), "info": "Conversation deleted, with its feedback."}

    # -- generation ----------------------------------------------------------------------
    def _claim(self, request) -> threading.Lock:
        lock = self._busy_lock(request)
        if not lock.acquire(blocking=False):
            raise Refused("Heed is still answering; wait for it or press Stop")
        self._stop_event(request).clear()
        return lock

    def _after_answer(self, request) -> bool:
        """Wait until this session's answer in progress is stored; True when there was one."""
        lock = self._busy_lock(request)
        if lock.acquire(blocking=False):
            lock.release()
            return False
        if not lock.acquire(timeout=VOTE_WAIT_S):
            raise Refused("Heed is still answering; vote once the answer is complete")
        lock.release()
        return True

    def _pieces(self, reply, request):
        """The growing answer text; stops early when the user pressed Stop (the partial answer is kept)."""
        stop = self._stop_event(request)
        pieces = iter(reply)
        text = ""
        try:
            for piece in pieces:
                text += piece
                yield text
                if stop.is_set():
                    break
        finally:
            pieces.close()

    def _stream_into_chat(self, uid, state, reply, request, before: list[dict]):
        shown = views.chat_messages(before)
        yield {"chat": gr.update(value=shown + [{"role": "assistant", "content": "…"}])}  # until the first words arrive
        for text in self._pieces(reply, request):
            yield {"chat": gr.update(value=shown + [{"role": "assistant", "content": to_display(text)}])}

    @guarded
    def send(self, state, text, request: gr.Request):
        uid, state = self._login(state, request)
        if not isinstance(text, str):
            raise Refused("a message must be text")
        clean_text(text, limit=self.heed.config.generation.max_message_chars)  # refuse before a conversation is made
        lock = self._claim(request)
        try:
            if self._conversation(uid, state) is None:
                state["conv"] = self.heed.start_conversation(uid)
                self.heed.mark_adapter_seen(uid)
            state.update(pending=None, focus=None)  # corrections now default to the new answer
            reply = self.heed.chat(uid, state["conv"], text)
            history = self._history(uid, state)
            yield {**self.screen(uid, state, busy=True), "msg": ""}
            yield from self._stream_into_chat(uid, state, reply, request, history)
            yield self.screen(uid, state)
        finally:
            lock.release()

    @guarded
    def stop(self, state, request: gr.Request) -> dict:
        self._login(state, request)
        self._stop_event(request).set()
        return {}

    @guarded
    def edit(self, state, request: gr.Request, evt: gr.EditData):
        """An edited answer is feedback (the original is kept); an edited question branches the chat."""
        uid, state = self._login(state, request)
        msg = self._message_at(uid, state, evt.index, role=None)
        new = text_of(evt.value)
        if new is None:
            raise Refused("an edit must be text")
        new = from_display(new)
        before = text_of(evt.previous_value)
        if before is not None and not _same_text(from_display(before), msg["content"]):
            raise Refused("the conversation changed meanwhile; it has been reloaded")
        if msg["role"] == "assistant":
            if new.strip() == msg["content"].strip():
                yield self.screen(uid, state)  # a repeated or empty-change submit stores nothing
                return
            self.heed.edit(uid, msg["id"], new)
            state["focus"] = msg["id"]
            yield {**self.screen(uid, state), "info": "Edit saved. Heed will learn from it."}
            return
        lock = self._claim(request)
        try:
            reply = self.heed.resend(uid, msg["id"], new)
            state.update(pending=None, focus=None)
            history = self._history(uid, state)
            yield self.screen(uid, state, busy=True)
            yield from self._stream_into_chat(uid, state, reply, request, history)
            yield self.screen(uid, state)
        finally:
            lock.release()

    @guarded
    def correct(self, state, instruction, remember, request: gr.Request):
        """Regenerate the focused (or last) answer now, following the user's instruction."""
        uid, state = self._login(state, request)
        target = self._focused(uid, state, default_last=True)
        if not isinstance(instruction, str):
            raise Refused("a correction must be text")
        lock = self._claim(request)
        try:
            reply = self.heed.correct(uid, target["id"], instruction)
            state["pending"] = None
            before = [m for m in self._history(uid, state) if m["position"] < target["position"]]
            yield {**self.screen(uid, state, busy=True), "chat": gr.update(value=views.chat_messages(before))}
            yield from self._stream_into_chat(uid, state, reply, request, before)
            state["focus"] = reply.message_id
            info = "Corrected."
            if remember is True and reply.message_id is not None:
                info += " " + self._remember(uid, instruction.strip(), reply.feedback_id)
            yield {**self.screen(uid, state, refresh_feedback=True), "info": info, "remember": False}
        finally:
            lock.release()

    def _remember(self, uid: int, text: str, feedback_id: int | None) -> str:
        same = [n for n in self.heed.notes(uid) if n["text"].strip().casefold() == text.casefold()]
        if same:
            if not same[0]["active"]:
                self.heed.update_note(uid, same[0]["id"], active=True)
            return "That preference was already saved."
        self.heed.add_note(uid, text, feedback_id=feedback_id)
        return "Saved as a standing preference."

    @guarded
    def retry(self, state, request: gr.Request, evt: gr.RetryData):
        """A second answer to the last message, shown beside the first until the user picks one."""
        uid, state = self._login(state, request)
        history = self._history(uid, state)
        i = self._index(evt.index)
        if not (0 <= i < len(history) and history[i]["role"] == "user" and i == len(history) - 2):
            raise Refused("only the latest answer can be regenerated")
        first = history[-1]
        lock = self._claim(request)
        try:
            reply = self.heed.regenerate(uid, first["id"])
            state["pending"] = None
            screen = self.screen(uid, state, busy=True)
            screen["chat"]["height"] = views.CHAT_HEIGHT_COMPARING
            yield {**screen, "compare": gr.update(visible=True), "alt_a": to_display(first["content"]), "alt_b": "…"}
            for text in self._pieces(reply, request):
                yield {"alt_b": to_display(text)}
            state["pending"] = {"original": first["id"], "alternative": reply.message_id}
            yield {**self.screen(uid, state), "info": "Which answer is better? Pick one to continue."}
        finally:
            lock.release()

    def _choose(self, state, request, which: int) -> dict:
        uid, state = self._login(state, request)
        pair = self._pending(uid, state, self._history(uid, state))
        if pair is None:
            return {**self.screen(uid, state), "info": "There is nothing to choose right now."}
        chosen, other = pair if which == 0 else pair[::-1]
        self.heed.choose(uid, chosen["id"], other["id"])
        state.update(pending=None, focus=chosen["id"])
        return {**self.screen(uid, state), "info": "Thanks! That answer continues the conversation."}

    @guarded
    def choose_first(self, state, request: gr.Request) -> dict:
        return self._choose(state, request, 0)

    @guarded
    def choose_second(self, state, request: gr.Request) -> dict:
        return self._choose(state, request, 1)

    @guarded
    def undo(self, state, request: gr.Request, evt: gr.UndoData) -> dict:
        uid, state = self._login(state, request)
        history = self._history(uid, state)
        i = self._index(evt.index)
        users = [k for k, m in enumerate(history) if m["role"] == "user"]
        if not users or i != users[-1]:
            raise Refused("only the latest message can be undone")
        lock = self._claim(request)
        try:
            text = self.heed.undo(uid, state["conv"])
        finally:
            lock.release()
        state.update(pending=None, focus=None)
        return {**self.screen(uid, state), "msg": text}

    # -- feedback ----------------------------------------------------------------------------
    @guarded
    def like(self, state, request: gr.Request, evt: gr.LikeData) -> dict:
        uid, state = self._login(state, request)
        # A thumb clicked on an answer still streaming is kept: it lands once the answer is stored.
        streamed = self._after_answer(request)
        msg = self._message_at(uid, state, evt.index)
        shown = text_of(evt.value)
        if shown is not None and not _same_text(from_display(shown), msg["content"]) \
                and not (streamed and _begins(from_display(shown), msg["content"])):
            raise Refused("the conversation changed meanwhile; it has been reloaded")
        liked = evt.liked
        if liked is True or liked is False:
            up = liked
        elif liked in ("", None):
            up = None
        else:
            raise Refused("a vote is a thumbs up or a thumbs down")
        old = self.heed.store.thumb_for(user_id=uid, message_id=msg["id"])
        if up is None:
            self.heed.thumb(uid, msg["id"], None)
        else:
            keep = old is not None and old["payload"]["up"] == up  # same vote again: keep its reasons
            p = old["payload"] if keep else {}
            self.heed.thumb(uid, msg["id"], up, reasons=p.get("reasons") or [], comment=p.get("comment") or "")
        state["focus"] = msg["id"]
        return self.screen(uid, state, refresh_feedback=True)

    @guarded
    def select(self, state, request: gr.Request, evt: gr.SelectData) -> dict:
        uid, state = self._login(state, request)
        history = self._history(uid, state)
        i = self._index(evt.index)
        if 0 <= i < len(history) and history[i]["role"] == "assistant":
            state["focus"] = history[i]["id"]
        return self.screen(uid, state)

    @guarded
    def save_feedback(self, state, reasons, comment, request: gr.Request) -> dict:
        """Reason tags and a comment on the focused answer's vote (one vote per answer: this updates it)."""
        uid, state = self._login(state, request)
        msg = self._focused(uid, state)
        vote = self.heed.store.thumb_for(user_id=uid, message_id=msg["id"])
        if vote is None:
            raise Refused("like or dislike this answer first (the thumbs under it)")
        reasons = [] if reasons is None else reasons
        if not isinstance(reasons, list) or any(r not in views.REASONS for r in reasons):
            raise Refused(f"reasons are some of: {', '.join(views.REASONS)}")
        comment = "" if comment is None else comment
        if not isinstance(comment, str) or len(comment) > COMMENT_LIMIT:
            raise Refused(f"the comment must be text of at most {COMMENT_LIMIT:,} characters")
        self.heed.thumb(uid, msg["id"], vote["payload"]["up"], reasons=sorted(set(reasons), key=views.REASONS.index),
                        comment=comment.strip())
        return {**self.screen(uid, state, refresh_feedback=True), "info": "Feedback saved."}

    @guarded
    def rate(self, state, stars, request: gr.Request) -> dict:
        uid, state = self._login(state, request)
        if self._conversation(uid, state) is None:
            raise Refused("start a conversation to rate it")
        if isinstance(stars, str) and stars.strip().isdigit():
            stars = int(stars)
        self.heed.rate(uid, state["conv"], stars)
        return {**self.screen(uid, state), "info": f"Rated {stars} of 5. Thanks!"}
