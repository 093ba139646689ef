"""Markdown pages from the result files: personalize.md, perf.md and the combined REPORT.md."""
from __future__ import annotations

import json
from pathlib import Path

QUALITY_CHECK = (
    "An answer counts as accepted only when its persona's judge accepts it **and** it is sensible by "
    "`heed.quality.degeneration`, the same check the learner's gate uses: not empty; at least 2 words; not cut off "
    "(the model ended it before the token limit); at most 35% of its word 3-grams repeat an earlier one; at most 60% of "
    "its word 4-grams echo the prompt; and, from 8 words on, at least 30% distinct words. The real personas also want an "
    "answer to the question (`heed.quality.on_topic`): the reply shares at least one content word with it (3-letter "
    "stems, stopwords ignored), so an apology or the system prompt said back, which a small model can collapse to, is "
    "not accepted however short or well-formed. Published beside acceptance, not part of it: the share of sound answers "
    "that are one template said to every question (`heed.quality.templated`: over 30% of an answer's word 3-grams occur "
    "in 2 or more other answers to other questions, once lines said word for word in that many answers are left out), "
    "which the topic check passes whenever the template's slot holds a word of the question."
)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def wilson(rate: float, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share measured on ``n`` answers (sound at 0% and 100%, unlike rate ± 2 SE)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(rate, n) -> str:
    if rate is None or not n:
        return "–"
    lo, hi = wilson(rate, n)
    return f"{100 * lo:.0f}–{100 * hi:.0f}%"


def _settings(res: dict) -> list[str]:
    """The generation and learner settings the figures depend on, as one paragraph."""
    chat = (res.get("generation") or {}).get("chat") or {}
    lc = res.get("learner_config") or {}
    if not chat and not lc:
        return []
    # Runs from before penalize_end_of_turn existed penalized the end of turn too.
    spared = "" if chat.get("penalize_end_of_turn", True) else " (not on the end of a turn)"
    # Runs from before penalty_counts_prompt existed counted the prompt's tokens too.
    spared += "" if chat.get("penalty_counts_prompt", True) else " (on the answer's own words, not the question's)"
    dtypes = res.get("dtypes") or {}
    numerics = f"Serving in {dtypes['serving']}, training in {dtypes['learner']}. " if dtypes else ""
    gen = (f"{numerics}Generation: greedy, system prompt “{chat.get('system_prompt')}”, repetition penalty {chat.get('repetition_penalty')}{spared}, "
           f"{chat.get('max_new_tokens')} new tokens while chatting, {(res.get('generation') or {}).get('eval_max_new_tokens')} when judging. ")
    learn = (f"Learner: LoRA r={lc.get('lora_r')} on {', '.join(lc.get('target_modules', []))}, lr {lc.get('learning_rate')}, "
             f"{lc.get('epochs')} epochs (at least {lc.get('min_steps')} steps), batch {lc.get('batch_size')}, "
             f"DPO {lc.get('dpo_loss')} + SFT ×{lc.get('sft_weight')} (imitating {lc.get('imitate', 'all')} chosen answers), reference {lc.get('reference')}, replay {lc.get('replay_size')}; "
             f"gate: held-out chosen likelihood may fall to {lc.get('gate_min_logp_gain')} nats/token, KL ≤ {lc.get('gate_max_kl')}.")
    return [gen + learn, ""]


def _command(res: dict) -> str:
    """How these results were made (results from before the command was recorded: guessed from the config file)."""
    if res.get("command"):
        return res["command"]
    quick = "quick" in str(res.get("config_file", "")) or "tiny" in str(res.get("config_file", ""))
    return "heed bench personalize" + (" --quick" if quick else "")


_NO_SUCH_SETTING = "(no such setting)"  # a key one of the two runs' code did not have yet


def recipe_differences(theirs: dict | None, ours: dict | None) -> dict:
    """{learner key: (their value, our value)} where two results' learner configs differ ({} when either is unknown)."""
    if not theirs or not ours:
        return {}
    return {k: (theirs.get(k, _NO_SUCH_SETTING), ours.get(k, _NO_SUCH_SETTING)) for k in sorted(set(theirs) | set(ours))
            if theirs.get(k, _NO_SUCH_SETTING) != ours.get(k, _NO_SUCH_SETTING)}


def differences_text(differs: dict, *, ours: str) -> str:
    """'key theirs (OURS: ours), ...' for a recipe_differences result."""
    def show(value) -> str:
        return value if value == _NO_SUCH_SETTING else repr(value)

    return ", ".join(f"{k} {show(a)} ({ours}: {show(b)})" for k, (a, b) in sorted(differs.items()))


def personalize_md(res: dict, *, images: dict[str, str]) -> str:
    from learner.shrink import describe_attempts

    b = res.get("bench", {})
    target, n_held = b.get("target_events"), res.get("n_heldout_prompts")
    lines = [
        "# How well does Heed learn? (simulated users)",
        "",
        f"Model: `{res.get('model')}` · held-out prompts: {res.get('n_heldout_prompts')} · train prompts: {res.get('n_train_prompts')} · "
        f"run time: {res.get('seconds', 0) / 60:.1f} min · regenerate with `{_command(res)}`",
        "",
        *([f"> **Note:** {res['note']}", ""] if res.get("note") else []),
        "Each persona is one user who chats through the service (`Heed.chat`), gives feedback the way the chat UI does "
        "(`edit`, `correct`, `thumb`, `regenerate` + `choose`), and runs the learner (`Heed.learn`: DPO + SFT / KTO on its "
        "own LoRA, the promotion gate included) after " + ", ".join(map(str, b.get("checkpoints", []))) + " events, continuing the same adapter. Held-out "
        "prompts are never chatted about; their answers are generated greedily with the adapter a new session would get.",
        "",
        "An edit changes only what its persona wants (`bench/personas.py`): *brief* cuts the reply to the sentences that "
        "answer the question (at most 30 words); the others keep the reply (its broken tail, if cut off, deleted) and add "
        "their list layout, closing question, summary line or sign-off. A rewrite the persona's own check would refuse is "
        "never saved: the user votes the answer down instead.",
        "",
        *_settings(res),
        QUALITY_CHECK,
        "",
        "## Alignment quality and data efficiency",
        "",
        f"Each rate is a share of {n_held} held-out answers, so one answer is {100 / max(n_held or 1, 1):.1f} points; the "
        f"interval column is the 95% Wilson interval of the rate after {target}: where the rate over many more prompts like "
        "these could lie. It does not cover the draw of the simulated users' feedback, which moves a persona's figures further between runs.",
        "",
        "| persona | base | " + " | ".join(f"after {c}" for c in b.get("checkpoints", [])) + f" | 95% interval @{target} | degenerate @{target} | one template @{target} | others' max Δ @{target} |",
        "|---|---|" + "---|" * len(b.get("checkpoints", [])) + "---|---|---|---|",
    ]
    for name, p in res.get("personas", {}).items():
        cells = [_pct(p["curve"].get(str(c))) for c in b.get("checkpoints", [])]
        lines.append(f"| {name} | {_pct(p['base'])} | " + " | ".join(cells) + f" | {_interval(p['curve'].get(str(target)), n_held)} | "
                     f"{_pct(p['degenerate'])} | {_pct(p.get('templated'))} | {100 * p['others_max_delta']:.0f} pts |")
    for key in ("curve", "alignment"):
        if key in images:
            lines += ["", f"![{key}]({images[key]})"]
    kinds = {name: {k: c for k, c in tracks.items() if k != "all" and len(c) > 1} for name, tracks in (res.get("kinds") or {}).items()}
    kinds = {name: tracks for name, tracks in kinds.items() if tracks}
    skipped = res.get("skipped") or {}
    if kinds:
        lines += ["", "## By feedback kind", "", "The same persona learning from one kind of feedback alone (a fresh user each)."
                  + (" From a separate run: `heed bench personalize --bench-config bench/kinds.yaml --out bench/results/personalize_kinds.json`."
                     if res.get("kinds_from") else "")]
        differs = res.get("kinds_recipe_differs") or {}
        if differs:
            # An older by-kind run stays useful, but only beside the recipe it was measured with.
            lines[-1] += (" **That run used another learner recipe than the run above**: "
                          + differences_text(differs, ours="above")
                          + "; its curves compare kinds with each other, not with the mix above.")
        for name, tracks in kinds.items():
            cps = sorted({int(c) for t in tracks.values() for c in t})
            lines += ["", f"| {name} | " + " | ".join(f"after {c}" for c in cps) + " |", "|---|" + "---|" * len(cps)]
            allc = res["personas"].get(name, {}).get("curve", {})
            lines.append("| all (mix) | " + " | ".join(_pct(allc.get(str(c))) for c in cps) + " |")
            for kind, curve in tracks.items():
                lines.append(f"| {kind} only | " + " | ".join(_pct(curve.get(str(c))) for c in cps) + " |")
        if "kinds" in images:
            lines += ["", f"![by kind]({images['kinds']})"]
    if skipped:
        lines += ["", "Not measured in this run (time budget): " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                  + ". `heed bench personalize --quick` runs every kind on the tiny model."]
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
    lines += ["", "## Learner runs", "", "| track | events | status | seconds | train new + carried + replay | gate notes |", "|---|---|---|---|---|---|"]
    for key, rec in res.get("tracks", {}).items():
        for pt in rec["points"][1:]:
            ln = pt["learn"]
            notes = "; ".join(describe_attempts(ln.get("attempts") or [], ln["status"]) + ln["reasons"])
            lines.append(f"| {key} | {pt['events']} | {ln['status']} | {ln['seconds']} | {ln.get('n_train_new')} + {ln.get('n_carried') or 0} + {ln.get('n_replay')} | "
                         f"{notes[:200]} |")
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
    kinds = {n: {k: c for k, c in t.items() if k != "all" and len(c) > 1} for n, t in (res.get("kinds") or {}).items()}
    kinds = {n: t for n, t in kinds.items() if t}
    if kinds:
        images["kinds"] = plots.kind_curves(kinds, {n: p["curve"] for n, p in res["personas"].items()}, folder / f"{stem}_kinds.png").name
    if (res.get("isolation_matrix") or {}).get("adapter_of"):
        images["isolation"] = plots.isolation_matrix(res["isolation_matrix"], folder / f"{stem}_isolation.png").name
    md = folder / f"{stem}.md"
    md.write_text(personalize_md(res, images=images), encoding="utf-8")
    return md


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


PERF_ROWS = [
    # key, label, goal text, goal check
    ("adapter_tokens_per_s_ratio", "reply tokens/s with a user's adapter ÷ bare base model", "≥ 0.95", lambda v: v >= 0.95),
    ("switched_adapter_tokens_per_s_ratio", "the same for a reply right after another user's (unmerged) ÷ bare base model", "", None),
    ("plain_peft_ratio", "the same with plain peft (unmerged LoRA) ÷ bare base model", "(reference)", None),
    ("first_token_ms", "time to first token, ms", "", None),
    ("adapter_switch_ms", "adapter switch between cached users, ms", "≤ 20", lambda v: v <= 20),
    ("merge_ms", "merging a user's adapter into the spare weight copies (hybrid: their second reply in a row), ms", "", None),
    ("adapter_load_ms", "adapter load from disk, ms", "", None),
    ("memory_adapters_mb", "memory for the cached users' adapters, MB (RSS growth)", "", None),
    ("mixed_adapter_batch_speedup_8", "8 users, 8 adapters at once: total tokens/s ÷ one user", "≥ 4", lambda v: v >= 4),
    ("plain_peft_adapter_names_speedup_8", "the same with peft's adapter_names batch ÷ one user", "(reference)", None),
    ("eight_users_adapters_vs_none", "8 users with 8 adapters ÷ the same 8 without adapters", "", None),
    ("learner_s_per_pair_ratio", "learner s/pair ÷ plain TRL DPOTrainer script", "≤ 1.1", lambda v: v <= 1.1),
    ("learner_peak_rss_ratio", "learner peak RSS ÷ plain TRL script", "≤ 1.2", lambda v: v <= 1.2),
    ("history_10x_time_ratio", "learner run time at 10× history ÷ 1× (same new feedback)", "≤ 1.3", lambda v: v <= 1.3),
    ("pair_query_ms_1m", "a user's feedback + pair queries with 1M feedback rows, ms", "≤ 50", lambda v: v <= 50),
    ("scheduler_scan_ms_1m", "scheduler's scan for users with new feedback at 1M rows, ms", "", None),
]


def _num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _reruns(sections: dict) -> str:
    return f" Since then {', '.join(f'`--only {k}` rerun on {v}' for k, v in sections.items())}." if sections else ""


def perf_md(res: dict) -> str:
    lines = ["# Performance", "",
             f"Model `{res.get('model')}`, torch threads {res.get('torch_threads')}, medians of {res.get('settings', {}).get('runs')} runs; "
             f"took {res.get('seconds', 0) / 60:.1f} min. Regenerate with `heed bench perf`."
             + _reruns(res.get("sections_rerun") or {}), "",
             "| figure | value | goal | met |", "|---|---|---|---|"]
    for key, label, goal, ok in PERF_ROWS:
        v = res.get(key)
        met = "" if ok is None or v is None else ("yes" if ok(v) else "no")
        lines.append(f"| {label} | {_num(v)} | {goal} | {met} |")
    fw, raw = res.get("feedback_writes_per_s") or {}, res.get("raw_sqlite_writes_per_s") or {}
    for n in sorted(fw, key=int):
        lines.append(f"| feedback events stored per s, {n} writer{'s' if n != '1' else ''} (raw sqlite3 insert: {_num(raw.get(n))}) | {_num(fw[n])} | | |")
    same = res.get("answers_same_alone_again_batched")
    lines += ["", f"Serving `{res.get('serving')}` ({'; '.join(res.get('served_as') or [])}; spare weight copies "
                  f"{_num(res.get('merged_copies_mb'))} MB"
                  + (f"; a user's answer computed {' / '.join(res.get('answers_compared') or [])}: the same in {same[0]} of "
                     f"{same[1]} questions" if same else "")
                  + "). "
                  f"Tokens/s: base {_num(res.get('base_tokens_per_s'))}, with an adapter {_num(res.get('adapter_tokens_per_s'))}, "
                  f"plain peft {_num(res.get('plain_peft_tokens_per_s'))}; one user {_num(res.get('one_user_tokens_per_s'))}, "
                  f"8 users together {_num(res.get('eight_users_tokens_per_s'))} (in {res.get('eight_users_batches')} batch(es)), "
                  f"the same 8 without adapters {_num(res.get('eight_users_no_adapter_tokens_per_s'))}, "
                  f"peft adapter_names batch {_num(res.get('plain_peft_adapter_names_tokens_per_s_8'))}. "
                  f"{res.get('users_in_memory')} users' adapters: {_num(res.get('adapter_weights_mb'))} MB of weights, "
                  f"RSS {_num(res.get('rss_mb_with_adapters'))} MB."]
    if res.get("learner_note"):
        lines += ["", f"Learner figures: {res['learner_note']}."]
    return "\n".join(lines) + "\n"


def write_perf(res: dict, out_json: Path) -> Path:
    md = out_json.parent / f"{out_json.stem}.md"
    md.write_text(perf_md(res), encoding="utf-8")
    return md
