"""What each probe set lets the gate see: every adapter of a kept run, and the base, answering each set.

`heed bench personalize --keep` (or `--data-dir D`) keeps a run's store and
adapters (in ``D/run``: pass that folder). Every adapter version there, promoted
or refused, answers each probe set of ``learner.probes`` as the gate would (greedy,
the gate's token limit), and each set's answers are counted as the gate counts
them (``learner.gate._judge``): degenerate, cut off, off topic, one template said
to every question. A set that shows an adapter's collapse where the user's own
held-out answers show it is one the gate can refuse it on.

Run it alone (it generates with the model):
``heed bench gate-probes --data-dir DIR [--sets factual everyday] [--out bench/results/gate_probes.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def replay(config_path: str, data_dir: Path, *, sets: list[str], say=print) -> dict:
    from dataclasses import replace

    import torch

    from heed.config import load_config
    from heed.engine import AdapterRef, Engine, load_base, set_threads
    from heed.models import resolve_model
    from heed.store import Store
    from learner.gate import _judge
    from learner.probes import probe_prompts

    # The run's model: in its own folder's models/ when it was run with --data-dir, else the config's.
    own = data_dir.parent / "models"
    first = load_config(config_path, overrides={"data_dir": str(data_dir.parent)} if own.is_dir() else None)
    config = load_config(config_path, overrides={"model": {"name_or_path": str(resolve_model(first))}})
    set_threads(config.model.torch_threads)
    store = Store(data_dir / "heed.db")
    model, tok = load_base(config)
    gen = replace(config.generation, do_sample=False, max_new_tokens=config.learner.gate_max_new_tokens)
    engine = Engine(model, tok, model_cfg=replace(config.model, max_cached_adapters=32), gen_cfg=gen)
    system = {"role": "system", "content": config.generation.system_prompt}
    with store.db.connect() as db:
        # Users named PERSONA-TRACK are the simulated ones (the observer has no persona).
        users = [(uid, name) for uid, name in db.execute("SELECT id, name FROM users ORDER BY id") if "-" in name]
    refs: list[tuple[dict, AdapterRef | None]] = [({"user": "base", "version": 0, "status": "base"}, None)]
    for uid, name in users:
        for a in sorted(store.list_adapters(user_id=uid), key=lambda a: a["version"]):
            if os.path.isdir(a["path"]):
                refs.append(({"user": name, "version": a["version"], "status": a["status"]}, AdapterRef(f"probe-{uid}-{a['version']}", a["path"])))
    rows = [dict(row) for row, _ in refs]
    t0 = time.perf_counter()
    for kind in sets:
        qs = probe_prompts(kind)
        contexts = [[{"role": "user", "content": q}] for q in qs]
        chats = [[system, *c] for c in contexts]
        with torch.inference_mode():
            # One call: rows with different adapters share a batch, as in the gate.
            got = engine.generate_batch([c for _ in refs for c in chats], adapters=[r for _, r in refs for _ in chats], with_finish=True)
        for k, row in enumerate(rows):
            outs = got[k * len(qs):(k + 1) * len(qs)]
            (deg, cut, off, same), _ = _judge(outs, contexts)
            n = len(qs)
            row[kind] = {"degenerate": round(deg * n), "cut_off": round(cut * n), "off_topic": round(off * n),
                         "templated": round(same * n), "n": n, "answers": [t for t, _ in outs]}
            say(f"{kind:<9} {row['user']:<16} v{row['version']} {row['status']:<8} "
                + " ".join(f"{k2} {v}" for k2, v in row[kind].items() if k2 != "answers"))
    return {"config_file": config_path, "data_dir": str(data_dir), "sets": sets, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    from learner.probes import PROBE_SETS

    p = argparse.ArgumentParser(prog="heed bench gate-probes", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="a kept `heed bench personalize` run (its heed.db and adapters/)")
    p.add_argument("--config", default="configs/default.yaml", help="the Heed config the run used")
    p.add_argument("--sets", nargs="+", default=["factual", "everyday"], choices=[s for s in PROBE_SETS if s != "mixed"],
                   help="probe sets to answer (mixed is their alternation)")
    p.add_argument("--out", default=str(RESULTS / "gate_probes.json"))
    args = p.parse_args(argv)
    if not (Path(args.data_dir) / "heed.db").is_file():
        p.error(f"{args.data_dir} holds no heed.db: pass the run folder of a kept `heed bench personalize` run (DIR/run)")
    res = replay(args.config, Path(args.data_dir), sets=args.sets)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
