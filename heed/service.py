"""The service: the one facade the UI, the CLI, the learner's triggers, benchmarks and tests go through.

Every method that touches user data takes ``user_id`` (from a login, never a
form field) and the store refuses records that are not that user's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .config import HeedConfig, load_config
from .learn_jobs import LearnJobs
from .store import NotFound, Store, StoreError
from .validate import adapter_problem, check_arguments

log = logging.getLogger(__name__)


def with_correction(messages: list[dict], instruction: str) -> list[dict]:
    """In-session adaptation: the correction rides along as an instruction on the last user turn.

    Of three phrasings measured on the embedded model (`heed bench correction-phrasing`), this
    one was followed most often; the correction in the system prompt, or before the question, less.
    """
    last = messages[-1]
    return [*messages[:-1], {"role": last["role"], "content": f"{last['content']}\n\n(Answer again, and this time: {instruction})"}]


def alternative_seed(base: int, *, user_id: int, messages: list[dict], adapter_version: int | None, attempt: int) -> int:
    """The sampling seed of a regenerated answer: the same request gives the same alternative.

    A random seed made every run of the benchmark (and every bug report) differ
    in its sampled answers; this one still differs per click (``attempt``), per
    user, per context and per adapter version, and follows ``generation.seed``.
    """
    key = json.dumps([base, user_id, adapter_version, attempt, messages], ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 2**31


class InputError(ValueError):
    """The request is invalid (empty, too long, wrong kind); nothing was stored."""


@dataclass
class Reply:
    """A streamed answer: iterate for text pieces; ids are set as they are stored.

    ``user_message_id`` is stored before generation starts, ``message_id`` once
    the answer is complete (also when the consumer stops early: the partial
    answer is kept, marked by ``stopped``).
    """

    _pieces: Iterator[str]
    user_message_id: int | None = None
    message_id: int | None = None
    text: str = ""
    stopped: bool = False
    feedback_id: int | None = None
    _on_done: Callable[["Reply"], None] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            for piece in self._pieces:
                self.text += piece
                yield piece
            finished = True
        finally:
            self.stopped = not finished
            if self._on_done is not None and self.message_id is None:
                self._on_done(self)

    def wait(self) -> "Reply":
        for _ in self:
            pass
        return self


def _storable(text: str) -> str:
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def clean_text(text: object, *, limit: int, what: str = "message") -> str:
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text")
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (possible from JS clients) cannot be stored as UTF-8.
        text = text.encode("utf-8", "replace").decode("utf-8")
    if not text.strip():
        raise InputError(f"the {what} is empty")
    if len(text) > limit:
        raise InputError(f"the {what} is {len(text):,} characters; the limit is {limit:,}")
    return text


class Heed:
    def __init__(self, config: HeedConfig, *, engine=None) -> None:
        self.config = config
        config.data_path.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.db_path, busy_timeout_ms=config.store.busy_timeout_ms)
        self._engine = engine
        self._engine_lock = threading.Lock()
        self._jobs = LearnJobs(config)

    @classmethod
    def open(cls, config_path: str | Path | None = None, *, overrides: dict | None = None) -> "Heed":
        return cls(load_config(config_path, overrides=overrides))

    @property
    def engine(self):
        """The generation engine, loaded on first use (the CLI's user commands never need it)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    from .engine import Engine

                    self._engine = Engine.load(self.config)
        return self._engine

    # -- users ------------------------------------------------------------------
    def add_user(self, name: str, password: str) -> int:
        return self.store.add_user(name, password=password)

    def authenticate(self, name: str, password: str) -> int | None:
        if not isinstance(name, str) or not isinstance(password, str) or len(name) > 64 or len(password) > 1024:
            return None
        return self.store.check_login(name, password, max_failures=self.config.app.login_max_failures,
                                      lockout_seconds=self.config.app.login_lockout_seconds)

    def user_id(self, name: str) -> int:
        return self.store.user_id(name)

    def delete_user(self, user_id: int) -> None:
        import shutil

        self.store.delete_user(user_id=user_id)
        shutil.rmtree(self.config.adapters_path / str(user_id), ignore_errors=True)
        # The web app's learner log names the user and their runs: it goes with them.
        (self.config.data_path / "logs" / f"learn-user{user_id}.log").unlink(missing_ok=True)

    # -- conversations --------------------------------------------------------------
    def start_conversation(self, user_id: int, *, title: str = "") -> int:
        """A new conversation, bound to the adapter version active now (it keeps it to the end)."""
        active = self.store.active_adapter(user_id=user_id)
        return self.store.create_conversation(user_id=user_id, title=title, adapter_version=active["version"] if active else None)

    def list_conversations(self, user_id: int) -> list[dict]:
        return self.store.list_conversations(user_id=user_id)

    def history(self, user_id: int, conversation_id: int) -> list[dict]:
        return self.store.history(user_id=user_id, conversation_id=conversation_id)

    def rename_conversation(self, user_id: int, conversation_id: int, title: str) -> None:
        self.store.rename_conversation(user_id=user_id, conversation_id=conversation_id, title=clean_text(title, limit=200, what="title"))

    def delete_conversation(self, user_id: int, conversation_id: int) -> None:
        self.store.delete_conversation(user_id=user_id, conversation_id=conversation_id)

    # -- generation -------------------------------------------------------------------
    def system_prompt(self, user_id: int) -> str:
        notes = self.store.list_notes(user_id=user_id, active_only=True)
        prompt = self.config.generation.system_prompt
        if notes:
            prompt += "\nThe user has asked you to follow these preferences:\n" + "\n".join(f"- {n['text']}" for n in notes)
        return prompt

    def adapter_for(self, user_id: int, conversation_id: int):
        """The AdapterRef this conversation is served with, or None for the base model.

        An adapter whose files are gone falls back to the base model (logged), so
        a damaged adapter never takes the chat down.
        """
        from .engine import AdapterRef

        conv = self.store.get_conversation(user_id=user_id, conversation_id=conversation_id)
        version = conv["adapter_version"]
        if version is None:
            return None
        row = next((a for a in self.store.list_adapters(user_id=user_id) if a["version"] == version), None)
        problem = "its record is gone" if row is None else adapter_problem(Path(row["path"]))
        if problem:
            log.warning("user %s adapter v%s cannot be served (%s); serving the base model", user_id, version, problem)
            return None
        # SQLite reuses a deleted user's id, so user and version alone could name a
        # deleted account's adapter still in the engine's cache; its creation time cannot.
        return AdapterRef(key=f"u{user_id}v{version}t{int(row['created_at'] * 1e6)}", path=row["path"])

    def _messages_for(self, user_id: int, context: list[dict], instruction: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt(user_id)}]
        msgs += [{"role": m["role"], "content": m["content"]} for m in context]
        return with_correction(msgs, instruction) if instruction else msgs

    def _stream_answer(self, user_id: int, conversation_id: int, context: list[dict], *, instruction: str | None = None,
                       store_as: dict, attempt: int | None = None,
                       save: Callable[[Reply, str, int | None], None] | None = None) -> Reply:
        """Stream an answer; when it ends it is stored by ``save(reply, text, adapter_version)``
        (default: a new message placed by ``store_as``). With ``attempt`` the answer is sampled
        (an alternative), with a seed from ``alternative_seed``."""
        ref = self.adapter_for(user_id, conversation_id)
        msgs = self._messages_for(user_id, context, instruction)
        version = self.store.get_conversation(user_id=user_id, conversation_id=conversation_id)["adapter_version"]
        # An alternative must differ from the first answer, which greedy decoding would repeat exactly.
        gen = None
        if attempt is not None:
            seed = alternative_seed(self.config.generation.seed, user_id=user_id, messages=msgs,
                                    adapter_version=version if ref else None, attempt=attempt)
            gen = self.engine.with_generation(do_sample=True, seed=seed)
        pieces = self._engine_stream(msgs, ref, gen)

        def done(reply: Reply) -> None:
            text = reply.text.strip() or "(no answer)"
            if save:
                save(reply, text, version if ref else None)
                return
            reply.message_id = self.store.add_message(
                user_id=user_id, conversation_id=conversation_id, role="assistant", content=text,
                adapter_version=version if ref else None, instruction=instruction, **store_as,
            )

        return Reply(pieces, _on_done=done)

    def _engine_stream(self, msgs: list[dict], ref, gen=None) -> Iterator[str]:
        from .engine import AdapterLoadError

        started = False
        try:
            for piece in self.engine.stream(msgs, adapter=ref, gen=gen):
                started = True
                yield piece
        except AdapterLoadError as exc:
            if started:
                raise
            # The files changed after adapter_for looked at them (or peft refused them).
            log.warning("%s; serving the base model", exc)
            yield from self.engine.stream(msgs, adapter=None, gen=gen)

    def chat(self, user_id: int, conversation_id: int, text: str) -> Reply:
        """Store the user's message, then stream the answer (stored when it ends)."""
        text = clean_text(text, limit=self.config.generation.max_message_chars)
        context = self.history(user_id, conversation_id)
        if context and context[-1]["role"] == "user":
            # An earlier answer never arrived (crash, stop): answer that turn first.
            context = context[:-1]
            self.store.set_message_status(user_id=user_id, message_id=self.history(user_id, conversation_id)[-1]["id"], status="superseded")
        mid = self.store.add_message(user_id=user_id, conversation_id=conversation_id, role="user", content=text)
        reply = self._stream_answer(user_id, conversation_id, context + [{"role": "user", "content": text}], store_as={})
        reply.user_message_id = mid
        return reply

    def resend(self, user_id: int, message_id: int, text: str) -> Reply:
        """The user rewrote one of their messages: the conversation branches there and gets a new answer.

        The old message and everything after it stay in the store as superseded.
        """
        msg = self.store.get_message(user_id=user_id, message_id=message_id)
        if msg["role"] != "user" or msg["status"] != "active":
            raise InputError("only your own messages in the conversation can be rewritten")
        text = clean_text(text, limit=self.config.generation.max_message_chars)
        self.store.truncate_after(user_id=user_id, conversation_id=msg["conversation_id"], position=msg["position"] - 1)
        return self.chat(user_id, msg["conversation_id"], text)

    def undo(self, user_id: int, conversation_id: int) -> str:
        """Take back the last exchange (kept in the store as superseded); returns the user's text to edit and resend."""
        last = next((m for m in reversed(self.history(user_id, conversation_id)) if m["role"] == "user"), None)
        if last is None:
            raise InputError("there is nothing to undo")
        self.store.truncate_after(user_id=user_id, conversation_id=conversation_id, position=last["position"] - 1)
        return last["content"]

    def _answer(self, user_id: int, message_id: int) -> dict:
        msg = self.store.get_message(user_id=user_id, message_id=message_id)
        if msg["role"] != "assistant":
            raise InputError("feedback goes on the assistant's answers")
        return msg

    # -- feedback --------------------------------------------------------------------
    def thumb(self, user_id: int, message_id: int, up: bool | None, *, reasons: list[str] | None = None, comment: str = "") -> int | None:
        """Vote on an answer; a second vote replaces the first; None withdraws it."""
        self._answer(user_id, message_id)
        if up is None:
            existing = self.store.thumb_for(user_id=user_id, message_id=message_id)
            if existing:
                self.store.withdraw_feedback(user_id=user_id, feedback_id=existing["id"])
            return None
        if not isinstance(reasons, (list, tuple, type(None))):
            raise InputError("reasons must be a list of short texts")
        # Optional free text: may be empty, but must be storable (no NULs, no lone surrogates).
        reasons = [_storable(str(r))[:40] for r in (reasons or [])][:10]
        comment = _storable(comment)[:2000] if isinstance(comment, str) else ""
        return self.store.record_feedback(user_id=user_id, kind="thumb", message_id=message_id,
                                          payload={"up": bool(up), "reasons": reasons, "comment": comment})

    def edit(self, user_id: int, message_id: int, new_text: str) -> int:
        """The user's rewrite replaces the answer; the original is kept for the pair."""
        msg = self._answer(user_id, message_id)
        new_text = clean_text(new_text, limit=self.config.generation.max_message_chars, what="edit")
        if new_text == msg["content"]:
            raise InputError("the edit does not change the answer")
        return self.store.record_edit(user_id=user_id, message_id=message_id, content=new_text)

    def correct(self, user_id: int, message_id: int, instruction: str) -> Reply:
        """Regenerate the answer now with the correction; the pair is recorded when it ends."""
        msg = self._answer(user_id, message_id)
        instruction = clean_text(instruction, limit=500, what="correction")
        context = self.store.context_before(user_id=user_id, message_id=message_id)

        def save(r: Reply, text: str, adapter_version: int | None) -> None:
            # One transaction: a crash leaves the old answer in place and no half-recorded correction.
            r.message_id, r.feedback_id = self.store.record_correction(
                user_id=user_id, message_id=message_id, instruction=instruction, content=text, adapter_version=adapter_version)

        return self._stream_answer(user_id, msg["conversation_id"], context, instruction=instruction, store_as={}, save=save)

    def regenerate(self, user_id: int, message_id: int) -> Reply:
        """A second answer to the same context, stored as an alternative until the user picks."""
        msg = self._answer(user_id, message_id)
        context = self.store.context_before(user_id=user_id, message_id=message_id)
        # Each click asks for a new alternative: the answers already at this place number the attempt.
        attempt = sum(m["role"] == "assistant" and m["position"] == msg["position"]
                      for m in self.store.history(user_id=user_id, conversation_id=msg["conversation_id"], include_inactive=True))
        return self._stream_answer(user_id, msg["conversation_id"], context, attempt=attempt,
                                   store_as={"position": msg["position"], "status": "alternative", "replaces_id": message_id})

    def choose(self, user_id: int, chosen_id: int, other_id: int) -> int:
        """The user picked ``chosen_id`` over ``other_id`` (two answers to one context)."""
        try:
            return self.store.record_choice(user_id=user_id, chosen_id=chosen_id, rejected_id=other_id)
        except NotFound:
            raise
        except StoreError as exc:
            raise InputError(str(exc)) from exc

    def rate(self, user_id: int, conversation_id: int, stars: int) -> int:
        if not isinstance(stars, int) or isinstance(stars, bool) or not 1 <= stars <= 5:
            raise InputError("a rating is a whole number from 1 to 5")
        self.store.get_conversation(user_id=user_id, conversation_id=conversation_id)
        return self.store.record_feedback(user_id=user_id, kind="rating", conversation_id=conversation_id, payload={"stars": stars})

    # -- notes --------------------------------------------------------------------------
    def add_note(self, user_id: int, text: str, *, feedback_id: int | None = None) -> int:
        return self.store.add_note(user_id=user_id, text=clean_text(text, limit=500, what="note"), feedback_id=feedback_id)

    def update_note(self, user_id: int, note_id: int, *, text: str | None = None, active: bool | None = None) -> None:
        if text is not None:
            text = clean_text(text, limit=500, what="note")
        self.store.update_note(user_id=user_id, note_id=note_id, text=text, active=None if active is None else bool(active))

    def delete_note(self, user_id: int, note_id: int) -> None:
        self.store.delete_note(user_id=user_id, note_id=note_id)

    def notes(self, user_id: int) -> list[dict]:
        return self.store.list_notes(user_id=user_id)

    # -- learning -----------------------------------------------------------------------
    def learn(self, user_id: int, *, trigger: str = "manual", progress: Callable[[str, float], None] | None = None) -> dict:
        """Run the learner for this user now (in this process) and return the run's summary."""
        from learner.run import learn_user

        return learn_user(self.config, self.store, user_id=user_id, trigger=trigger, progress=progress)

    def learn_in_background(self, user_id: int) -> dict:
        """Start a learner run for this user in a child process (training loads its own model copy).

        Returns ``{"started": bool, "reason": str}``; refused while a run for this user is going.
        """
        return self._jobs.start(self.store, user_id=user_id)

    def learn_progress(self, user_id: int) -> dict:
        """The state of this user's background run: running, stage, fraction, and the result when done."""
        return self._jobs.progress(self.store, user_id=user_id)

    def adapter_status(self, user_id: int) -> dict:
        active = self.store.active_adapter(user_id=user_id)
        seen = self.store.seen_adapter_version(user_id=user_id)
        return {
            "active": active,
            "versions": self.store.list_adapters(user_id=user_id),
            "runs": self.store.list_runs(user_id=user_id, limit=10),
            "unconsumed_feedback": self.store.count_unconsumed(user_id=user_id),
            "new_since_last_session": bool(active) and active["version"] != seen,
        }

    def mark_adapter_seen(self, user_id: int) -> None:
        active = self.store.active_adapter(user_id=user_id)
        self.store.mark_adapter_seen(user_id=user_id, version=active["version"] if active else None)

    def rollback(self, user_id: int, version: int | None) -> None:
        self.store.set_active_version(user_id=user_id, version=version)


# Values from the web, the CLI or a script: a wrong type or an absurd id is an InputError here.
check_arguments(Heed, error=InputError)

__all__ = ["Heed", "Reply", "InputError", "NotFound", "StoreError"]
