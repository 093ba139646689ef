"""The Gradio app: layout, event wiring, and `serve` (what `heed serve` runs).

Handlers live in handlers.py / learned.py and return dicts keyed by widget
name; ``_wire`` maps them onto this layout, turns ``warning``/``info`` into
toasts and shows unexpected errors as a short message, never a traceback.
Every event is also an HTTP endpoint: they are named (``/chat_send``, ...) but
left out of the API page; each one checks the login itself.
"""
# No `from __future__ import annotations` here: Gradio reads the note handlers' `gr.Request` hints
# below at runtime, and `gr` is only imported inside the functions.
import functools
import inspect
import logging

from heed.service import Heed

from . import views
from .styles import CSS, HEAD, theme

log = logging.getLogger(__name__)

SCREEN = ["state", "chat", "convs", "convs_empty", "rate_row", "tools", "correct_box", "notice", "conv_tools", "delete_confirm", "focus_info", "feedback_box", "compare",
          "alt_a", "alt_b", "rating", "send", "stop", "title", "reasons", "comment", "correction"]
LEARNED = ["state", "notes_data", "adapter_md", "gate_md", "versions", "runs", "rollback_to", "learn_status", "learn_btn", "timer"]
ERROR = "Something went wrong on Heed's side. Please try again; if it keeps happening, ask your administrator to check the server log."


def _wire(c: dict, trigger, fn, inputs: list[str], outputs: list[str], *, api_name: str | None, **kw):
    """Attach ``fn`` to ``trigger``, mapping its name-keyed dict onto the output components."""
    import gradio as gr

    outs = list(dict.fromkeys(outputs))

    def convert(result):
        result = dict(result or {})
        if msg := result.pop("warning", None):
            gr.Warning(msg)
        if msg := result.pop("info", None):
            gr.Info(msg, duration=3)
        unknown = set(result) - set(c)
        if unknown:
            raise KeyError(f"handler {fn.__name__} returned unknown widgets {sorted(unknown)}")
        mapped = {c[k]: v for k, v in result.items() if k in outs}
        if not outs:
            return None
        if len(outs) == 1:
            return mapped.get(c[outs[0]], gr.skip())
        return mapped or gr.skip()

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                for result in fn(*args, **kwargs):
                    yield convert(result)
            except Exception:
                log.exception("handler %s failed", fn.__name__)
                raise gr.Error(ERROR, print_exception=False) from None
    else:
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return convert(fn(*args, **kwargs))
            except Exception:
                log.exception("handler %s failed", fn.__name__)
                raise gr.Error(ERROR, print_exception=False) from None

    return trigger(handler, inputs=[c[n] for n in inputs], outputs=[c[n] for n in outs], api_name=api_name,
                   api_visibility="undocumented", show_progress=kw.pop("show_progress", "hidden"), **kw)


def build_app(heed: Heed):
    """The whole UI as a gr.Blocks (not launched). Tests and `serve` both use it."""
    import gradio as gr

    from .base import new_session
    from .handlers import Handlers

    h = Handlers(heed)
    c: dict = {}
    with gr.Blocks(title=heed.config.app.title, analytics_enabled=False) as demo:
        c["state"] = gr.State(new_session())
        c["notes_data"] = gr.State([])
        with gr.Row(elem_id="heed-header", equal_height=True):
            gr.HTML('<div class="heed-brand"><span class="heed-logo">●</span> Heed'
                    '<span class="heed-tagline">learns how you like your answers</span></div>')
            c["user_badge"] = gr.HTML("", elem_id="heed-user", padding=False)
            gr.Button("Log out", link="/logout", size="sm", variant="secondary", scale=0, min_width=90, elem_id="heed-logout")
        with gr.Tabs(elem_id="heed-tabs"):
            with gr.Tab("Chat", id="chat"):
                _chat_tab(gr, c)
            with gr.Tab("What Heed has learned", id="learned") as learned_tab:
                _learned_tab(gr, c, h)
        c["timer"] = gr.Timer(1.0, active=False)

        w = functools.partial(_wire, c)
        state, screen, learned = ["state"], SCREEN, LEARNED
        w(demo.load, h.load, state, screen + LEARNED + ["user_badge"], api_name="page_load")
        w(c["new"].click, h.new_chat, state, screen + ["msg"], api_name="chat_new")
        w(c["chat"].clear, h.new_chat, state, screen + ["msg"], api_name=None)  # the chat's trash icon starts afresh
        w(c["convs"].input, h.open_conversation, ["state", "convs"], screen, api_name="chat_open")
        w(c["rename"].click, h.rename, ["state", "title"], screen, api_name="chat_rename")
        w(c["title"].submit, h.rename, ["state", "title"], screen, api_name=None)
        w(c["delete"].click, h.delete_ask, state, screen, api_name="chat_delete_ask")
        w(c["delete_no"].click, h.delete_cancel, state, screen, api_name="chat_delete_cancel")
        w(c["delete_yes"].click, h.delete_confirm, state, screen, api_name="chat_delete")

        gen = dict(concurrency_limit=None)  # the engine serializes generation; the UI must not queue behind it
        w(c["msg"].submit, h.send, ["state", "msg"], screen + ["msg"], api_name="chat_send", **gen)
        w(c["send"].click, h.send, ["state", "msg"], screen + ["msg"], api_name=None, **gen)
        w(c["stop"].click, h.stop, state, [], api_name="chat_stop", queue=False)
        w(c["chat"].edit, h.edit, state, screen, api_name="chat_edit", **gen)
        w(c["chat"].retry, h.retry, state, screen, api_name="chat_retry", **gen)
        w(c["chat"].undo, h.undo, state, screen + ["msg"], api_name="chat_undo")
        w(c["chat"].like, h.like, state, screen, api_name="chat_like", **gen)  # a vote mid-stream waits for its answer
        w(c["chat"].select, h.select, state, screen, api_name="chat_select")
        w(c["keep_a"].click, h.choose_first, state, screen, api_name="chat_choose_first")
        w(c["keep_b"].click, h.choose_second, state, screen, api_name="chat_choose_second")
        w(c["save_feedback"].click, h.save_feedback, ["state", "reasons", "comment"], screen, api_name="chat_feedback")
        w(c["correct"].click, h.correct, ["state", "correction", "remember"], screen + ["remember"], api_name="chat_correct", **gen)
        w(c["correction"].submit, h.correct, ["state", "correction", "remember"], screen + ["remember"], api_name=None, **gen)
        w(c["rating"].input, h.rate, ["state", "rating"], screen, api_name="chat_rate")

        w(learned_tab.select, h.show_learned, state, learned, api_name="learned_show")
        w(c["note_add"].click, h.note_add, ["state", "note_new"], learned + ["note_new"], api_name="notes_add")
        w(c["note_new"].submit, h.note_add, ["state", "note_new"], learned + ["note_new"], api_name=None)
        w(c["rollback"].click, h.rollback, ["state", "rollback_to"], learned, api_name="adapter_rollback")
        w(c["learn_btn"].click, h.learn_now, state, learned, api_name="learn_now")
        w(c["timer"].tick, h.learn_poll, state, learned, api_name="learn_poll")
    demo.heed_handlers = h  # for tests and debugging
    return demo


def _chat_tab(gr, c: dict) -> None:
    with gr.Row(equal_height=False, elem_id="heed-main"):
        with gr.Column(scale=1, min_width=220, elem_id="heed-sidebar"):
            c["new"] = gr.Button("+  New chat", variant="primary", elem_id="heed-new")
            c["convs"] = gr.Radio(choices=[], label="Your conversations", elem_id="heed-convs", show_label=True)
            c["convs_empty"] = gr.Markdown("No conversations yet. Your chats will be listed here.", elem_classes=["heed-empty"])
            with gr.Group(visible=False, elem_id="heed-conv-tools") as c["conv_tools"]:
                c["title"] = gr.Textbox(label="Title", max_lines=1, max_length=200)
                with gr.Row():
                    c["rename"] = gr.Button("Rename", size="sm", min_width=60)
                    c["delete"] = gr.Button("Delete", size="sm", variant="stop", min_width=60)
            with gr.Group(visible=False, elem_id="heed-delete-confirm") as c["delete_confirm"]:
                gr.Markdown("Delete this conversation and all feedback on it? This cannot be undone.", padding=True)
                with gr.Row():
                    c["delete_yes"] = gr.Button("Yes, delete", size="sm", variant="stop", min_width=60)
                    c["delete_no"] = gr.Button("Cancel", size="sm", min_width=60)
        with gr.Column(scale=3, min_width=320, elem_id="heed-center"):
            c["notice"] = gr.Markdown(visible=False, elem_id="heed-notice")
            c["chat"] = gr.Chatbot(
                elem_id="heed-chat", label="Heed", show_label=False, height=views.CHAT_HEIGHT, min_height=280,
                editable="all", feedback_options=("Like", "Dislike"), placeholder=views.EMPTY_CHAT,
                sanitize_html=True, render_markdown=True, allow_tags=False, buttons=["copy"],
                group_consecutive_messages=False, layout="bubble", autoscroll=True,
            )
            with gr.Group(visible=False, elem_id="heed-compare") as c["compare"]:
                gr.Markdown("**Two answers to your last message. Which one is better?** The one you keep continues the conversation.", padding=True)
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=200, elem_classes=["heed-alt"]):
                        c["alt_a"] = gr.Markdown(label="First answer", sanitize_html=True)
                        c["keep_a"] = gr.Button("Keep the first", size="sm")
                    with gr.Column(min_width=200, elem_classes=["heed-alt"]):
                        c["alt_b"] = gr.Markdown(label="Second answer", sanitize_html=True)
                        c["keep_b"] = gr.Button("Keep the second", size="sm")
            with gr.Row(elem_id="heed-input", equal_height=True):
                c["msg"] = gr.Textbox(placeholder="Message Heed…", show_label=False,
                                      lines=1, max_lines=8, scale=8, autofocus=True, container=False, elem_id="heed-msg")
                c["send"] = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="heed-send")
                c["stop"] = gr.Button("■ Stop", variant="stop", scale=1, min_width=80, visible=False, elem_id="heed-stop")
            with gr.Row(elem_id="heed-rate", equal_height=True, visible=False) as c["rate_row"]:
                gr.HTML('<span class="heed-rate-label">Rate this conversation</span>', padding=False)
                c["rating"] = gr.Radio(choices=views.STARS, show_label=False, interactive=False, elem_id="heed-stars",
                                       container=False, scale=0)
        with gr.Column(scale=1, min_width=260, elem_id="heed-tools"):
            with gr.Group(elem_classes=["heed-card"], visible=False) as c["tools"]:
                gr.Markdown("#### Improve an answer", padding=True)
                c["focus_info"] = gr.Markdown(views.focus_markdown(None, number=None, thumb=None), padding=True, elem_id="heed-focus")
                with gr.Group(visible=False) as c["feedback_box"]:
                    c["reasons"] = gr.CheckboxGroup(choices=[(views.REASON_LABELS[r], r) for r in views.REASONS],
                                                    label="What was off? (optional)", elem_id="heed-reasons")
                    c["comment"] = gr.Textbox(label="Comment (optional)", lines=2, max_lines=6, max_length=2000)
                    c["save_feedback"] = gr.Button("Save feedback", size="sm")
                with gr.Group() as c["correct_box"]:
                    c["correction"] = gr.Textbox(label="Tell Heed what to change", lines=1, max_lines=4, max_length=500,
                                                 placeholder="shorter · no jargon · use bullet points", elem_id="heed-correction")
                    c["remember"] = gr.Checkbox(label="Remember this for future chats", value=False)
                    c["correct"] = gr.Button("Rewrite the answer", size="sm", variant="primary")


def _learned_tab(gr, c: dict, h) -> None:
    gr.Markdown("### What Heed has learned about you\nYour standing notes apply to every conversation; your personal "
                "model is trained from your feedback and changes nobody else's answers.", elem_id="heed-learned-intro")
    with gr.Row(equal_height=False, elem_id="heed-learned"):
        with gr.Column(scale=1, min_width=300):
            with gr.Group(elem_classes=["heed-card"]):
                gr.Markdown("#### Your standing notes\nHeed follows your active notes in every conversation. "
                            "Corrections you chose to remember land here.", padding=True)

                @gr.render(inputs=[c["notes_data"]])
                def notes(items):
                    if not items:
                        gr.Markdown("*No notes yet.* Add one below, or tick “Remember this” when you correct an answer.",
                                    elem_classes=["heed-empty"], padding=True)
                    for n in items or []:
                        with gr.Row(key=f"note-{n['id']}", equal_height=True, elem_classes=["heed-note"]):
                            text = gr.Textbox(n["text"], show_label=False, max_lines=3, max_length=500, scale=5, container=False,
                                              key=f"note-text-{n['id']}")
                            active = gr.Checkbox(n["active"], label="On", scale=0, min_width=64, container=False, key=f"note-on-{n['id']}")
                            save = gr.Button("Save", size="sm", scale=0, min_width=64, key=f"note-save-{n['id']}")
                            drop = gr.Button("Delete", size="sm", variant="stop", scale=0, min_width=64, key=f"note-del-{n['id']}")
                        _note_events(gr, c, h, n["id"], text, active, save, drop)

                with gr.Row(equal_height=True, elem_classes=["heed-note"]):
                    c["note_new"] = gr.Textbox(placeholder="Add a preference, e.g. “Keep answers under 100 words”", show_label=False,
                                               lines=1, max_lines=1, max_length=500, scale=5, container=False)
                    c["note_add"] = gr.Button("Add note", size="sm", scale=0, min_width=96)
        with gr.Column(scale=1, min_width=300):
            with gr.Group(elem_classes=["heed-card"]):
                gr.Markdown("#### Your personal model", padding=True)
                c["adapter_md"] = gr.Markdown(elem_id="heed-adapter", padding=True)
                c["learn_btn"] = gr.Button("Learn now from my feedback", variant="primary", elem_id="heed-learn")
                c["learn_status"] = gr.HTML(elem_id="heed-learn-status", padding=False)
            with gr.Accordion("Quality check of the version in use", open=False):
                c["gate_md"] = gr.Markdown(elem_id="heed-gate")
            with gr.Group(elem_classes=["heed-card"]):
                gr.Markdown("#### Versions", padding=True)
                c["versions"] = gr.Dataframe(headers=["Version", "Status", "Trained", "Feedback", "Note"], interactive=False,
                                             wrap=True, show_label=False, elem_id="heed-versions", max_height=260,
                                             buttons=[])
                with gr.Row(equal_height=True, elem_classes=["heed-note"]):
                    c["rollback_to"] = gr.Dropdown(choices=[], show_label=False, scale=4, container=False, elem_id="heed-rollback-to")
                    c["rollback"] = gr.Button("Use this version", size="sm", scale=0, min_width=140)
            with gr.Accordion("Recent learning runs", open=False):
                c["runs"] = gr.Dataframe(headers=["Started", "By", "Result", "Version", "Feedback", "Took", "Detail"], interactive=False,
                                         wrap=True, show_label=False, max_height=240, buttons=[])


def _note_events(gr, c, h, note_id: int, text, active, save, drop) -> None:
    # The note id is fixed here on the server; the browser only says "save" or "delete".
    w = functools.partial(_wire, {**c, f"note-text-{note_id}": text, f"note-on-{note_id}": active})

    def save_note(state, text_value, active_value, request: gr.Request):
        return h.note_save(state, note_id, text_value, active_value, request)

    def delete_note(state, request: gr.Request):
        return h.note_delete(state, note_id, request)

    w(save.click, save_note, ["state", f"note-text-{note_id}", f"note-on-{note_id}"], LEARNED, api_name=None)
    w(drop.click, delete_note, ["state"], LEARNED, api_name=None)


def serve(heed: Heed, *, host: str, port: int) -> None:
    """Load the model, then serve the app with login until interrupted."""
    from starlette.middleware import Middleware

    from .session_guard import SessionGuard

    heed.engine  # noqa: B018 -- load the model now, not while the first visitor waits
    demo = build_app(heed)
    demo.queue(default_concurrency_limit=8)

    def login(name: str, password: str) -> bool:
        return heed.authenticate(name, password) is not None

    demo.launch(
        server_name=host, server_port=port, auth=login,
        auth_message="Sign in to Heed. Ask your administrator for an account (heed user add NAME).",
        footer_links=[], show_error=False, share=False, ssr_mode=False, enable_monitoring=False, pwa=False,
        mcp_server=False, theme=theme(), css=CSS, head=HEAD, quiet=False,
        # Nothing of a user's chats is kept in the browser's storage after logout (Gradio's run history).
        run_history=False,
        # A session hash is bound to the login that opened it (see session_guard.py).
        # ...and a login opened before a password change ends with it.
        app_kwargs={"middleware": [Middleware(SessionGuard, credentials_changed_at=heed.store.credentials_changed_at)]},
    )
