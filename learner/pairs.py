"""Feedback events -> training signal, following DESIGN.md's feedback-to-signal table.

Every example carries the context the answer was given in (the conversation's
active messages before it, without the system prompt: the trainer adds the
configured one, the same the chat serves with) and a deterministic split:
held-out examples never train.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

from heed.store import NotFound, Store


def split_for(*, user_id: int, feedback_id: int, heldout_fraction: float, seed: int = 0) -> str:
    """'train' or 'heldout', fixed forever for one (user, feedback event)."""
    digest = hashlib.sha256(f"{seed}:{user_id}:{feedback_id}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def _ex(fb: dict, split: str, kind: str, prompt: list[dict], **fields) -> dict:
    return {"feedback_id": fb["id"], "source": fb["kind"], "kind": kind, "prompt": prompt, "split": split, "weight": 1.0, **fields}


def rating_weights(feedback: list[dict]) -> dict[int, float]:
    """conversation_id -> weight in [0.5, 1.5]: a 5-star conversation's signal counts 3x a 1-star one's."""
    return {f["conversation_id"]: 0.5 + (int(f["payload"]["stars"]) - 1) / 4 for f in feedback if f["kind"] == "rating"}


def build_examples(store: Store, *, user_id: int, feedback: list[dict], heldout_fraction: float, seed: int = 0,
                   all_feedback: list[dict] | None = None) -> list[dict]:
    """Training examples (dpo pairs, kto singles, sft targets) from this user's feedback events.

    ``all_feedback`` (default: ``feedback``) is what ratings and thumb-pairing
    look across, so a new thumb can pair with an older one on the same context.
    """
    all_feedback = all_feedback if all_feedback is not None else feedback
    weights = rating_weights(all_feedback)
    out: list[dict] = []

    def context(message_id: int) -> list[dict] | None:
        try:
            return store.context_before(user_id=user_id, message_id=message_id)
        except NotFound:
            return None

    thumbs: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for fb in all_feedback:
        if fb["kind"] == "thumb" and fb["message_id"] is not None:
            try:
                msg = store.get_message(user_id=user_id, message_id=fb["message_id"])
            except NotFound:
                continue
            thumbs[(msg["conversation_id"], msg["position"])].append((fb, msg))

    new_ids = {f["id"] for f in feedback}
    for fb in feedback:
        split = split_for(user_id=user_id, feedback_id=fb["id"], heldout_fraction=heldout_fraction, seed=seed)
        w = weights.get(fb["conversation_id"], 1.0)
        p = fb["payload"]
        if fb["kind"] == "edit":
            ctx = context(fb["message_id"])
            if ctx is None or not ctx:
                continue
            out.append(_ex(fb, split, "dpo", ctx, chosen=p["after"], rejected=p["before"], weight=w))
            out.append(_ex(fb, split, "sft", ctx, completion=p["after"], weight=w))
        elif fb["kind"] == "correction":
            # The pair sits on the context *without* the correction, so the adapter learns to do it unasked.
            ctx = context(p["original_message_id"])
            if not ctx or not p.get("after"):
                continue
            out.append(_ex(fb, split, "dpo", ctx, chosen=p["after"], rejected=p["before"], weight=w))
            out.append(_ex(fb, split, "sft", ctx, completion=p["after"], weight=w))
        elif fb["kind"] == "comparison":
            ctx = context(p["chosen_id"])
            if not ctx:
                continue
            out.append(_ex(fb, split, "dpo", ctx, chosen=p["chosen"], rejected=p["rejected"], weight=w))
        elif fb["kind"] == "thumb":
            try:
                msg = store.get_message(user_id=user_id, message_id=fb["message_id"])
            except NotFound:
                continue
            ctx = context(fb["message_id"])
            if not ctx:
                continue
            up = bool(p["up"])
            partners = [(g, m) for g, m in thumbs[(msg["conversation_id"], msg["position"])] if bool(g["payload"]["up"]) != up]
            # Pair once: the newest feedback event of the two owns the pair.
            partner = next(((g, m) for g, m in partners if g["id"] < fb["id"] or g["id"] not in new_ids), None)
            if partner is not None:
                g, m = partner
                good, bad = (msg["content"], m["content"]) if up else (m["content"], msg["content"])
                out.append(_ex(fb, split, "dpo", ctx, chosen=good, rejected=bad, weight=w))
            elif not [g for g, _ in partners if g["id"] in new_ids]:
                out.append(_ex(fb, split, "kto", ctx, completion=msg["content"], label=int(up), weight=w))
        elif fb["kind"] == "rating":
            # A rating without thumbs still says something about each answer: KTO labels for strong ratings.
            stars = int(p["stars"])
            if stars in (2, 3, 4):
                continue
            rated = {f["message_id"] for f in all_feedback if f["kind"] in ("thumb", "edit", "correction", "comparison")}
            for m in store.history(user_id=user_id, conversation_id=fb["conversation_id"]):
                if m["role"] != "assistant" or m["id"] in rated:
                    continue
                ctx = context(m["id"])
                if ctx:
                    out.append(_ex(fb, split, "kto", ctx, completion=m["content"], label=int(stars >= 4), weight=1.0))
    return out
