"""`heed bench personalize`: simulated users teach their own adapters through the service.

For each persona, one user chats about train prompts and gives feedback with
every kind in its mix (the 'all' track); after 4, 8, 16, 32 events the learner
runs (``Heed.learn``, continuing the same adapter, gate included) and the
user's held-out acceptance is measured on prompts it never chatted about. A
few personas also learn from one kind alone. Results: personalize.json,
personalize.md and PNG plots beside it.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import secrets
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.personas import Persona, get
from bench.prompts import split
from bench.settings import BenchConfig, load_bench_config
from heed.quality import degeneration

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


def heed_config(config_path: str | None, *, quick: bool, bench: BenchConfig, data_dir: str | None):
    """The Heed config the benchmark runs: the file's, in a scratch data dir, with the bench's overrides.

    The model resolves through the file's own data dir (the shared converted
    model) unless ``data_dir`` is given, then everything lives there.
    """
    from heed.config import load_config
    from heed.models import resolve_model

    path = config_path or ("configs/tiny.yaml" if quick else "configs/default.yaml")
    first = load_config(path, overrides={"data_dir": data_dir} if data_dir else None)
    model_path = resolve_model(first)
    work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="heed-bench-"))
    return load_config(path, overrides={
        "data_dir": str(work / "run"),
        "model": {"name_or_path": str(model_path)},
        "generation": dict(bench.generation),
        "learner": dict(bench.learner),
    }), path


def evaluate(heed, user_id: int, prompts: list[str], bench: BenchConfig) -> list[tuple[str, bool]]:
    """The answers this user would get now in a new session, greedy, batched: (text, finished)."""
    conv = heed.start_conversation(user_id, title="held-out check")
    ref = heed.adapter_for(user_id, conv)
    system = {"role": "system", "content": heed.system_prompt(user_id)}
    gen = replace(heed.config.generation, do_sample=False)
    out: list[tuple[str, bool]] = []
    for i in range(0, len(prompts), bench.eval_batch):
        chunk = prompts[i:i + bench.eval_batch]
        out += heed.engine.generate_batch([[system, {"role": "user", "content": p}] for p in chunk], adapters=[ref] * len(chunk),
                                          max_new_tokens=bench.eval_max_new_tokens, gen=gen, with_finish=True)
    heed.delete_conversation(user_id, conv)
    return out


def judge(answers: list[tuple[str, bool]], prompts: list[str], judges: dict[str, Persona]) -> dict:
    """Acceptance by every judge (accepted = judge says yes AND the answer is sensible), and degeneration."""
    reasons = [degeneration(t, prompt=p, finished=f) for (t, f), p in zip(answers, prompts)]
    n = max(len(answers), 1)
    accept = {name: sum(per.judge(t) and r is None for (t, _), r in zip(answers, reasons)) / n for name, per in judges.items()}
    style = {name: sum(per.judge(t) for t, _ in answers) / n for name, per in judges.items()}
    return {
        "accept": accept,
        "style_only": style,
        "degenerate": sum(r is not None for r in reasons) / n,
        "degenerate_reasons": dict(collections.Counter(r for r in reasons if r)),
        "mean_words": sum(len(t.split()) for t, _ in answers) / n,
        "samples": [t[:400] for t, _ in answers[:3]],
    }


def _learn(heed, uid: int) -> dict:
    t = time.perf_counter()
    r = heed.learn(uid, trigger="bench")
    gate = r.get("gate") or {}
    return {"status": r["status"], "version": r.get("version"), "seconds": round(time.perf_counter() - t, 1),
            "reasons": r.get("reasons") or ([r["reason"]] if r.get("reason") else []) + ([r["error"]] if r.get("error") else []),
            "n_train_new": r.get("n_train_new"), "n_replay": r.get("n_replay"), "n_heldout": r.get("n_heldout"),
            "reward_accuracy": gate.get("implicit_reward_accuracy"), "gate_degenerate": gate.get("degenerate_candidate"),
            "gate_kl": gate.get("kl_from_base")}


class Run:
    """One benchmark run: a service on a scratch store, the judges, the held-out prompts, the results so far."""

    def __init__(self, heed, bench: BenchConfig, *, out: Path, say=print) -> None:
        self.heed, self.bench, self.out, self.say = heed, bench, out, say
        self.train, self.heldout = split(heldout_every=bench.heldout_every)
        if bench.max_heldout:
            self.heldout = self.heldout[:bench.max_heldout]
        names = list(dict.fromkeys([*bench.personas, *bench.kind_personas]))
        self.judges = {n: get(n) for n in names}
        self.t0 = time.perf_counter()
        self.results: dict = {"model": heed.config.model.name_or_path, "bench": bench.to_dict(), "personas": {}, "tracks": {},
                              "n_train_prompts": len(self.train), "n_heldout_prompts": len(self.heldout)}

    def save(self) -> None:
        self.results["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out)

    def measure(self, uid: int) -> tuple[dict, list]:
        t = time.perf_counter()
        answers = evaluate(self.heed, uid, self.heldout, self.bench)
        m = judge(answers, self.heldout, self.judges)
        m["eval_seconds"] = round(time.perf_counter() - t, 1)
        return m, answers

    def base(self) -> None:
        self.observer = self.heed.add_user("observer", secrets.token_urlsafe(12))
        m, answers = self.measure(self.observer)
        self.base_answers = answers
        self.results["base"] = m
        self.say(f"base: {fmt(m['accept'])}  degenerate {m['degenerate']:.0%}  ({m['eval_seconds']}s)")
        self.save()

    def track(self, persona: str, kind: str, checkpoints: list[int]) -> dict:
        from bench.simulate import SimulatedUser

        sim = SimulatedUser(self.heed, get(persona), track=kind, prompts=self.train, seed=self.bench.seed,
                            chats_per_event=self.bench.chats_per_event)
        points = [{"events": 0, **{k: v for k, v in self.results["base"].items() if k != "samples"}}]
        rec = {"persona": persona, "kind": kind, "points": points}
        self.results["tracks"][f"{persona}/{kind}"] = rec
        for cp in checkpoints:
            t = time.perf_counter()
            sim.give_feedback(cp - sim.log.total)
            chat_s = time.perf_counter() - t
            learned = _learn(self.heed, sim.user_id)
            m, _ = self.measure(sim.user_id)
            points.append({"events": sim.log.total, "checkpoint": cp, "events_by_kind": dict(sim.log.events),
                           "chat_seconds": round(chat_s, 1), "learn": learned, **m})
            self.say(f"{persona}/{kind} @{sim.log.total}: own {m['accept'][persona]:.0%}  degenerate {m['degenerate']:.0%}  "
                     f"learn {learned['status']} {learned['seconds']}s  chat {chat_s:.0f}s  eval {m['eval_seconds']}s  "
                     f"[{fmt(m['accept'])}]  {'; '.join(learned['reasons'])[:160]}")
            self.save()
        rec["chats"] = sim.log.chats
        rec["picks_tied"] = sim.log.picks_tied
        rec["corrections_followed_in_session"] = [c["followed"] for c in sim.log.corrections]
        if kind == "all" and self.bench.interactivity_prompts:
            rec["ask_again"] = sim.ask_again(self.bench.interactivity_prompts)
        self.save()
        return rec

    def over_budget(self, checkpoints: int) -> str | None:
        """Why a track of ``checkpoints`` checkpoints would overrun the time budget (None: it fits)."""
        pts = [p for rec in self.results["tracks"].values() for p in rec["points"][1:]]
        if not pts:
            return None
        per = sum(p["chat_seconds"] + p["learn"]["seconds"] + p["eval_seconds"] for p in pts) / len(pts)
        elapsed = time.perf_counter() - self.t0
        if elapsed + per * checkpoints > 60 * self.bench.time_budget_minutes:
            return f"{elapsed / 60:.0f} min spent, about {per * checkpoints / 60:.0f} more needed, budget {self.bench.time_budget_minutes:g} min"
        return None

    def observer_check(self) -> dict:
        """The user who gave no feedback gets byte-identical answers after everyone else learned."""
        k = min(self.bench.eval_batch, len(self.heldout))
        again = evaluate(self.heed, self.observer, self.heldout[:k], self.bench)
        same = sum(a == b for a, b in zip(again, self.base_answers[:k]))
        return {"prompts": k, "identical": same, "all_identical": same == k}


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


def run(config_path: str | None, *, quick: bool, out: Path, bench: BenchConfig, data_dir: str | None = None,
        keep: bool = False, say=print) -> dict:
    from heed.service import Heed

    config, used = heed_config(config_path, quick=quick, bench=bench, data_dir=data_dir)
    say(f"config {used}; model {config.model.name_or_path}; data {config.data_dir}")
    try:
        heed = Heed(config)
        r = Run(heed, bench, out=out, say=say)
        r.results["config_file"] = used
        r.results["model"] = Path(config.model.name_or_path).name
        r.results["generation"] = {"chat": config.generation.__dict__, "eval_max_new_tokens": bench.eval_max_new_tokens}
        r.results["learner_config"] = config.learner.__dict__
        r.base()
        for name in bench.personas:
            r.track(name, "all", bench.checkpoints)
        for name in bench.kind_personas:
            for kind in bench.kind_tracks:
                why = r.over_budget(len(bench.kind_checkpoints))
                if why:
                    r.results.setdefault("skipped", {})[f"{name}/{kind}"] = why
                    say(f"skipping {name}/{kind}: {why}")
                    continue
                r.track(name, kind, bench.kind_checkpoints)
        r.results["observer"] = r.observer_check()
        r.results.update(summarize(r.results, bench))
        r.save()
        r.results["targets"] = targets(r.results, r.results, bench)
        r.save()
        from bench.report import write_personalize

        write_personalize(r.results, out)
        return r.results
    finally:
        if not keep and not data_dir:
            shutil.rmtree(Path(config.data_dir).parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench personalize", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny offline model and trivially learnable personas (minutes)")
    p.add_argument("--config", help="Heed YAML config (default: configs/default.yaml, or configs/tiny.yaml with --quick)")
    p.add_argument("--bench-config", help="YAML overriding the benchmark's own settings (bench/settings.py)")
    p.add_argument("--out", help="result JSON (default: bench/results/personalize.json; quick: bench/results/quick/...)")
    p.add_argument("--data-dir", help="keep the run's store, adapters and model here instead of a temp dir")
    p.add_argument("--keep", action="store_true", help="keep the temp data dir")
    args = p.parse_args(argv)
    bench = load_bench_config(args.bench_config, quick=args.quick)
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "") / "personalize.json"
    res = run(args.config, quick=args.quick, out=out, bench=bench, data_dir=args.data_dir, keep=args.keep)
    print(f"wrote {out} ({res['seconds'] / 60:.1f} min)")
    return 0
