"""`heed bench report`: the latest result files rendered into one page, REPORT.md, with the plots."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import differences_text, load, perf_md, personalize_md, recipe_differences, write_personalize

RESULTS = Path(__file__).resolve().parent / "results"


def render(results_dir: Path, *, config: str | None = None) -> str:
    parts = ["# Heed benchmark report", "",
             "Regenerate everything with `heed bench personalize && heed bench perf && heed bench report` "
             "(about 100 minutes on a 2-core CPU; `--quick` runs the same code on the tiny model in minutes)."]
    if config:
        parts.append(f"Config: `{config}`.")
    pers = load(results_dir / "personalize.json")
    by_kind = load(results_dir / "personalize_kinds.json")
    if pers and by_kind and by_kind.get("kinds"):
        # The by-kind tracks ran on their own (bench/kinds.yaml): they replace the full run's skipped ones.
        pers = {**pers, "kinds": by_kind["kinds"], "kinds_from": "personalize_kinds.json",
                "kinds_recipe_differs": recipe_differences(by_kind.get("learner_config"), pers.get("learner_config")), "skipped": {
            k: v for k, v in (pers.get("skipped") or {}).items() if k.split("/")[0] not in by_kind["kinds"]}}
    if pers:
        md_path = write_personalize(pers, results_dir / "personalize.json")
        images = {k: f"personalize_{k}.png" for k in ("curve", "alignment", "kinds", "isolation") if (results_dir / f"personalize_{k}.png").is_file()}
        parts += ["", personalize_md(pers, images=images).replace("# How well", "## How well", 1).replace("\n## ", "\n### ")]
        del md_path
    else:
        parts += ["", "## How well does Heed learn?", "", "No personalization results yet: run `heed bench personalize`."]
    draws = [d for d in (load(f) for f in sorted(results_dir.glob("personalize_seed*.json"))) if d and d.get("personas")]
    if pers and draws:
        parts += ["", draws_md(pers, draws)]
    refusals = _refusals_md(results_dir, [("the main run", pers, "personalize")] + [(f"draw {_seed(d)}", d, f"personalize_seed{_seed(d)}") for d in draws])
    if pers and refusals:
        parts += ["", "### Why answers were not accepted", "", refusals]
    variants = [(f.name, d) for f in sorted(results_dir.glob("personalize_*.json")) if not f.name.startswith(("personalize_seed", "personalize_kinds"))
                and not f.name.endswith(".partial.json") and (d := load(f)) and d.get("personas")]
    if pers and variants:
        parts += ["", variants_md(pers, variants, draws)]
    audit = load(results_dir / "gate_audit.json")
    if audit:
        parts += ["", gate_audit_md(audit, pers)]
    for f in sorted(results_dir.glob("gate_audit_seed*.json")):
        seed = f.stem.removeprefix("gate_audit_seed")
        other = load(f)
        if other:
            draw = next((d for d in draws if str(_seed(d)) == seed), None)
            parts += ["", gate_audit_md(other, draw, draw_seed=seed)]
    corrections = load(results_dir / "correction_guidance.json") or load(results_dir / "correction_phrasing.json")
    if corrections:
        parts += ["", corrections_md(corrections)]
    perf = load(results_dir / "perf.json")
    parts += ["", perf_md(perf).replace("# Performance", "## Performance", 1) if perf else "## Performance\n\nNo results yet: run `heed bench perf`."]
    loadres = load(results_dir / "load.json")
    if loadres:
        parts += ["", "## Load", "", "| figure | value |", "|---|---|"]
        parts += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in loadres.items()]
    return "\n".join(parts) + "\n"


def _refusals_md(results_dir: Path, runs: list[tuple[str, dict | None, str]]) -> str:
    """For each run whose answer log is beside its results: why its answers after the target events were refused."""
    from bench.refusals import load as load_answers
    from bench.refusals import refusals_md

    parts = []
    for name, res, stem in runs:
        log_file = results_dir / f"{stem}_answers.jsonl"
        if res and log_file.is_file():
            target = (res.get("bench") or {}).get("target_events", 16)
            md = refusals_md(load_answers(log_file), checkpoint=target, title=f"{name.capitalize()}, after {target} events")
            if md:
                parts.append(md)
    return "\n\n".join(parts)


def corrections_md(res: dict) -> str:
    """In-session corrections on the base model: which phrasing (and decoding) the persona's judge accepts."""
    ways = list(res["followed"])
    names = list(res["followed"][ways[0]]) if ways else []
    guided = bool(res.get("guidance"))
    command = "heed bench correction-phrasing" + (
        f" --prompts {res['n_prompts']} --guidance {' '.join(f'{g:g}' for g in res['guidance'])} --out bench/results/correction_guidance.json" if guided else "")
    lines = ["## Corrections in the moment", "",
             f"The answer regenerated right after a correction, on the base model, for {res['n_prompts']} held-out prompts per persona, "
             "each persona's own correction and full check (style, sensible, on topic). `appended` is what the service does"
             + ("; `appended, guided G` decodes the same chat with classifier-free guidance of scale G against the chat without the correction" if guided else "")
             + f". Regenerate with `{command}` ({res.get('seconds', 0) / 60:.0f} min here).", "",
             "| phrasing | " + " | ".join(names) + " | mean | degenerate |", "|---|" + "---|" * (len(names) + 2)]
    for way in ways:
        row = res["followed"][way]
        deg = (res.get("degenerate") or {}).get(way)
        lines.append(f"| {way} | " + " | ".join(f"{100 * row[n]:.0f}%" for n in names) + f" | {100 * res['mean'][way]:.0f}% | "
                     + (f"{100 * deg:.0f}%" if deg is not None else "–") + " |")
    return "\n".join(lines)


def _seed(res: dict) -> int | None:
    return (res.get("bench") or {}).get("seed")


def _same_draw(v: dict, runs: list[tuple[str, dict]]) -> tuple[str, dict] | None:
    """The run of ``v``'s draw of the simulated users (same ``bench.seed``) with the main settings, if there is one."""
    return next(((name, r) for name, r in runs if (_seed(r) or 0) == (_seed(v) or 0)), None)


def variants_md(main: dict, variants: list[tuple[str, dict]], draws: list[dict] = ()) -> str:
    """Each variant beside the run of its own draw with the main settings: what differs is that setting's effect."""
    lines = ["### One setting changed, the same draw", "",
             "The same simulated users (same `bench.seed`) with one setting changed, each beside the run of its own draw. "
             "They still diverge after the first learner run (other answers get other feedback), so a difference is one "
             "sample of that setting's effect."]
    runs = [("main", main)] + [(f"draw {_seed(d)}", d) for d in draws]
    for name, v in variants:
        found = _same_draw(v, runs)
        lines += [""]
        if found is None:
            lines += [f"`{name}` (draw {_seed(v)}): no run of that draw with the main settings "
                      f"(`personalize_seed{_seed(v)}.json`) to set it beside."]
            continue
        label, base = found
        cps = [c for c in (base.get("bench") or {}).get("checkpoints", []) if all(str(c) in p["curve"] for r in (base, v) for p in r["personas"].values())]
        differs = recipe_differences((v.get("generation") or {}).get("chat"), (base.get("generation") or {}).get("chat"))
        differs.update(recipe_differences(v.get("learner_config"), base.get("learner_config")))
        trained, base_trained = ((r.get("dtypes") or {}).get("learner") for r in (v, base))
        if trained and base_trained and trained != base_trained:
            differs["training dtype"] = (trained, base_trained)  # another CPU: bf16 training takes another path
        lines += [f"`{name}` (regenerate with `{v.get('command', 'heed bench personalize')}`), beside {label}: "
                  + (differences_text(differs, ours=label) if differs else "no setting differs") + "."]
        if v.get("note"):
            lines += ["", f"> {v['note']}"]
        last = str(cps[-1]) if cps else None
        lines += ["", "| persona | " + " | ".join(f"@{c} {label} / this" for c in cps) + f" | degenerate @{last} | others' max Δ @{last} |",
                  "|---|" + "---|" * len(cps) + "---|---|"]
        for persona, p in base["personas"].items():
            q = v["personas"].get(persona)
            if q is None:
                continue
            lines.append(f"| {persona} | " + " | ".join(f"{100 * p['curve'][str(c)]:.0f}% / {100 * q['curve'][str(c)]:.0f}%" for c in cps)
                         + f" | {100 * p['degenerate']:.0f}% / {100 * q['degenerate']:.0f}% | {100 * p['others_max_delta']:.0f} / {100 * q['others_max_delta']:.0f} pts |")
        if last:
            shared = [n for n in base["personas"] if n in v["personas"]]
            mean = [sum(r["personas"][n]["curve"][last] for n in shared) / len(shared) for r in (base, v)]
            lines += ["", f"Mean after {last} events: {label} {100 * mean[0]:.0f}%, this {100 * mean[1]:.0f}%. "
                      f"Run time: {label} {base.get('seconds', 0) / 60:.0f} min, this {v.get('seconds', 0) / 60:.0f} min."]
    return "\n".join(lines)


def draws_md(main: dict, draws: list[dict]) -> str:
    """The main run beside runs of the same code with other draws of the simulated users (``bench.seed``)."""
    runs = [main, *draws]
    cps = [c for c in (main.get("bench") or {}).get("checkpoints", []) if all(str(c) in p["curve"] for r in runs for p in r["personas"].values())]
    lines = ["### Other draws of the simulated users", "",
             "The same benchmark with another `bench.seed`: the simulated users ask other prompts, in another order, and "
             "pick other feedback kinds and answers; learner, judges and held-out prompts are the same. How far a persona's "
             "figures move between draws is how far one run can be trusted, and what a recipe change must beat. "
             "Regenerate a draw with `heed bench personalize --bench-config bench/seed1.yaml --out bench/results/personalize_seed1.json`.", ""]
    for d in draws:
        differs = recipe_differences(d.get("learner_config"), main.get("learner_config"))
        if differs:
            lines += [f"Draw {_seed(d)} ran another learner recipe: " + differences_text(differs, ours="main") + ".", ""]
    lines += ["| persona | draw | " + " | ".join(f"after {c}" for c in cps) + f" | degenerate @{cps[-1] if cps else '–'} | learner @{cps[-1] if cps else '–'} |",
              "|---|---|" + "---|" * len(cps) + "---|---|"]
    for name in main["personas"]:
        for r in runs:
            p = r["personas"].get(name)
            if p is None:
                continue
            status = (p.get("learner_status") or {}).get(str(cps[-1])) if cps else None
            lines.append(f"| {name} | {_seed(r)} | " + " | ".join(f"{100 * p['curve'][str(c)]:.0f}%" for c in cps)
                         + f" | {100 * p['degenerate']:.0f}% | {status or '–'} |")
    if cps:
        last = str(cps[-1])
        spread = []
        for name in main["personas"]:
            vals = [r["personas"][name]["curve"][last] for r in runs if name in r["personas"]]
            spread.append(f"{name} {100 * min(vals):.0f}–{100 * max(vals):.0f}%")
        means = [f"draw {_seed(r)} {100 * sum(p['curve'][last] for p in r['personas'].values()) / len(r['personas']):.0f}%" for r in runs]
        lines += ["", f"After {last} events, across draws: " + ", ".join(spread) + ". Mean over personas: " + ", ".join(means)
                  + ". Run times: " + ", ".join(f"draw {_seed(r)} {r.get('seconds', 0) / 60:.0f} min" for r in runs) + "."]
    return "\n".join(lines)


def _kept_acceptance(pers: dict | None, user: str, version: int) -> float | None:
    """Held-out acceptance of the adapter the user kept when ``version`` was refused (from personalize.json)."""
    track = ((pers or {}).get("tracks") or {}).get(user.replace("-", "/"))
    for p in (track or {}).get("points", []):
        if (p.get("learn") or {}).get("version") == version:
            return p["accept"].get(track["persona"])
    return None


def _refusals(pers: dict | None) -> set[tuple[str, int]]:
    return {(t.replace("/", "-"), p["learn"]["version"]) for t, rec in ((pers or {}).get("tracks") or {}).items()
            for p in rec["points"] if (p.get("learn") or {}).get("status") == "rejected"}


def _audits_this_run(rows: list[dict], pers: dict | None) -> bool:
    """Do the audit's refused candidates match the personalize run's refusals one for one?"""
    return bool(pers) and {(r["user"], r["version"]) for r in rows} == _refusals(pers)


def gate_audit_md(audit: dict, pers: dict | None = None, *, draw_seed: str | None = None) -> str:
    """The refused candidates of a kept personalization run, with what the gate could not see: their acceptance."""
    from heed.config import LearnerConfig

    lc = LearnerConfig()
    rows = [r for r in audit["rows"] if r["status"] == "rejected"]
    same_run = _audits_this_run(rows, pers)
    intro = ("Every candidate the gate refused in a kept personalization run, measured afterwards on the same held-out "
             f"prompts ({audit['n_heldout_prompts']}) by its persona's judge (`heed bench gate-audit`). `chosen gain` and "
             "`margin gain` are per-token log-likelihood changes on the user's held-out pairs against the adapter it was judged against. "
             f"Heed's likelihood bound now: {lc.gate_min_logp_gain} nats/token (`learner.gate_min_logp_gain`), which refuses only when "
             f"the margin gain, where held-out pairs give one, is also at most {lc.gate_min_margin_gain} (`learner.gate_min_margin_gain`).")
    # Another draw's audit follows the main one, which explains the columns.
    lines = ["## Gate audit" + (f" of draw {draw_seed}" if draw_seed is not None else ""), "",
             intro if draw_seed is None else f"As in the gate audit above, on {audit['n_heldout_prompts']} held-out prompts.",
             *([] if same_run else ["", "**This audit is of an earlier run than the figures above** (its refusals are not this run's), so the "
                                        "kept adapters' acceptance is left out: rerun `heed bench gate-audit` on a kept run to line them up."]),
             "", "| user | version | refused because | its acceptance | kept adapter's | degenerate | chosen gain | margin gain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = "; ".join(r.get("gate_reasons") or []) or "–"
        acc = f"{100 * r['accept']:.0f}%" if r.get("accept") is not None else "–"
        deg = f"{100 * r['degenerate']:.0f}%" if r.get("degenerate") is not None else "–"
        kept = _kept_acceptance(pers, r["user"], r["version"]) if same_run else None
        kept = f"{100 * kept:.0f}%" if kept is not None else "–"
        lines.append(f"| {r['user']} | {r['version']} | {why} | {acc} | {kept} | {deg} | {r['chosen_gain']} | {r['margin_gain']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench report", description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder with personalize.json, perf.json, load.json")
    p.add_argument("--out", help="the page to write (default: RESULTS/REPORT.md)")
    p.add_argument("--config", help="the Heed config the results came from, named on the page")
    args = p.parse_args(argv)
    folder = Path(args.results)
    out = Path(args.out) if args.out else folder / "REPORT.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(folder, config=args.config), encoding="utf-8")
    print(f"wrote {out}")
    return 0
