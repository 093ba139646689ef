"""`heed bench report`: the latest result files rendered into one page, REPORT.md, with the plots."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import load, perf_md, personalize_md, recipe_differences, write_personalize

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
    audit = load(results_dir / "gate_audit.json")
    if audit:
        parts += ["", gate_audit_md(audit, pers)]
    perf = load(results_dir / "perf.json")
    parts += ["", perf_md(perf).replace("# Performance", "## Performance", 1) if perf else "## Performance\n\nNo results yet: run `heed bench perf`."]
    loadres = load(results_dir / "load.json")
    if loadres:
        parts += ["", "## Load", "", "| figure | value |", "|---|---|"]
        parts += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in loadres.items()]
    return "\n".join(parts) + "\n"


def _kept_acceptance(pers: dict | None, user: str, version: int) -> float | None:
    """Held-out acceptance of the adapter the user kept when ``version`` was refused (from personalize.json)."""
    track = ((pers or {}).get("tracks") or {}).get(user.replace("-", "/"))
    for p in (track or {}).get("points", []):
        if (p.get("learn") or {}).get("version") == version:
            return p["accept"].get(track["persona"])
    return None


def gate_audit_md(audit: dict, pers: dict | None = None) -> str:
    """The refused candidates of a kept personalization run, with what the gate could not see: their acceptance."""
    from heed.config import LearnerConfig

    rows = [r for r in audit["rows"] if r["status"] == "rejected"]
    lines = ["## Gate audit", "",
             "Every candidate the gate refused in a kept personalization run, measured afterwards on the same held-out "
             f"prompts ({audit['n_heldout_prompts']}) by its persona's judge (`heed bench gate-audit`). `chosen gain` and "
             "`margin gain` are per-token log-likelihood changes on the user's held-out pairs against the adapter it was judged against. "
             f"Heed's likelihood bound now: {LearnerConfig().gate_min_logp_gain} nats/token (`learner.gate_min_logp_gain`).",
             "", "| user | version | refused because | its acceptance | kept adapter's | degenerate | chosen gain | margin gain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = "; ".join(r.get("gate_reasons") or []) or "–"
        acc = f"{100 * r['accept']:.0f}%" if r.get("accept") is not None else "–"
        deg = f"{100 * r['degenerate']:.0f}%" if r.get("degenerate") is not None else "–"
        kept = _kept_acceptance(pers, r["user"], r["version"])
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
