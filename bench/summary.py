"""The personalization results other tools read: per persona base, curve, degenerate, others_max_delta,
plus the targets of issue 5 judged on them."""
from __future__ import annotations

from bench.settings import BenchConfig


def fmt(rates: dict) -> str:
    return " ".join(f"{k} {v:.0%}" for k, v in rates.items())


def summarize(results: dict, bench: BenchConfig) -> dict:
    """The keys other tools read: per persona base, curve, degenerate, others_max_delta (+ extras)."""
    base = results["base"]["accept"]
    personas = {}
    for name in bench.personas:
        rec = results["tracks"].get(f"{name}/all")
        if not rec:
            continue
        pts = {p["events"] if p["events"] == 0 else p["checkpoint"]: p for p in rec["points"]}
        at = pts.get(bench.target_events) or pts[max(pts)]
        final = pts[max(pts)]
        others = {o: at["accept"][o] - base[o] for o in bench.personas if o != name and o in at["accept"]}
        followed = rec.get("corrections_followed_in_session") or []
        again = rec.get("ask_again") or []
        best_le_target = max((p["accept"][name] for e, p in pts.items() if e <= bench.target_events), default=None)
        personas[name] = {
            "base": base[name],
            "curve": {str(e): p["accept"][name] for e, p in sorted(pts.items())},
            "degenerate": at["degenerate"],
            # Sound answers that are one template said to every question (None in runs recorded before it was measured).
            "templated": at.get("templated"),
            "others_max_delta": max((abs(v) for v in others.values()), default=0.0),
            "others_delta": others,
            "at_events": at.get("checkpoint", 0),
            "final": {"events": final.get("events"), "accept": final["accept"][name], "degenerate": final["degenerate"]},
            "best_at_or_below_target": best_le_target,
            "degenerate_curve": {str(e): p["degenerate"] for e, p in sorted(pts.items())},
            "reward_accuracy": {str(e): p["learn"]["reward_accuracy"] for e, p in sorted(pts.items()) if e},
            "learner_seconds": {str(e): p["learn"]["seconds"] for e, p in sorted(pts.items()) if e},
            "learner_status": {str(e): p["learn"]["status"] for e, p in sorted(pts.items()) if e},
            "events_by_kind": final.get("events_by_kind"),
            "interactivity": {
                "in_session_followed": sum(followed) / len(followed) if followed else None,
                "in_session_n": len(followed),
                "next_session_followed": sum(a["followed_next_session"] for a in again) / len(again) if again else None,
                "next_session_n": len(again),
            },
        }
    kinds: dict = {}
    for key, rec in results["tracks"].items():
        name, kind = key.split("/")
        if name in bench.kind_personas:
            kinds.setdefault(name, {})[kind] = {str(p.get("checkpoint", 0)): p["accept"][name] for p in rec["points"]}
    matrix = {}
    for name in bench.personas:
        rec = results["tracks"].get(f"{name}/all")
        if rec:
            pts = {p.get("checkpoint", 0): p for p in rec["points"]}
            at = pts.get(bench.target_events) or pts[max(pts)]
            matrix[name] = at["accept"]
    return {"personas": personas, "kinds": kinds, "isolation_matrix": {"adapter_of": matrix, "base": base, "at_events": bench.target_events}}


def targets(summary: dict, results: dict, bench: BenchConfig) -> dict:
    learn_16 = [p["learn"]["seconds"] for rec in results["tracks"].values() for p in rec["points"]
                if p.get("checkpoint") and p["events"] - _prev_events(rec, p) >= 8]
    per = {n: {"acceptance_ge_90": (v["best_at_or_below_target"] or 0) >= 0.9, "degenerate_le_5": v["degenerate"] <= 0.05,
               "others_within_5": v["others_max_delta"] <= 0.05} for n, v in summary["personas"].items()}
    return {"per_persona": per, "learner_run_max_seconds_8plus_new_events": max(learn_16, default=None),
            "full_run_minutes": round(results.get("seconds", 0) / 60, 1)}


def _prev_events(rec: dict, point: dict) -> int:
    pts = rec["points"]
    i = pts.index(point)
    return pts[i - 1]["events"] if i else 0
