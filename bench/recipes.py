"""`heed bench recipes`: compare learner recipes on one fixed set of feedback, offline.

``collect`` has every persona chat with the base model and give N feedback
events through the service (no learning), once. ``train`` then builds each
persona's examples from those events (the learner's own ``build_examples``,
held-out split included), trains one fresh adapter per (recipe, persona) with
the learner's own ``train_adapter`` and judges the answers to the benchmark's
held-out prompts as ``heed bench personalize`` does. Same events for every
recipe, so differences are the recipe's; one adapter from scratch, so it says
nothing of the incremental runs (``heed bench personalize`` measures those).

    heed bench recipes collect --data-dir D [--events 16] [--personas NAME ...]
    heed bench recipes train --data-dir D [--recipes bench/recipes.yaml] [--personas NAME ...] [--out FILE.jsonl]

A recipe is a mapping of learner overrides (``heed config`` lists the keys);
results are one JSON line per (recipe, persona), appended to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

PERSONAS = ["brief", "bullets", "asks_back", "in_short", "signs_off"]
RESULTS = Path(__file__).resolve().parent / "results"


def _config(config_path: str, data_dir: Path, learner: dict | None = None):
    from heed.config import load_config
    from heed.models import resolve_model

    model = resolve_model(load_config(config_path))  # the shared converted model, not one per data dir
    return load_config(config_path, overrides={"data_dir": str(data_dir), "model": {"name_or_path": str(model)},
                                               "learner": dict(learner or {})})


def collect(config_path: str, data_dir: Path, *, events: int, personas: list[str], say=print) -> dict:
    from bench.personas import get
    from bench.prompts import split
    from bench.simulate import SimulatedUser
    from heed.service import Heed

    data_dir.mkdir(parents=True, exist_ok=True)
    heed = Heed(_config(config_path, data_dir))
    train, _ = split(heldout_every=3)
    sims = [SimulatedUser(heed, get(n), track="all", prompts=train, seed=0) for n in personas]
    t = time.perf_counter()
    threads = [threading.Thread(target=s.give_feedback, args=(events,)) for s in sims]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    users = {s.persona.name: s.user_id for s in sims}
    (data_dir / "users.json").write_text(json.dumps(users))
    say(f"collected {events} events each in {time.perf_counter() - t:.0f} s: "
        + ", ".join(f"{s.persona.name} {dict(s.log.events)}" for s in sims))
    return users


def train(config_path: str, data_dir: Path, *, recipes: dict, out: Path, events: int, heldout_prompts: int,
          max_new_tokens: int = 256, personas: list[str] | None = None, say=print) -> list[dict]:
    from bench.personalize import judge
    from bench.personas import get
    from bench.prompts import split
    from heed.engine import AdapterRef, Engine, load_base
    from heed.store import Store
    from learner.pairs import build_examples
    from learner.train import train_adapter

    users = json.loads((data_dir / "users.json").read_text())
    unknown = set(personas or []) - set(users)
    if unknown:
        raise LookupError(f"{data_dir}: no collected events for {', '.join(sorted(unknown))} (collected: {', '.join(users)})")
    judges = {n: get(n) for n in users}  # every collected persona's judge, for the isolation figure
    users = {n: uid for n, uid in users.items() if not personas or n in personas}
    _, heldout = split(heldout_every=3)
    heldout = heldout[:heldout_prompts]
    plain = _config(config_path, data_dir)
    model, tokenizer = load_base(plain)
    engine = Engine(model, tokenizer, model_cfg=replace(plain.model, max_cached_adapters=2),
                    gen_cfg=replace(plain.generation, do_sample=False))
    store = Store(plain.db_path)
    rows = []
    for name, overrides in recipes.items():
        config = _config(config_path, data_dir, overrides)
        for persona, uid in users.items():
            feedback = store.list_feedback(user_id=uid)[:events]
            examples = [e for e in build_examples(store, user_id=uid, feedback=feedback, seed=config.learner.seed,
                                                  edit_weight=config.learner.edit_weight,
                                                  heldout_fraction=config.learner.heldout_fraction) if e["split"] == "train"]
            folder = data_dir / "recipes" / name / persona
            shutil.rmtree(folder, ignore_errors=True)
            t = time.perf_counter()
            m = train_adapter(config, init_adapter=None, out_dir=folder, dpo_pairs=[e for e in examples if e["kind"] == "dpo"],
                              kto_examples=[e for e in examples if e["kind"] == "kto"])
            seconds = time.perf_counter() - t
            # A module name (no dots), unique per folder: two recipe names must not share a cached adapter.
            ref = AdapterRef(f"r{len(rows)}_{re.sub(r'[^0-9A-Za-z]', '_', persona)}", str(folder))
            chats = [[{"role": "system", "content": config.generation.system_prompt}, {"role": "user", "content": q}] for q in heldout]
            answers = []
            for i in range(0, len(chats), 16):
                part = chats[i:i + 16]
                answers += engine.generate_batch(part, adapters=[ref] * len(part), max_new_tokens=max_new_tokens, with_finish=True)
            j = judge(answers, heldout, judges)
            row = {"recipe": name, "persona": persona, "events": len(feedback), "accept": j["accept"][persona],
                   "others_max": max([v for k, v in j["accept"].items() if k != persona], default=0.0),
                   "degenerate": j["degenerate"], "degenerate_reasons": j["degenerate_reasons"], "off_topic": j["off_topic"],
                   "mean_words": j["mean_words"], "dpo_rows": m["dpo_rows"], "prefer_rows": m.get("prefer_rows", 0),
                   "kto_rows": m["kto_rows"], "steps": m.get("dpo_steps", 0) + m.get("prefer_steps", 0) + m.get("kto_steps", 0), "train_seconds": round(seconds, 1), "overrides": overrides}
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            say(f"{name:>10} {persona:<10} accept {row['accept']:.0%}  degenerate {row['degenerate']:.0%}  "
                f"off-topic {row['off_topic']:.0%}  {row['mean_words']:.0f} words  ({seconds:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="heed bench recipes", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["collect", "train"])
    p.add_argument("--config", default="configs/default.yaml", help="Heed YAML config (model, generation, learner defaults)")
    p.add_argument("--data-dir", required=True, help="where the collected store and the trained adapters live")
    p.add_argument("--events", type=int, default=16, help="feedback events per persona")
    p.add_argument("--personas", nargs="+", help="collect: who chats (default: the five shipped personas); train: whose events train (default: all collected)")
    p.add_argument("--recipes", default=str(Path(__file__).with_name("recipes.yaml")), help="YAML: recipe name -> learner overrides")
    p.add_argument("--heldout-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length when judging (as heed bench personalize)")
    p.add_argument("--out", default=str(RESULTS / "recipes.jsonl"))
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    if args.action == "collect":
        collect(args.config, data_dir, events=args.events, personas=args.personas or PERSONAS)
        return 0
    recipes = yaml.safe_load(Path(args.recipes).read_text(encoding="utf-8")) or {}
    if not isinstance(recipes, dict) or not all(isinstance(v, dict) for v in recipes.values()):
        raise SystemExit(f"{args.recipes}: expected a mapping of recipe name -> learner overrides")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        train(args.config, data_dir, recipes=recipes, out=out, events=args.events, heldout_prompts=args.heldout_prompts,
              max_new_tokens=args.max_new_tokens, personas=args.personas)
    except LookupError as exc:  # not ValueError: a bad recipe's ConfigError must keep its type
        raise SystemExit(str(exc)) from None
    print(f"appended to {out}")
    return 0
