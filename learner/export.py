"""`heed export`: a user's feedback as JSONL in TRL's conversational dataset formats.

- dpo: ``{"prompt": [messages], "chosen": [assistant turn], "rejected": [assistant turn]}``
- kto: ``{"prompt": [messages], "completion": [assistant turn], "label": bool}`` (the unpaired
  examples plus every pair split into its good and bad answer)
- sft: ``{"prompt": [messages], "completion": [assistant turn]}`` (every answer the user wrote
  or endorsed: edits, corrections, picked answers, thumbs-up)

Each file loads with ``datasets.load_dataset("json", data_files=FILE, split="train")`` and goes
straight into DPOTrainer / KTOTrainer / SFTTrainer. Prompts start with the configured system
message, as the learner trains. Every example is exported, held-out ones included (the split is
the learner's business); nothing else (no ids, no weights) so trl sees only its own columns.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from heed.config import HeedConfig
from heed.store import Store

from .pairs import build_examples
from .rows import as_kto

FORMATS = ("dpo", "kto", "sft")


def _turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def export_rows(config: HeedConfig, store: Store, *, user_id: int, fmt: str) -> list[dict]:
    """The rows ``export_jsonl`` writes, in feedback order, without duplicates."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    feedback = store.list_feedback(user_id=user_id)
    examples = build_examples(store, user_id=user_id, feedback=feedback, heldout_fraction=0.0, seed=config.learner.seed)
    system = [{"role": "system", "content": config.generation.system_prompt}]
    rows: list[dict] = []
    if fmt == "dpo":
        for e in examples:
            if e["kind"] == "dpo":
                rows.append({"prompt": system + e["prompt"], "chosen": _turn(e["chosen"]), "rejected": _turn(e["rejected"])})
    elif fmt == "kto":
        singles = as_kto([e for e in examples if e["kind"] == "dpo"]) + [e for e in examples if e["kind"] == "kto"]
        for e in singles:
            rows.append({"prompt": system + e["prompt"], "completion": _turn(e["completion"]), "label": bool(e["label"])})
    else:
        for e in examples:
            if e["kind"] == "sft":
                text = e["completion"]  # edits and corrections
            elif e["kind"] == "dpo" and e["source"] not in ("edit", "correction"):
                text = e["chosen"]  # picked answers, the better of two voted answers
            elif e["kind"] == "kto" and e["label"]:
                text = e["completion"]
            else:
                continue
            rows.append({"prompt": system + e["prompt"], "completion": _turn(text)})
    seen, unique = set(), []
    for r in rows:
        key = json.dumps(r, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def export_jsonl(config: HeedConfig, store: Store, *, user_id: int, fmt: str, out: str | os.PathLike) -> int:
    """Write the user's examples as JSONL (atomically: a partial file never appears); returns the row count."""
    rows = export_rows(config, store, user_id=user_id, fmt=fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)
