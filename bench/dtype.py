"""`heed bench dtype`: bf16 against fp32 on this machine, for the learner and for serving.

- training: the learner's own ``train_adapter`` on the same synthetic pairs
  (``bench.learner_bench.synthetic_events``) in each dtype: seconds and losses;
- generation: greedy tokens/s at several batch sizes (every answer runs to the
  same length), and the peak memory of the largest batch;
- batch invariance: of ``invariance_prompts`` prompts, how many greedy answers
  are identical when asked alone and when asked together (left-padded to the
  longest), for fp32, bf16 as served (``model.batch_invariant``, heed.invariant)
  and plain bf16. A user's answer must not depend on who else is chatting: the
  isolation checks and the benchmark's reproducibility rest on it;
- answer quality: of ``quality_prompts`` benchmark questions, how many greedy
  answers (the configured generation settings and token limit) are degenerate
  by ``heed.quality`` (mostly: cut off at the limit), fp32 against bf16, and fp32
  with the other ``generation.penalize_end_of_turn``.

The dtypes are interleaved in every round and each figure is the median of
``repeats`` rounds (the machine is shared and noisy); torch threads come from
the config. Results: ``bench/results/dtype.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "bfloat16")
# Serving modes: (dtype, model.batch_invariant). bf16 is served batch-invariant; plain bf16 is what that costs.
SERVING = {"float32": ("float32", True), "bfloat16": ("bfloat16", True), "bfloat16_plain": ("bfloat16", False)}


@dataclass
class DtypeSettings:
    repeats: int = 3
    train_events: int = 8
    batches: tuple = (1, 8, 32)
    new_tokens: int = 48
    invariance_prompts: int = 8
    invariance_tokens: int = 96
    quality_prompts: int = 96


QUICK = DtypeSettings(repeats=2, train_events=4, batches=(1, 4), new_tokens=8, invariance_prompts=4, invariance_tokens=12,
                      quality_prompts=4)


def _config(config_path: str, data_dir: str, dtype: str, *, invariant: bool = True):
    from heed.config import load_config
    from heed.models import resolve_model

    first = load_config(config_path)
    model = {"name_or_path": str(resolve_model(first)), "dtype": dtype, "batch_invariant": invariant}
    return load_config(config_path, overrides={"data_dir": data_dir, "model": model, "learner": {"dtype": "model"}})


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_once(config, pairs: list[dict], out_dir: Path) -> dict:
    from learner.train import train_adapter

    m = train_adapter(config, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=out_dir)
    return {"seconds": m["train_seconds"], "steps": m["dpo_steps"], "loss": m["dpo_loss"], "losses": m["dpo_losses"]}


def _chats(system: str, n: int) -> list[list[dict]]:
    from bench.prompts import PROMPTS

    # Questions of different lengths, so a batch pads its shorter rows.
    return [[{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]


def tokens_per_s(engine, chats: list[list[dict]], new_tokens: int) -> float:
    engine.fixed_length = True
    try:
        before, t = engine.tokens_generated, time.perf_counter()
        engine.generate_batch(chats, max_new_tokens=new_tokens)
        return (engine.tokens_generated - before) / (time.perf_counter() - t)
    finally:
        engine.fixed_length = False


def batch_invariance(engine, chats: list[list[dict]], new_tokens: int) -> dict:
    """How many greedy answers come out the same alone, in one batch, and in that batch reversed."""
    alone = [engine.generate_batch([c], max_new_tokens=new_tokens)[0] for c in chats]
    together = engine.generate_batch(chats, max_new_tokens=new_tokens)
    reverse = engine.generate_batch(chats[::-1], max_new_tokens=new_tokens)[::-1]
    return {"prompts": len(chats), "same_in_batch": sum(a == b for a, b in zip(alone, together)),
            "same_in_reversed_batch": sum(a == b for a, b in zip(alone, reverse))}


def answer_quality(engine, chats: list[list[dict]], *, gen=None) -> dict:
    """Degenerate greedy answers (heed.quality) among ``chats``, at the configured token limit."""
    from heed.quality import degeneration

    outs = engine.generate_batch(chats, with_finish=True, gen=gen)
    why = [degeneration(text, prompt=c[-1]["content"], finished=done) for (text, done), c in zip(outs, chats)]
    return {"prompts": len(chats), "degenerate": sum(bool(w) for w in why), "cut_off": why.count("cut_off"),
            "mean_words": sum(len(t.split()) for t, _ in outs) / max(len(outs), 1)}


def run(config_path: str, *, settings: DtypeSettings, out: Path, say=print) -> dict:
    from bench.learner_bench import synthetic_events
    from heed.engine import Engine, load_base, set_threads
    from heed.hardware import cpu_has_native_bf16, pick_device_dtype

    t0, load = time.time(), os.getloadavg()
    s = settings
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": good, "rejected": bad, "weight": 1.0}
             for q, bad, good in synthetic_events(s.train_events)]
    train: dict[str, list[dict]] = {d: [] for d in DTYPES}
    tps: dict[str, dict[int, list[float]]] = {m: {b: [] for b in s.batches} for m in SERVING}
    invariance: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="heed-dtype-") as tmp:
        configs = {d: _config(config_path, tmp, d) for d in DTYPES}
        set_threads(configs["float32"].model.torch_threads)
        engines = {}
        for mode, (d, invariant) in SERVING.items():
            c = _config(config_path, tmp, d, invariant=invariant)
            model, tok = load_base(c)
            engines[mode] = Engine(model, tok, model_cfg=c.model, gen_cfg=replace(c.generation, do_sample=False))
        system = configs["float32"].generation.system_prompt
        quality = {}
        for mode, e in engines.items():
            invariance[mode] = batch_invariance(e, _chats(system, s.invariance_prompts), s.invariance_tokens)
            say(f"dtype: {mode} batch invariance {invariance[mode]}")
        for mode in ("float32", "bfloat16"):
            quality[mode] = answer_quality(engines[mode], _chats(system, s.quality_prompts))
            say(f"dtype: {mode} answers {quality[mode]}")
        fp32 = engines["float32"]
        other = not fp32.gen_cfg.penalize_end_of_turn
        quality["float32_end_" + ("penalized" if other else "spared")] = answer_quality(
            fp32, _chats(system, s.quality_prompts), gen=replace(fp32.gen_cfg, penalize_end_of_turn=other))
        for r in range(s.repeats):
            say(f"dtype: round {r + 1}/{s.repeats}")
            for mode in SERVING:
                for b in s.batches:
                    tps[mode][b].append(tokens_per_s(engines[mode], _chats(system, b), s.new_tokens))
            for d in DTYPES:
                train[d].append(train_once(configs[d], pairs, Path(tmp) / f"adapter-{d}-{r}"))
        device, _ = pick_device_dtype(configs["float32"].model)

    med = statistics.median
    res: dict = {
        "config_file": config_path, "settings": {**s.__dict__, "batches": list(s.batches)},
        "machine": platform.processor() or platform.machine(), "device": device, "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": configs["float32"].model.torch_threads, "load_avg_at_start": load,
        "train_seconds": {d: med(x["seconds"] for x in train[d]) for d in DTYPES},
        "train_steps": train["float32"][0]["steps"],
        "train_loss": {d: train[d][0]["loss"] for d in DTYPES},
        "train_losses": {d: train[d][0]["losses"] for d in DTYPES},
        "tokens_per_s": {m: {str(b): med(tps[m][b]) for b in s.batches} for m in SERVING},
        "batch_invariance": invariance,
        "answer_quality": quality,
        "max_new_tokens": configs["float32"].generation.max_new_tokens,
    }
    res["train_speedup_bf16"] = res["train_seconds"]["float32"] / res["train_seconds"]["bfloat16"]
    fp32 = res["tokens_per_s"]["float32"]
    res["generate_speedup_bf16"] = {str(b): res["tokens_per_s"]["bfloat16"][str(b)] / fp32[str(b)] for b in s.batches}
    res["generate_speedup_bf16_plain"] = {str(b): res["tokens_per_s"]["bfloat16_plain"][str(b)] / fp32[str(b)] for b in s.batches}
    res["peak_rss_mb"] = _peak_mb()
    res["minutes"] = round((time.time() - t0) / 60, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench dtype", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny offline model and small sizes (seconds)")
    p.add_argument("--config", help="Heed YAML config (default: configs/default.yaml, or configs/tiny.yaml with --quick)")
    p.add_argument("--out", help="result JSON (default: bench/results/dtype.json; quick: bench/results/quick/dtype.json)")
    p.add_argument("--repeats", type=int, help="rounds (each dtype once per round); figures are medians")
    args = p.parse_args(argv)
    settings = QUICK if args.quick else DtypeSettings()
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    config = args.config or ("configs/tiny.yaml" if args.quick else "configs/default.yaml")
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "") / "dtype.json"
    res = run(config, settings=settings, out=out)
    print(json.dumps({k: v for k, v in res.items() if k not in ("train_losses", "settings")}, indent=1))
    print(f"wrote {out}")
    return 0
