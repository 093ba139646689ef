"""A simulated user chatting through the service facade, exactly as the chat UI does.

Every answer the user sees comes from ``Heed.chat`` / ``correct`` /
``regenerate``; every piece of feedback goes through ``edit``, ``correct``,
``thumb`` or ``choose``. One call that records feedback is one event.
"""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field

from bench.personas import Persona


@dataclass
class Log:
    """What the user did, for the report."""

    events: dict = field(default_factory=lambda: {"edit": 0, "correction": 0, "thumb": 0, "comparison": 0})
    chats: int = 0
    accepted_when_chatting: int = 0
    corrections: list = field(default_factory=list)  # (prompt, followed in session?)
    picks_tied: int = 0
    edits_refused: int = 0  # rewrites the persona's own check refused (they became thumbs down)

    @property
    def total(self) -> int:
        return sum(self.events.values())


class SimulatedUser:
    """One persona as one Heed user; ``track`` is 'all' (its mix) or a single kind."""

    def __init__(self, heed, persona: Persona, *, track: str, prompts: list[str], seed: int, name: str | None = None,
                 chats_per_event: int = 3) -> None:
        self.heed = heed
        self.chats_per_event = chats_per_event
        self.persona = persona
        self.track = track
        self.name = name or f"{persona.name}-{track}"
        self.user_id = heed.add_user(self.name, secrets.token_urlsafe(12))
        self.prompts = list(prompts)
        self.rng = random.Random(f"{seed}:{self.name}")
        self.rng.shuffle(self.prompts)
        self._next = 0
        self.log = Log()
        self._tokens_cap = heed.config.generation.max_new_tokens

    # -- helpers ------------------------------------------------------------------
    def finished(self, text: str) -> bool:
        """Did the answer end by itself? (An answer at the token limit was cut off.)"""
        return self.heed.engine.count_tokens(text) < self._tokens_cap - 1

    def accepts(self, text: str, prompt: str) -> bool:
        return self.persona.accepts(text, prompt=prompt, finished=self.finished(text))

    def _prompt(self) -> str:
        p = self.prompts[self._next % len(self.prompts)]
        self._next += 1
        return p

    def _action(self) -> str:
        if self.track != "all":
            return self.track
        kinds, weights = zip(*self.persona.mix.items())
        return self.rng.choices(kinds, weights=weights)[0]

    def _count(self, kind: str) -> None:
        self.log.events[kind] += 1

    # -- one round: ask, look, react ----------------------------------------------
    def give_feedback(self, events: int) -> int:
        """Chat until ``events`` more feedback events were recorded (or the chat budget ends)."""
        target = self.log.total + events
        # Thumbs users vote on every answer; edit- or correction-only users say nothing when content.
        budget = events * (1 if self.track in ("all", "thumbs") else self.chats_per_event)
        chats = 0
        while self.log.total < target and chats < budget:
            chats += 1
            self._round(target - self.log.total)
        return self.log.total

    def _round(self, room: int) -> None:
        heed, uid, persona = self.heed, self.user_id, self.persona
        prompt = self._prompt()
        conv = heed.start_conversation(uid, title=prompt[:40])
        reply = heed.chat(uid, conv, prompt).wait()
        self.log.chats += 1
        text = reply.text
        if self.accepts(text, prompt):
            self.log.accepted_when_chatting += 1
            if self.track in ("all", "thumbs"):
                heed.thumb(uid, reply.message_id, True)
                self._count("thumb")
            return
        action = self._action()
        if action == "pick":
            other = heed.regenerate(uid, reply.message_id).wait()
            mine, theirs = self._grade(text, prompt), self._grade(other.text, prompt)
            if mine != theirs:
                better, worse = (reply.message_id, other.message_id) if mine > theirs else (other.message_id, reply.message_id)
                heed.choose(uid, better, worse)
                self._count("comparison")
                return
            # Two equally wrong answers: the user fixes one by hand instead.
            self.log.picks_tied += 1
            action = "edit"
        if action == "edit":
            self._fix(reply.message_id, text, prompt)
        elif action == "correction":
            fixed = heed.correct(uid, reply.message_id, persona.correction).wait()
            self._count("correction")
            ok = self.accepts(fixed.text, prompt)
            self.log.corrections.append({"prompt": prompt, "followed": ok, "answer": fixed.text[:300]})
            if self.track == "all" and room > 1:
                # Then the user reacts to the corrected answer like to any other.
                if ok:
                    heed.thumb(uid, fixed.message_id, True)
                    self._count("thumb")
                else:
                    self._fix(fixed.message_id, fixed.text, prompt)
        elif action == "thumbs":
            heed.thumb(uid, reply.message_id, False)
            self._count("thumb")
            if room > 1:
                # A thumbs-down user retries and votes on the new answer; opposite votes become a pair.
                other = heed.regenerate(uid, reply.message_id).wait()
                heed.thumb(uid, other.message_id, self.accepts(other.text, prompt))
                self._count("thumb")
        else:
            raise ValueError(f"unknown feedback kind {action!r}")

    def _fix(self, message_id: int, text: str, prompt: str) -> None:
        """Edit the answer into one the persona accepts; an answer with nothing worth keeping gets a
        thumbs down instead (an edits-only user just moves on). Nobody saves an edit they would reject
        themselves: a rewrite the persona's own check refuses counts as nothing worth keeping."""
        new = self.persona.edit(text, prompt)
        if new and not self.accepts(new, prompt):
            self.log.edits_refused += 1
            new = None
        if new and new.strip() != text.strip():
            self.heed.edit(self.user_id, message_id, new)
            self._count("edit")
        elif self.track != "edit":
            self.heed.thumb(self.user_id, message_id, False)
            self._count("thumb")

    def _grade(self, text: str, prompt: str) -> float:
        return (10.0 if self.accepts(text, prompt) else 0.0) + self.persona.score(text)

    # -- interactivity: ask a corrected prompt again in a new session ----------------
    def ask_again(self, n: int) -> list[dict]:
        heed, uid = self.heed, self.user_id
        out = []
        for c in self.log.corrections[:n]:
            conv = heed.start_conversation(uid, title="again")
            reply = heed.chat(uid, conv, c["prompt"]).wait()
            out.append({"prompt": c["prompt"], "followed_in_session": c["followed"], "followed_next_session": self.accepts(reply.text, c["prompt"]),
                        "answer": reply.text[:300]})
        return out
