"""What the gate computed once and reuses: answers to contexts, and log-likelihoods of held-out answers.

A candidate's answers and scores are written into its folder before it is
renamed into place; once promoted they are the active adapter's, so the next
run computes only what is new since (a version folder is never written after
its run). The base model's are kept in the adapters folder, shared by every
user, bounded with the newest kept. Each file names the settings its values
depend on: a change makes the old values stale, never wrong.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from heed.config import HeedConfig

log = logging.getLogger(__name__)

ANSWERS_FILE = "gate_answers.json"
BASE_ANSWERS_FILE = "base_gate_answers.json"
SCORES_FILE = "gate_scores.json"
BASE_SCORES_FILE = "base_gate_scores.json"
BASE_LIMIT = {BASE_ANSWERS_FILE: 512, BASE_SCORES_FILE: 4096}


def _model_settings(config: HeedConfig) -> list:
    from heed.hardware import pick_device_dtype

    m = config.model
    device, dtype = pick_device_dtype(m)
    return [m.name_or_path, str(dtype), device, m.batch_invariant]


def answers_key(config: HeedConfig) -> str:
    """What an answer depends on besides the adapter and the context."""
    g = config.generation
    return hashlib.sha256(json.dumps([*_model_settings(config), g.system_prompt, g.repetition_penalty, g.penalize_end_of_turn, g.penalty_counts_prompt,
                                      g.max_context_tokens, config.learner.gate_max_new_tokens]).encode()).hexdigest()[:16]


def scores_key(config: HeedConfig) -> str:
    """What a log-likelihood depends on besides the adapter and the tokens scored (the system prompt is among those)."""
    return hashlib.sha256(json.dumps(["scores", *_model_settings(config)]).encode()).hexdigest()[:16]


def context_key(chat: list[dict]) -> str:
    return hashlib.sha256(json.dumps(chat, sort_keys=True).encode()).hexdigest()[:24]


def sequence_key(seq: tuple[list[int], int]) -> str:
    """A scored sequence: its token ids and where its answer starts."""
    return hashlib.sha256(json.dumps([list(seq[0]), seq[1]]).encode()).hexdigest()[:24]


def read(path: Path, key: str) -> dict:
    """{key: [value, value]} kept at ``path`` for these settings; {} when absent, stale or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("gate: ignoring unreadable cache %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("settings") != key or not isinstance(data.get("answers"), dict):
        return {}
    return {k: v for k, v in data["answers"].items() if isinstance(v, list) and len(v) == 2}


def write(path: Path, key: str, values: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # "answers" for scores too: the answer files' format from before scores were kept, so old files still read.
        tmp.write_text(json.dumps({"settings": key, "answers": values}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a cache: the next run recomputes what it cannot read
        log.warning("gate: could not keep values in %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


def add_to_base(path: Path, key: str, known: dict, new: dict) -> None:
    """Add ``new`` to the base model's shared file (which held ``known``), keeping the newest up to its bound."""
    if new:
        kept = {**known, **new}
        write(path, key, dict(list(kept.items())[-BASE_LIMIT[path.name]:]))
