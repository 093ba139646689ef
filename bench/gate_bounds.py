"""`heed bench gate-bounds`: what a tighter bound on answers that answer nothing would have refused in a run.

A personalize run records, for every candidate the gate judged, the gate's
shares of degenerate, cut-off and off-topic answers for the candidate, the
active adapter and the base. This replays the gate's own share rule
(``learner.gate.share_refusals``) on them with another
``learner.gate_max_offtopic_increase`` and says which promoted candidates it
would have refused. A refusal at a track's last checkpoint has an exact
counterfactual, the figure the adapter kept there already had at the point
before; an earlier one changes what the user chats with next, so the rest of
that track is unknown until a run with the bound measures it.

    heed bench gate-bounds --run bench/results/personalize.json [--bounds 0.25 0.15 0.1] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

SHARES = ("degenerate", "cutoff", "offtopic")


def _shares(learn: dict, who: str) -> tuple[float, float, float] | None:
    suffix = "" if who == "candidate" else f"_{who}"
    values = [learn.get(f"gate_{s}{suffix}") for s in SHARES]
    return None if any(v is None for v in values) else tuple(values)


def replay(results: dict, bound: float) -> dict:
    """Per track: each judged candidate's decision under ``bound`` and the acceptance curve as far as it is known."""
    from heed.config import LearnerConfig
    from learner.gate import share_refusals

    fields = {k: v for k, v in results.get("learner_config", {}).items() if k in LearnerConfig.__dataclass_fields__}
    config = replace(LearnerConfig(**fields), gate_max_offtopic_increase=bound)
    n = config.gate_answers
    out = {}
    for key, track in results["tracks"].items():
        persona, points = track["persona"], track["points"]
        decisions, diverged_at = [], None
        for i, p in enumerate(points):
            learn = p.get("learn") or {}
            cand, active, base = (_shares(learn, w) for w in ("candidate", "active", "base"))
            if learn.get("status") != "promoted" or cand is None or active is None:
                continue
            reasons = share_refusals(candidate=cand, active=active, base=base, n=n, why=[], config=config)
            if reasons and diverged_at is None:
                diverged_at = i
            decisions.append({"events": p["events"], "refused": bool(reasons), "reasons": reasons,
                              "nothing": {w: round(s[0] + s[2], 3) for w, s in (("candidate", cand), ("active", active), ("base", base)) if s}})
        last = points[-1]
        # Up to the first refusal the user's path is the run's; there the adapter kept is the one measured before.
        curve = {}
        for i, pt in enumerate(points):
            if diverged_at is None or i < diverged_at:
                curve[str(pt["events"])] = pt["accept"][persona]
            elif i == diverged_at:
                curve[str(pt["events"])] = points[i - 1]["accept"][persona]
        row = {"decisions": decisions, "last_events": last["events"], "accept_last": last["accept"][persona],
               "curve_with_bound": curve, "accept_last_with_bound": curve.get(str(last["events"]))}
        if diverged_at is not None and diverged_at < len(points) - 1:
            row["unknown_after"] = points[diverged_at]["events"]
        out[key] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench gate-bounds", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a personalize result JSON whose learner runs recorded the gate's shares")
    p.add_argument("--bounds", type=float, nargs="+", default=[0.25, 0.2, 0.15, 0.1], help="values of learner.gate_max_offtopic_increase")
    p.add_argument("--out", help="result JSON (default: beside --run; personalize_seed1.json -> gate_bounds_seed1.json)")
    args = p.parse_args(argv)
    run = Path(args.run)
    results = json.loads(run.read_text())
    if not any(_shares(pt.get("learn") or {}, "active") for t in results["tracks"].values() for pt in t["points"]):
        raise SystemExit(f"{run}: its learner runs did not record the gate's shares (a run before 2026-12-07 16:00); rerun it")
    own = results.get("learner_config", {}).get("gate_max_offtopic_increase")
    looser = [b for b in args.bounds if own is not None and b > own]
    if looser:
        # A looser bound could have promoted what the run refused, whose later path no run measured.
        raise SystemExit(f"{run} ran with gate_max_offtopic_increase {own}: only bounds up to it replay, not {looser}")
    report = {"run": str(run), "bounds": {}}
    for bound in args.bounds:
        tracks = replay(results, bound)
        report["bounds"][str(bound)] = tracks
        cells = []
        for key, row in tracks.items():
            curve = " / ".join(f"{v:.0%}" for v in row["curve_with_bound"].values())
            cells.append(f"{key.split('/')[0]} {curve}" + (" (then unknown)" if "unknown_after" in row else ""))
        print(f"bound {bound:.2f}: " + ", ".join(cells))
    # personalize_seed1.json -> gate_bounds_seed1.json: not personalize_*, which the report reads as runs.
    out = Path(args.out) if args.out else run.with_name(f"gate_bounds{run.stem.removeprefix('personalize')}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
