"""Markdown pages from the result files: personalize.md, perf.md and the combined REPORT.md."""
from __future__ import annotations

import json
from pathlib import Path

QUALITY_CHECK = (
    "An answer counts as accepted only when its persona's judge accepts it **and** it is sensible by "
    "`heed.quality.degeneration`, the same check the learner's gate uses: not empty; at least 2 words; not cut off "
    "(the model ended it before the token limit); at most 35% of its word 3-grams repeat an earlier one; at most 60% of "
    "its word 4-grams echo the prompt; and, from 8 words on, at least 25% distinct words."
)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def personalize_md(res: dict, *, images: dict[str, str]) -> str:
    b = res.get("bench", {})
    lines = [
        "# How well does Heed learn? (simulated users)",
        "",
        f"Model: `{res.get('model')}` · held-out prompts: {res.get('n_heldout_prompts')} · train prompts: {res.get('n_train_prompts')} · "
        f"run time: {res.get('seconds', 0) / 60:.1f} min · regenerate with `heed bench personalize`"
        + (" --quick" if "quick" in str(res.get("config_file", "")) or "tiny" in str(res.get("config_file", "")) else ""),
        "",
        "Each persona is one user who chats through the service (`Heed.chat`), gives feedback the way the chat UI does "
        "(`edit`, `correct`, `thumb`, `regenerate` + `choose`), and runs the learner (`Heed.learn`: DPO + SFT / KTO on its "
        "own LoRA, the promotion gate included) after 4, 8, 16 and 32 events, continuing the same adapter. Held-out "
        "prompts are never chatted about; their answers are generated greedily with the adapter a new session would get.",
        "",
        QUALITY_CHECK,
        "",
        "## Alignment quality and data efficiency",
        "",
        "| persona | base | " + " | ".join(f"after {c}" for c in b.get("checkpoints", [])) + f" | degenerate @{b.get('target_events')} | others' max Δ @{b.get('target_events')} |",
        "|---|---|" + "---|" * len(b.get("checkpoints", [])) + "---|---|",
    ]
    for name, p in res.get("personas", {}).items():
        cells = [_pct(p["curve"].get(str(c))) for c in b.get("checkpoints", [])]
        lines.append(f"| {name} | {_pct(p['base'])} | " + " | ".join(cells) + f" | {_pct(p['degenerate'])} | {100 * p['others_max_delta']:.0f} pts |")
    for key in ("curve", "alignment"):
        if key in images:
            lines += ["", f"![{key}]({images[key]})"]
    if res.get("kinds"):
        lines += ["", "## By feedback kind", "", "The same persona learning from one kind of feedback alone (a fresh user each)."]
        for name, tracks in res["kinds"].items():
            cps = sorted({int(c) for t in tracks.values() for c in t})
            lines += ["", f"| {name} | " + " | ".join(f"after {c}" for c in cps) + " |", "|---|" + "---|" * len(cps)]
            allc = res["personas"].get(name, {}).get("curve", {})
            lines.append("| all (mix) | " + " | ".join(_pct(allc.get(str(c))) for c in cps) + " |")
            for kind, curve in tracks.items():
                lines.append(f"| {kind} only | " + " | ".join(_pct(curve.get(str(c))) for c in cps) + " |")
        if "kinds" in images:
            lines += ["", f"![by kind]({images['kinds']})"]
    lines += ["", "## Reward accuracy (beside the generation figures, never instead)", "",
              "Held-out preference accuracy of each adapter's implicit reward (the gate's figure). It saturates even for "
              "adapters whose answers do not change, so the acceptance figures above are what decide.", "",
              "| persona | " + " | ".join(f"after {c}" for c in b.get("checkpoints", [])) + " |", "|---|" + "---|" * len(b.get("checkpoints", []))]
    for name, p in res.get("personas", {}).items():
        lines.append(f"| {name} | " + " | ".join(_pct(p["reward_accuracy"].get(str(c))) for c in b.get("checkpoints", [])) + " |")
    lines += ["", "## Interactivity", "",
              "In session: the answer regenerated right after a natural-language correction is accepted. Next session: "
              "the same prompt asked again in a new conversation after learning, without the correction.", "",
              "| persona | correction | followed in session | followed next session, unasked |", "|---|---|---|---|"]
    from bench.personas import get

    for name, p in res.get("personas", {}).items():
        it = p["interactivity"]
        lines.append(f"| {name} | “{get(name).correction}” | {_pct(it['in_session_followed'])} (n={it['in_session_n']}) | "
                     f"{_pct(it['next_session_followed'])} (n={it['next_session_n']}) |")
    iso = res.get("isolation_matrix")
    if iso and iso.get("adapter_of"):
        names = list(iso["adapter_of"])
        lines += ["", "## Isolation", "",
                  f"Acceptance by each judge (columns) of answers from each persona's adapter (rows) after {iso['at_events']} events; "
                  "the bottom row is the base model. Off-diagonal cells should stay within ±5 points of the base row.", "",
                  "| adapter \\ judge | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in names:
            lines.append(f"| {r} | " + " | ".join(("**" + _pct(iso["adapter_of"][r].get(c)) + "**") if r == c else _pct(iso["adapter_of"][r].get(c)) for c in names) + " |")
        lines.append("| base | " + " | ".join(_pct(iso["base"].get(c)) for c in names) + " |")
        obs = res.get("observer") or {}
        if obs:
            lines += ["", f"A user who gave no feedback got byte-identical answers to {obs['identical']} of {obs['prompts']} "
                          "prompts after every other user had learned and been served."]
        if "isolation" in images:
            lines += ["", f"![isolation]({images['isolation']})"]
    t = res.get("targets")
    if t:
        lines += ["", "## Targets", "", "| persona | ≥ 90% by ≤ 16 events | ≤ 5% degenerate | others within ±5 pts |", "|---|---|---|---|"]
        for name, v in t["per_persona"].items():
            lines.append(f"| {name} | {'yes' if v['acceptance_ge_90'] else 'no'} | {'yes' if v['degenerate_le_5'] else 'no'} | {'yes' if v['others_within_5'] else 'no'} |")
        lines += ["", f"Longest learner run on 8 or more new events: {t['learner_run_max_seconds_8plus_new_events']} s. "
                      f"Whole run: {t['full_run_minutes']} min."]
    lines += ["", "## Learner runs", "", "| track | events | status | seconds | train new + replay | gate notes |", "|---|---|---|---|---|---|"]
    for key, rec in res.get("tracks", {}).items():
        for pt in rec["points"][1:]:
            ln = pt["learn"]
            lines.append(f"| {key} | {pt['events']} | {ln['status']} | {ln['seconds']} | {ln.get('n_train_new')} + {ln.get('n_replay')} | "
                         f"{'; '.join(ln['reasons'])[:120]} |")
    return "\n".join(lines) + "\n"


def write_personalize(res: dict, out_json: Path) -> Path:
    """personalize.md and its plots beside the JSON."""
    from bench import plots

    folder = out_json.parent
    stem = out_json.stem
    images = {}
    if res.get("personas"):
        images["curve"] = plots.learning_curves(res, folder / f"{stem}_curve.png", target=res["bench"]["target_events"]).name
        images["alignment"] = plots.alignment_bars(res, folder / f"{stem}_alignment.png").name
    if res.get("kinds"):
        images["kinds"] = plots.kind_curves(res["kinds"], {n: p["curve"] for n, p in res["personas"].items()}, folder / f"{stem}_kinds.png").name
    if (res.get("isolation_matrix") or {}).get("adapter_of"):
        images["isolation"] = plots.isolation_matrix(res["isolation_matrix"], folder / f"{stem}_isolation.png").name
    md = folder / f"{stem}.md"
    md.write_text(personalize_md(res, images=images), encoding="utf-8")
    return md


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
