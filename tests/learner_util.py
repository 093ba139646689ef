"""Helpers shared by the learner's tests: a service on the shared tiny engine and scripted feedback."""
from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import make_config

QUESTIONS = ["hello there", "what is water", "tell me a fact", "capital of france", "say something", "one more",
             "why so", "how come", "is it true", "what now", "who is it", "where is it", "when is it", "tell me more",
             "is that so", "what else"]

# LoRA on every linear layer: the tiny model's attention-only LoRA is too weak to learn a sentence in seconds.
STRONG = {"lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-2, "epochs": 20,
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def learner_config(tmp_path: Path, model_path: Path, **learner):
    return make_config(tmp_path / "data", model_path, learner={"gate_max_new_tokens": 32, **learner})


def service(config, engine=None):
    from heed.service import Heed

    return Heed(config, engine=engine)


def ask(heed, uid: int, question: str, conversation: int | None = None):
    """(conversation id, the stored answer's message id) for one question."""
    conv = conversation or heed.start_conversation(uid)
    reply = heed.chat(uid, conv, question).wait()
    return conv, reply.message_id


def edit_answers(heed, uid: int, edits: list[str], questions: list[str] = QUESTIONS) -> list[int]:
    """One conversation per question; its answer edited into the given text. Returns the feedback ids."""
    ids = []
    for i, text in enumerate(edits):
        _, mid = ask(heed, uid, questions[i % len(questions)] + ("" if i < len(questions) else f" ({i})"))
        ids.append(heed.edit(uid, mid, text))
    return ids


def thumb_answers(heed, uid: int, votes: list[bool]) -> None:
    """One conversation per vote ("question 0", "question 1", ...); its answer voted up (True) or down."""
    for i, up in enumerate(votes):
        _, mid = ask(heed, uid, f"question {i}")
        heed.thumb(uid, mid, up)


def files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()
