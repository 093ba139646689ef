"""Audit the promotion gate after a personalization run: was each refusal right?

`heed bench personalize --keep` (or `--data-dir D`) keeps the run's store and
adapters (in ``D/run``: pass that folder). For every user's adapter versions in order, this compares the
candidate with the adapter it was judged against (the last promoted one before
it, or the base) on what the gate measured and on what the gate cannot see:

- ``chosen_gain``: held-out chosen log-likelihood per token, candidate - active
  (the gate's likelihood criterion, on the user's held-out DPO pairs);
- ``margin_gain``: the same for (chosen - rejected) per token;
- for refused candidates (all with ``--all``): held-out acceptance by the user's
  own persona judge and the degenerate share, on the benchmark's held-out
  prompts, generated exactly as ``heed bench personalize`` does.

Run it alone (it generates with the model):
``heed bench gate-audit --data-dir DIR [--out bench/results/gate_audit.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _persona_of(user_name: str) -> str:
    return user_name.rsplit("-", 1)[0]  # the benchmark names its users PERSONA-TRACK


def audit(config_path: str, data_dir: Path, *, moved_from: str | None = None, everything: bool = False,
          max_pairs: int = 16, quick: bool = False, say=print) -> dict:
    import torch

    from dataclasses import replace

    from bench.personalize import judge
    from bench.personas import get
    from bench.prompts import split
    from bench.settings import FULL, QUICK
    from heed.config import load_config
    from heed.engine import AdapterRef, Engine, load_base, set_threads
    from heed.models import resolve_model
    from heed.store import Store
    from learner.gate import heldout_likelihood

    bench = QUICK if quick else FULL
    # The run's model: in its own folder's models/ when it was run with --data-dir, else the config's.
    own = data_dir.parent / "models"
    first = load_config(config_path, overrides={"data_dir": str(data_dir.parent)} if own.is_dir() else None)
    config = load_config(config_path, overrides={"model": {"name_or_path": str(resolve_model(first))},
                                                 "generation": dict(bench.generation)})
    set_threads(config.model.torch_threads)
    store = Store(data_dir / "heed.db")
    model, tok = load_base(config)
    gen = replace(config.generation, do_sample=False, max_new_tokens=bench.eval_max_new_tokens)
    engine = Engine(model, tok, model_cfg=config.model, gen_cfg=gen)
    system = {"role": "system", "content": config.generation.system_prompt}
    _, prompts = split(heldout_every=bench.heldout_every)
    prompts = prompts[:bench.max_heldout] if bench.max_heldout else prompts

    def acceptance(ref, persona: str) -> tuple[float, float]:
        chats = [[system, {"role": "user", "content": q}] for q in prompts]
        outs = []
        for i in range(0, len(chats), 16):
            outs += engine.generate_batch(chats[i:i + 16], adapters=[ref] * len(chats[i:i + 16]), with_finish=True)
        m = judge(outs, prompts, {persona: get(persona)})
        return m["accept"][persona], m["degenerate"]

    with store.db.connect() as db:
        # Users named PERSONA-TRACK are the simulated ones (the observer has no persona).
        users = [(uid, name) for uid, name in db.execute("SELECT id, name FROM users ORDER BY name") if "-" in name]
    rows = []
    t0 = time.perf_counter()
    for uid, name in users:
        persona = _persona_of(name)
        held = [p for p in store.list_pairs(user_id=uid, split="heldout") if p["kind"] == "dpo"][:max_pairs]
        active = None
        for a in sorted(store.list_adapters(user_id=uid), key=lambda a: a["version"]):
            path = a["path"].replace(moved_from, str(data_dir)) if moved_from else a["path"]
            if not os.path.isdir(path):
                continue
            cand = AdapterRef(f"audit-{uid}-{a['version']}", path)
            with torch.inference_mode():
                scored = heldout_likelihood(engine, tok, system, held, candidate=cand, active=active)
            gains, margins = scored["gains"], scored["margins"]
            gate = (a.get("metrics") or {}).get("gate") or {}
            row = {"user": name, "version": a["version"], "status": a["status"], "judged_against": active.path if active else "base",
                   "gate_reasons": gate.get("reasons"), "gate_logp_gain": gate.get("heldout_logp_gain"), "n_heldout_pairs": len(held),
                   "chosen_gain": round(sum(gains) / len(gains), 3) if gains else None,
                   "margin_gain": round(sum(margins) / len(margins), 3) if margins else None}
            if a["status"] == "rejected" or everything:
                row["accept"], row["degenerate"] = acceptance(cand, persona)
            rows.append(row)
            say(json.dumps(row))
            if a["status"] in ("active", "retired"):
                active = cand
    return {"config_file": config_path, "data_dir": str(data_dir), "n_heldout_prompts": len(prompts), "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench gate-audit", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="a kept `heed bench personalize` run (its heed.db and adapters/)")
    p.add_argument("--config", default="configs/default.yaml", help="the Heed config the run used")
    p.add_argument("--moved-from", help="the run's original data dir, when its folder was copied elsewhere since")
    p.add_argument("--all", action="store_true", help="measure acceptance of promoted versions too, not only refused ones")
    p.add_argument("--quick", action="store_true", help="the run was `heed bench personalize --quick`")
    p.add_argument("--out", default=str(RESULTS / "gate_audit.json"))
    args = p.parse_args(argv)
    res = audit(args.config, Path(args.data_dir), moved_from=args.moved_from, everything=args.all, quick=args.quick)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
