"""`heed bench personalize`: simulated users teach their own adapters through the service.

For each persona, one user chats about train prompts and gives feedback with
every kind in its mix (the 'all' track); after 4, 8, 16, 32 events the learner
runs (``Heed.learn``, continuing the same adapter, gate included) and the
user's held-out acceptance is measured on prompts it never chatted about. A
few personas also learn from one kind alone. Results: personalize.json,
personalize.md and PNG plots beside it, and every held-out answer judged
(personalize_answers.jsonl: why one was refused, not only how many).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench.personas import Persona, get, on_topic
from bench.prompts import split
from bench.settings import FULL, QUICK, BenchConfig, load_bench_config
from bench.summary import fmt, summarize, targets
from heed.quality import degeneration, templated

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


def heed_config(config_path: str | None, *, quick: bool, bench: BenchConfig, data_dir: str | None, kept: bool = False):
    """The Heed config the benchmark runs: the file's, in a scratch data dir, with the bench's overrides.

    The model resolves through the file's own data dir (the shared converted
    model) unless ``data_dir`` is given, then everything lives there. ``kept``:
    ``data_dir`` must hold a kept run, checked before a model is converted into it.
    """
    from heed.config import load_config
    from heed.models import resolve_model

    path = config_path or ("configs/tiny.yaml" if quick else "configs/default.yaml")
    if kept and not data_dir:
        raise ValueError("kept=True needs the kept run's data_dir")
    first = load_config(path, overrides={"data_dir": data_dir} if data_dir else None)
    if kept:
        db = load_config(path, overrides={"data_dir": str(Path(data_dir).expanduser() / "run")}).db_path
        if not db.is_file():
            raise SystemExit(f"no kept run in {data_dir} (expected {db}): pass the folder given to `heed bench personalize --data-dir`")
    model_path = resolve_model(first)
    work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="heed-bench-"))
    return load_config(path, overrides={
        "data_dir": str(work / "run"),
        "model": {"name_or_path": str(model_path)},
        "generation": dict(bench.generation),
        "learner": dict(bench.learner),
    }), path


def _eval_rows(heed, user_id: int, prompts: list[str]) -> tuple[list, list]:
    """The chats and the adapter this user would get now in a new session (what the service would serve)."""
    conv = heed.start_conversation(user_id, title="held-out check")
    ref = heed.adapter_for(user_id, conv)
    system = {"role": "system", "content": heed.system_prompt(user_id)}
    heed.delete_conversation(user_id, conv)
    return [[system, {"role": "user", "content": p}] for p in prompts], [ref] * len(prompts)


def evaluate_many(heed, user_ids: list[int], prompts: list[str], bench: BenchConfig) -> list[list[tuple[str, bool]]]:
    """Every user's held-out answers, greedy, generated together (rows with different adapters share batches)."""
    chats, refs = [], []
    for uid in user_ids:
        c, r = _eval_rows(heed, uid, prompts)
        chats += c
        refs += r
    gen = replace(heed.config.generation, do_sample=False)
    # One call: with continuous batching a row that ends hands its slot to the next (eval_batch rows at a time).
    out = heed.engine.generate_batch(chats, adapters=refs, max_new_tokens=bench.eval_max_new_tokens, gen=gen,
                                     with_finish=True, batch=bench.eval_batch)
    n = len(prompts)
    return [out[k * n:(k + 1) * n] for k in range(len(user_ids))]


def evaluate(heed, user_id: int, prompts: list[str], bench: BenchConfig) -> list[tuple[str, bool]]:
    """One user's held-out answers in a new session: (text, finished)."""
    return evaluate_many(heed, [user_id], prompts, bench)[0]


def judge(answers: list[tuple[str, bool]], prompts: list[str], judges: dict[str, Persona]) -> dict:
    """Acceptance by every judge (its style, a sensible answer, on the question's topic), and degeneration."""
    reasons = [degeneration(t, prompt=p, finished=f) for (t, f), p in zip(answers, prompts)]
    n = max(len(answers), 1)
    accept = {name: sum(per.accepts(t, prompt=p, finished=f) for (t, f), p in zip(answers, prompts)) / n for name, per in judges.items()}
    style = {name: sum(per.judge(t) for t, _ in answers) / n for name, per in judges.items()}
    return {
        "accept": accept,
        "style_only": style,
        "degenerate": sum(r is not None for r in reasons) / n,
        "degenerate_reasons": dict(collections.Counter(r for r in reasons if r)),
        "off_topic": sum(not on_topic(t, p) for (t, _), p in zip(answers, prompts)) / n,
        # Published beside acceptance, not part of it (the judges' check is unchanged across runs): sound answers
        # that are mostly one template said to every question (heed.quality.templated).
        "templated": sum(same and r is None for same, r in zip(templated([t for t, _ in answers]), reasons)) / n,
        "mean_words": sum(len(t.split()) for t, _ in answers) / n,
        "samples": [t[:400] for t, _ in answers[:3]],
    }


def answer_records(track: str, checkpoint: int, events: int, answers: list[tuple[str, bool]], prompts: list[str],
                   persona: Persona | None) -> list[dict]:
    """One record per held-out answer: what was asked and answered, and each part of the verdict."""
    out = []
    for (text, finished), prompt in zip(answers, prompts):
        rec = {"track": track, "checkpoint": checkpoint, "events": events, "prompt": prompt, "answer": text, "finished": finished,
               "degenerate": degeneration(text, prompt=prompt, finished=finished), "on_topic": on_topic(text, prompt)}
        if persona is not None:
            rec.update(style=persona.judge(text), accepted=persona.accepts(text, prompt=prompt, finished=finished))
        out.append(rec)
    return out


def _learn(heed, uid: int) -> dict:
    t = time.perf_counter()
    r = heed.learn(uid, trigger="bench")
    gate = r.get("gate") or {}
    return {"status": r["status"], "version": r.get("version"), "seconds": round(time.perf_counter() - t, 1),
            "reasons": r.get("reasons") or ([r["reason"]] if r.get("reason") else []) + ([r["error"]] if r.get("error") else []),
            "n_train_new": r.get("n_train_new"), "n_carried": r.get("n_carried"), "n_replay": r.get("n_replay"), "n_heldout": r.get("n_heldout"),
            "reward_accuracy": gate.get("implicit_reward_accuracy"), "gate_degenerate": gate.get("degenerate_candidate"),
            "gate_kl": gate.get("kl_from_base"), "gate_cutoff": gate.get("cutoff_candidate"),
            "gate_cutoff_active": gate.get("cutoff_active"), "gate_cutoff_base": gate.get("cutoff_base"),
            # The gate's own shares against the ones it compares with (its off-topic bound adds the degenerate answers
            # to the sound ones off the question's topic): beside the held-out figures, what its questions missed.
            **{f"gate_{share}{s}": gate.get(f"{share}_{w}") for share in ("degenerate", "offtopic", "templated")
               for s, w in (("_active", "active"), ("_base", "base"))},
            "gate_offtopic": gate.get("offtopic_candidate"), "gate_templated": gate.get("templated_candidate"),
            "rows": r.get("rows"),
            "attempts": [{k: a.get(k) for k in ("step", "promote", "reasons")} for a in r.get("attempts") or []]}


class Track:
    """One simulated user learning through a list of checkpoints."""

    def __init__(self, sim, persona: str, kind: str, checkpoints: list[int]) -> None:
        self.sim, self.persona, self.kind, self.checkpoints = sim, persona, kind, list(checkpoints)
        self.key = f"{persona}/{kind}"
        self.stopped: str | None = None


class Run:
    """One benchmark run: a service on a scratch store, the simulated users, the results so far.

    Checkpoints are rounds: every user due at a checkpoint chats and gives
    feedback at the same time (the engine batches their replies, as it would
    for people), then each user's learner run goes one after another, then all
    their held-out answers are generated together.
    """

    def __init__(self, heed, bench: BenchConfig, *, out: Path, say=print, seats: list[str] | None = None) -> None:
        self.heed, self.bench, self.out, self.say = heed, bench, out, say
        self.seats = list(FULL.personas if seats is None else seats)
        self.train, self.heldout = split(heldout_every=bench.heldout_every)
        if bench.max_heldout:
            self.heldout = self.heldout[:bench.max_heldout]
        names = list(dict.fromkeys([*bench.personas, *bench.kind_personas]))
        self.judges = {n: get(n) for n in names}
        self.t0 = time.perf_counter()
        self.results: dict = {"model": heed.config.model.name_or_path, "bench": bench.to_dict(), "personas": {}, "tracks": {},
                              "rounds": [], "n_train_prompts": len(self.train), "n_heldout_prompts": len(self.heldout)}

    @property
    def answers_path(self) -> Path:
        return self.out.with_name(self.out.stem + "_answers.jsonl")

    def log_answers(self, records: list[dict], *, fresh: bool = False) -> None:
        # Beside the partial results until the run finishes, like them: a killed run leaves the last full log.
        partial = self.answers_path.with_suffix(".partial.jsonl")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w" if fresh else "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    @property
    def partial(self) -> Path:
        """Where a run in progress keeps its figures so far: a killed run leaves the last finished result in place."""
        return self.out.with_name(self.out.stem + ".partial.json")

    def save(self, *, final: bool = False) -> None:
        self.results["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.results["finished"] = final
        target = self.out if final else self.partial
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(target)
        if final:
            self.partial.unlink(missing_ok=True)
            answers = self.answers_path.with_suffix(".partial.jsonl")
            if answers.exists():
                answers.replace(self.answers_path)

    def base(self) -> None:
        self.observer = self.heed.add_user("observer", secrets.token_urlsafe(12))
        t = time.perf_counter()
        self.base_answers = evaluate(self.heed, self.observer, self.heldout, self.bench)
        m = judge(self.base_answers, self.heldout, self.judges)
        m["eval_seconds"] = round(time.perf_counter() - t, 1)
        self.results["base"] = m
        self.log_answers(answer_records("base", 0, 0, self.base_answers, self.heldout, None), fresh=True)
        self.say(f"base: {fmt(m['accept'])}  degenerate {m['degenerate']:.0%}  ({m['eval_seconds']}s)")
        self.save()

    def tracks(self) -> list[Track]:
        from bench.simulate import SimulatedUser

        b = self.bench
        specs = [(n, "all", b.checkpoints) for n in self._seated(b.personas)] + [
            (n, k, b.kind_checkpoints) for n in b.kind_personas for k in b.kind_tracks]
        out = []
        for name, kind, cps in specs:
            if name not in b.personas:
                self.heed.add_user(f"{name}-all-seat", secrets.token_urlsafe(12))
                continue
            sim = SimulatedUser(self.heed, get(name), track=kind, prompts=self.train, seed=b.seed, chats_per_event=b.chats_per_event)
            tr = Track(sim, name, kind, cps)
            self.results["tracks"][tr.key] = {"persona": name, "kind": kind, "checkpoints": cps,
                                              "points": [{"events": 0, **{k: v for k, v in self.results["base"].items() if k != "samples"}}]}
            out.append(tr)
        return out

    def _seated(self, personas: list[str]) -> list[str]:
        """The 'all' tracks in the order of the full run, left-out personas included up to the last one here.

        A user's id seeds its regenerated answers and its train/held-out split, so a
        persona run alone (or with a few others) must get the id it has in the full
        run to take the same path: a left-out persona before it still gets a user,
        who never chats.
        """
        seated = [n for n in self.seats if n in personas]
        if not seated:
            return list(personas)
        last = self.seats.index(seated[-1])
        return self.seats[:last + 1] + [n for n in personas if n not in self.seats]

    def _concurrently(self, fns) -> None:
        errors: list[BaseException] = []

        def go(fn):
            try:
                fn()
            except BaseException as exc:  # re-raised below in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(fn,)) for fn in fns]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]

    def round(self, cp: int, tracks: list[Track]) -> None:
        due = [t for t in tracks if cp in t.checkpoints and not t.stopped]
        if not due:
            return
        rec: dict = {"checkpoint": cp, "users": [t.key for t in due]}
        t0 = time.perf_counter()
        self._concurrently([lambda t=t: t.sim.give_feedback(cp - t.sim.log.total) for t in due])
        rec["chat_seconds"] = round(time.perf_counter() - t0, 1)
        learned = {t.key: _learn(self.heed, t.sim.user_id) for t in due}
        rec["learn_seconds"] = round(sum(v["seconds"] for v in learned.values()), 1)
        t1 = time.perf_counter()
        answers = evaluate_many(self.heed, [t.sim.user_id for t in due], self.heldout, self.bench)
        rec["eval_seconds"] = round(time.perf_counter() - t1, 1)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.results["rounds"].append(rec)
        for t, ans in zip(due, answers):
            m = judge(ans, self.heldout, self.judges)
            log_ = t.sim.log
            self.log_answers(answer_records(t.key, cp, log_.total, ans, self.heldout, self.judges[t.persona]))
            self.results["tracks"][t.key]["points"].append(
                {"events": log_.total, "checkpoint": cp, "events_by_kind": dict(log_.events), "chats": log_.chats,
                 "learn": learned[t.key], **m})
            self.say(f"{t.key} @{log_.total}: own {m['accept'][t.persona]:.0%}  degenerate {m['degenerate']:.0%}  "
                     f"learn {learned[t.key]['status']} {learned[t.key]['seconds']}s  [{fmt(m['accept'])}]  "
                     f"{'; '.join(learned[t.key]['reasons'])[:160]}")
        self.say(f"round @{cp}: {len(due)} users, chat {rec['chat_seconds']}s, learn {rec['learn_seconds']}s, eval {rec['eval_seconds']}s")
        self.save()

    def over_budget(self, cps_left: list[int], tracks: list[Track]) -> str | None:
        """Why the rest would overrun the time budget (None: it fits), from the rounds so far."""
        rounds = self.results["rounds"]
        if not rounds:
            return None
        users = sum(len(r["users"]) for r in rounds)
        per_user = sum(r["seconds"] for r in rounds) / users
        need = per_user * sum(1 for cp in cps_left for t in tracks if cp in t.checkpoints and not t.stopped)
        elapsed = time.perf_counter() - self.t0
        if elapsed + need > 60 * self.bench.time_budget_minutes:
            return f"{elapsed / 60:.0f} min spent, about {need / 60:.0f} more needed, budget {self.bench.time_budget_minutes:g} min"
        return None

    def learn_all(self) -> None:
        tracks = self.tracks()
        cps = sorted({cp for t in tracks for cp in t.checkpoints})
        for i, cp in enumerate(cps):
            why = self.over_budget(cps[i:], tracks)
            if why:
                for t in tracks:
                    if t.kind != "all" and not t.stopped:
                        t.stopped = f"stopped before {cp} events: {why}"
                        self.results.setdefault("skipped", {})[t.key] = t.stopped
                        self.say(f"{t.key}: {t.stopped}")
            self.round(cp, tracks)
        for t in tracks:
            rec = self.results["tracks"][t.key]
            rec.update(chats=t.sim.log.chats, picks_tied=t.sim.log.picks_tied, edits_refused=t.sim.log.edits_refused,
                       corrections_followed_in_session=[c["followed"] for c in t.sim.log.corrections])
        if self.bench.interactivity_prompts:
            alls = [t for t in tracks if t.kind == "all"]
            again: dict = {}
            self._concurrently([lambda t=t: again.__setitem__(t.key, t.sim.ask_again(self.bench.interactivity_prompts)) for t in alls])
            for key, v in again.items():
                self.results["tracks"][key]["ask_again"] = v
        self.save()

    def observer_check(self) -> dict:
        """The user who gave no feedback gets byte-identical answers after everyone else learned."""
        again = evaluate(self.heed, self.observer, self.heldout, self.bench)
        same = sum(a == b for a, b in zip(again, self.base_answers))
        return {"prompts": len(again), "identical": same, "all_identical": same == len(again)}


def run(config_path: str | None, *, quick: bool, out: Path, bench: BenchConfig, data_dir: str | None = None,
        keep: bool = False, command: str = "", say=print) -> dict:
    from heed.hardware import learner_config, pick_device_dtype
    from heed.service import Heed

    config, used = heed_config(config_path, quick=quick, bench=bench, data_dir=data_dir)
    say(f"config {used}; model {config.model.name_or_path}; data {config.data_dir}")
    try:
        heed = Heed(config)
        r = Run(heed, bench, out=out, say=say, seats=(QUICK if quick else FULL).personas)
        r.results["config_file"] = used
        if command:
            r.results["command"] = command  # else the report guesses it from the config file
        r.results["model"] = Path(config.model.name_or_path).name
        r.results["generation"] = {"chat": config.generation.__dict__, "eval_max_new_tokens": bench.eval_max_new_tokens}
        r.results["learner_config"] = config.learner.__dict__
        r.results["dtypes"] = {"serving": str(pick_device_dtype(config.model)[1]).removeprefix("torch."),
                               "learner": str(pick_device_dtype(learner_config(config).model)[1]).removeprefix("torch.")}
        r.base()
        r.learn_all()
        r.results["observer"] = r.observer_check()
        r.results.update(summarize(r.results, bench))
        r.results["seconds"] = round(time.perf_counter() - r.t0, 1)
        r.results["targets"] = targets(r.results, r.results, bench)
        r.save(final=True)
        from bench.report import write_personalize

        write_personalize(r.results, out)
        return r.results
    finally:
        if not keep and not data_dir:
            shutil.rmtree(Path(config.data_dir).parent, ignore_errors=True)


def _shaping(argv: list[str]) -> list[str]:
    """The options that shape the results, for the report's "regenerate with": not where scratch files were kept."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--data-dir":
            skip = True
        elif a != "--keep" and not a.startswith("--data-dir="):
            out.append(a)
    return out


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
    res = run(args.config, quick=args.quick, out=out, bench=bench, data_dir=args.data_dir, keep=args.keep,
              command=shlex.join(["heed", "bench", "personalize", *_shaping(argv if argv is not None else sys.argv[1:])]))
    print(f"wrote {out} ({res['seconds'] / 60:.1f} min)")
    return 0
