"""What a waiting thread's OpenMP pool costs the engine's worker (heed.openmp), measured.

Eight threads ask the engine at once (one batch of 8 rows, no adapters), and
one thread asks alone, while the main thread, which has just computed something
(as a thread that loads the model does), either keeps its OpenMP pool or gives
it back first (what ``Engine`` does after loading, and before a thread waits on
its worker). Runs alternate so drift in machine load hits both.
Writes ``bench/results/openmp_pools.json``.

    python bench/openmp_pools.py [--runs 3] [--new-tokens 48]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perf import PROMPTS, _chat  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _tokens_per_s(engine, rows: int) -> float:
    start = threading.Barrier(rows)

    def user(k):
        start.wait()
        engine.generate(_chat(PROMPTS[k % len(PROMPTS)]))

    threads = [threading.Thread(target=user, args=(k,)) for k in range(rows)]
    before, t = engine.tokens_generated, time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return (engine.tokens_generated - before) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--out", default=str(RESULTS / "openmp_pools.json"))
    args = p.parse_args(argv)

    import torch

    from heed.engine import Engine
    from heed.config import load_config
    from heed.openmp import give_back_pool

    config = load_config(args.config)
    engine = Engine.load(config)
    engine.gen_cfg = replace(engine.gen_cfg, do_sample=False, max_new_tokens=args.new_tokens)
    engine.fixed_length = True
    figures: dict[str, dict[str, list[float]]] = {"kept": {"1": [], "8": []}, "given_back": {"1": [], "8": []}}
    _tokens_per_s(engine, 1)  # warm up
    for _ in range(args.runs):
        for how in figures:
            # The main thread computes, as it did loading the model (Engine.load gives that pool back): a pool now.
            torch.randn(1 << 22).exp_()  # big enough for torch to split it over the threads
            if how == "given_back":
                give_back_pool()
            for rows in (1, 8):
                figures[how][str(rows)].append(_tokens_per_s(engine, rows))
    give_back_pool()
    med = {how: {rows: statistics.median(v) for rows, v in d.items()} for how, d in figures.items()}
    res = {"torch_threads": torch.get_num_threads(), "runs": args.runs, "new_tokens": args.new_tokens,
           "tokens_per_s": med, "runs_tokens_per_s": figures,
           "given_back_over_kept": {rows: med["given_back"][rows] / med["kept"][rows] for rows in ("1", "8")}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("tokens_per_s", "given_back_over_kept")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
