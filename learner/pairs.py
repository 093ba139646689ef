"""Feedback events -> training signal, following DESIGN.md's feedback-to-signal table.

| feedback                 | examples made here                                                   |
|--------------------------|----------------------------------------------------------------------|
| edit                     | dpo (chosen = edited, rejected = original) + sft (the edited answer) |
| correction               | dpo (corrected over original) + sft, on the context WITHOUT the       |
|                          | correction, so the adapter learns to do it unasked                    |
| comparison (pick 1 of 2) | dpo (picked over the other; only preferred, not imitated: see below) |
| thumbs                   | dpo when an up and a down answer share a context, else kto           |
| conversation rating      | a weight (0.5x-1.5x) on every example of that conversation, and kto  |
|                          | labels for its answers nobody judged otherwise (1-2 stars: bad,      |
|                          | 4-5 stars: good)                                                     |

A dpo pair's ``imitate`` says whether its chosen answer is one the user endorsed:
their own edit, an answer they voted up, a corrected answer they then voted up or
edited. The learner's SFT term imitates only those; the better of two picked
answers, or a corrected answer nobody confirmed, is only preferred over the
other (DPO). Measured on the embedded model, a brief user's picks and unconfirmed
corrections were 35-90-word answers, half of what the SFT term imitated, and
its adapter kept answering at about 30 words.

Every example carries the context the answer was given in (the conversation's
active messages before it, without the system prompt: the trainer adds the
configured one, the same the chat serves with). The train/held-out split is
decided per answer from a hash of the user's turns before it, so every signal
about one answer lands on the same side, a question asked again in another
conversation lands there too (a held-out answer is never a question the
adapter trained on), and held-out examples never train. Store ids would not
do: conversations of users chatting at once interleave, so the same history
would split differently from one run to the next.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from heed.store import NotFound, Store

JUDGED_KINDS = ("thumb", "edit", "correction", "comparison")


def split_for(*, user_id: int, key: str, heldout_fraction: float, seed: int = 0) -> str:
    """'train' or 'heldout', fixed forever for one (user, answer key)."""
    digest = hashlib.sha256(f"{seed}:{user_id}:{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def answer_key(prompt: list[dict]) -> str:
    """What decides an answer's side: the user's turns before it (assistant turns can be edited later)."""
    turns = [m["content"] for m in prompt if m["role"] == "user"]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()


def rating_weights(feedback: list[dict]) -> dict[int, float]:
    """conversation_id -> weight in [0.5, 1.5]: a 5-star conversation's signal counts 3x a 1-star one's."""
    return {f["conversation_id"]: 0.5 + (int(f["payload"]["stars"]) - 1) / 4 for f in feedback if f["kind"] == "rating"}


class _Messages:
    """Per-build cache of the user's messages and contexts (a context costs three queries)."""

    def __init__(self, store: Store, user_id: int) -> None:
        self.store, self.user_id = store, user_id
        self._msg: dict[int, dict | None] = {}
        self._ctx: dict[int, list[dict] | None] = {}

    def message(self, message_id: int | None) -> dict | None:
        if message_id is None:
            return None
        if message_id not in self._msg:
            try:
                self._msg[message_id] = self.store.get_message(user_id=self.user_id, message_id=message_id)
            except NotFound:
                self._msg[message_id] = None
        return self._msg[message_id]

    def context(self, message_id: int | None) -> list[dict] | None:
        """The chat before the answer; None when the answer is gone or opens the conversation."""
        if message_id is None:
            return None
        if message_id not in self._ctx:
            try:
                ctx = self.store.context_before(user_id=self.user_id, message_id=message_id)
            except NotFound:
                ctx = None
            # An answer with no user turn before it has nothing to condition on.
            self._ctx[message_id] = ctx if ctx and ctx[-1]["role"] == "user" else None
        return self._ctx[message_id]


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def build_examples(store: Store, *, user_id: int, feedback: list[dict], heldout_fraction: float, seed: int = 0,
                   all_feedback: list[dict] | None = None, edit_weight: float = 1.0) -> list[dict]:
    """Training examples (dpo pairs, kto singles, sft targets) from this user's feedback events.

    ``all_feedback`` (default: ``feedback``) is what ratings and thumb-pairing
    look across, so a new thumb can pair with an older one on the same context
    and a rating weighs the new feedback of its conversation. ``edit_weight``
    multiplies the weight of what an edit teaches (and of a correction the user
    then edited): the answer is the user's own words, not a choice between two
    of the model's.
    """
    all_feedback = all_feedback if all_feedback is not None else feedback
    weights = rating_weights(all_feedback)
    msgs = _Messages(store, user_id)
    out: list[dict] = []

    def emit(fb: dict, kind: str, prompt: list[dict], *, scale: float = 1.0, **fields) -> None:
        key = answer_key(prompt)
        out.append({"feedback_id": fb["id"], "source": fb["kind"], "kind": kind, "prompt": prompt,
                    "split": split_for(user_id=user_id, key=key, heldout_fraction=heldout_fraction, seed=seed),
                    "weight": fields.pop("weight", weights.get(fb["conversation_id"], 1.0) * scale), **fields})

    edited = {f["message_id"] for f in all_feedback if f["kind"] == "edit"}
    judged = {f["message_id"] for f in all_feedback if f["kind"] in JUDGED_KINDS}
    votes = {f["message_id"]: bool(f["payload"]["up"]) for f in all_feedback if f["kind"] == "thumb"}
    # Thumbs grouped by the context they answer: an up and a down there make a pair.
    thumbs: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for fb in all_feedback:
        if fb["kind"] == "thumb" and fb["message_id"] not in edited:
            msg = msgs.message(fb["message_id"])
            if msg is not None:
                thumbs[(msg["conversation_id"], msg["position"])].append((fb, msg))

    new_ids = {f["id"] for f in feedback}
    for fb in feedback:
        p = fb["payload"]
        kind = fb["kind"]
        if kind == "edit":
            msg, ctx = msgs.message(fb["message_id"]), msgs.context(fb["message_id"])
            if msg is None or ctx is None:
                continue
            # Edited twice: the user's last version is what they want (a -> b, then b -> c: both say c).
            chosen = msg["content"] if not _same(msg["content"], p["before"]) else p["after"]
            if _same(chosen, p["before"]):
                continue
            emit(fb, "dpo", ctx, chosen=chosen, rejected=p["before"], scale=edit_weight, imitate=True)
            emit(fb, "sft", ctx, completion=chosen, scale=edit_weight)
        elif kind == "correction":
            # The pair sits on the context *without* the correction, so the adapter learns to do it unasked.
            orig = msgs.message(p.get("original_message_id"))
            ctx = msgs.context(p.get("original_message_id"))
            if orig is None or ctx is None or votes.get(fb["message_id"]) is False:
                continue  # a corrected answer the user then voted down is not what they wanted
            fixed = msgs.message(fb["message_id"])
            # If the user went on to edit the corrected answer, their edit is the better answer.
            edited_after = fixed is not None and fixed["original_content"] is not None
            chosen = fixed["content"] if edited_after else (p.get("after") or "").strip()
            if not chosen or _same(chosen, p["before"]):
                continue
            scale = edit_weight if edited_after else 1.0
            emit(fb, "dpo", ctx, chosen=chosen, rejected=p["before"], scale=scale,
                 imitate=edited_after or votes.get(fb["message_id"]) is True)
            emit(fb, "sft", ctx, completion=chosen, scale=scale)
        elif kind == "comparison":
            msg, ctx = msgs.message(p["chosen_id"]), msgs.context(p["chosen_id"])
            if msg is None or ctx is None:
                continue
            chosen = msg["content"] if msg["original_content"] is not None else p["chosen"]
            # Greedy decoding can regenerate the very same answer: a choice between equals says nothing.
            if _same(chosen, p["rejected"]):
                continue
            # "The better of the two" is not "good": imitated only when the user also edited or voted it up.
            emit(fb, "dpo", ctx, chosen=chosen, rejected=p["rejected"],
                 imitate=p["chosen_id"] in edited or votes.get(p["chosen_id"]) is True)
        elif kind == "thumb":
            if fb["message_id"] in edited:
                continue  # the edit of the same answer says more than the vote
            msg, ctx = msgs.message(fb["message_id"]), msgs.context(fb["message_id"])
            if msg is None or ctx is None:
                continue
            up = bool(p["up"])
            partners = [(g, m) for g, m in thumbs[(msg["conversation_id"], msg["position"])]
                        if bool(g["payload"]["up"]) != up and not _same(m["content"], msg["content"])]
            # Pair once: of two new votes the newer one owns the pair; an old vote pairs with any new one.
            partner = next(((g, m) for g, m in partners if g["id"] < fb["id"] or g["id"] not in new_ids), None)
            if partner is not None:
                _, m = partner
                good, bad = (msg["content"], m["content"]) if up else (m["content"], msg["content"])
                emit(fb, "dpo", ctx, chosen=good, rejected=bad, imitate=True)
            elif not any(g["id"] in new_ids for g, _ in partners):
                emit(fb, "kto", ctx, completion=msg["content"], label=int(up))
        elif kind == "rating":
            stars = int(p["stars"])
            if stars == 3:
                continue  # neutral: only a weight (1.0) for the conversation's other feedback
            try:
                history = store.history(user_id=user_id, conversation_id=fb["conversation_id"])
            except NotFound:
                continue
            for m in history:
                if m["role"] != "assistant" or m["id"] in judged:
                    continue
                ctx = msgs.context(m["id"])
                if ctx is not None:
                    emit(fb, "kto", ctx, completion=m["content"], label=int(stars >= 4), weight=1.0)
    return out


def counts(examples: list[dict]) -> dict:
    """{'train': {'dpo': n, ...}, 'heldout': {...}} for logs and run metrics."""
    c: dict = {"train": defaultdict(int), "heldout": defaultdict(int)}
    for e in examples:
        c[e["split"]][e["kind"]] += 1
    return {k: dict(v) for k, v in c.items()}
