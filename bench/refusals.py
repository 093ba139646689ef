"""Why held-out answers were not accepted, from a run's answer log (``personalize*_answers.jsonl``).

An answer is accepted only when it is sensible, in its persona's style and on
the question's topic; a refused one is counted under the first of those it
fails, so each refused answer counts once.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

REASONS = ("cut off", "other degenerate", "not in the persona's style", "off topic")


def first_failure(record: dict) -> str | None:
    """The first check a held-out answer failed (None: accepted)."""
    if record.get("accepted"):
        return None
    if record["degenerate"] == "cut_off":
        return "cut off"
    if record["degenerate"]:
        return "other degenerate"
    if not record.get("style"):
        return "not in the persona's style"
    if not record["on_topic"]:
        return "off topic"
    raise ValueError(f"a refused answer that passed every check: {record['track']} {record['prompt']!r}")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def at_checkpoint(records: list[dict], checkpoint: int) -> dict[str, list[dict]]:
    """{track: its answers after ``checkpoint`` events} for the tracks that learned (the base's answers left out)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["track"] != "base" and r["checkpoint"] == checkpoint:
            out.setdefault(r["track"], []).append(r)
    return out


def refusals_md(records: list[dict], *, checkpoint: int, title: str, examples: int = 3) -> str:
    """A table of why answers were refused after ``checkpoint`` events, per track, with a few off-topic answers."""
    tracks = at_checkpoint(records, checkpoint)
    if not tracks:
        return ""
    lines = [f"#### {title}", "",
             "Each refused held-out answer under the first check it fails: sensible (not cut off, not otherwise degenerate), "
             "the persona's style, on the question's topic. The off-topic check is a lenient word match, so an answer can be "
             "judged off topic for a synonym (a question about a wardrobe answered about a closet): the examples show which.", "",
             "| track | answers | accepted | " + " | ".join(REASONS) + " |", "|---|---|---|" + "---|" * len(REASONS)]
    off: list[dict] = []
    for track, recs in tracks.items():
        why = Counter(first_failure(r) for r in recs)
        lines.append(f"| {track} | {len(recs)} | {why[None]} | " + " | ".join(str(why[k]) for k in REASONS) + " |")
        off += [r for r in recs if first_failure(r) == "off topic"]
    if off and examples:
        lines += ["", "Off-topic examples:", ""]
        lines += [f"- {r['track']}: “{r['prompt']}” → “{_clip(r['answer'])}”" for r in off[:examples]]
    return "\n".join(lines)


def _clip(text: str, limit: int = 140) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit].rsplit(" ", 1)[0] + " …"
