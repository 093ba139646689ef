"""`heed bench perf`: serving and store figures, each beside the plain library doing the same work.

Serving (the engine) against bare transformers / peft in the same process:
adapted reply tokens/s over the base model's, first token, switching and
loading adapters, memory with many users' adapters, 8 users with 8 adapters at
once. Store: feedback events written per second (1 and 8 writers) against raw
sqlite3 inserts, and a user's feedback/pair queries with 1M feedback rows.
The learner's figures come from ``bench.learner_bench`` (the learner's own
benchmark) when it is there. Torch threads are set from the config; every
timing is the median of several runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench import perf_store

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["Explain how a bicycle works.", "Describe a good morning routine.", "Why do we need sleep?",
           "Tell me about the history of bread.", "How do plants grow?", "What makes a good friend?",
           "Describe the water cycle.", "How does a fridge keep food cold?"]


@dataclass
class PerfSettings:
    runs: int = 5
    new_tokens: int = 64
    users: int = 50
    feedback_rows: int = 1_000_000
    write_seconds: float = 3.0


LEARNER_KEYS = ("learner_s_per_pair_ratio", "learner_peak_rss_ratio", "history_10x_time_ratio")
QUICK = PerfSettings(runs=3, new_tokens=16, users=10, feedback_rows=20_000, write_seconds=0.5)


def _median(xs):
    return statistics.median(xs) if xs else None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_adapters(config, folder: Path, n: int) -> list:
    """n users' adapters made with peft directly (random A and B, LoRA r=8 on the learner's target modules)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from heed.engine import AdapterRef, load_base

    model, _ = load_base(config)
    lc = config.learner
    peft_model = get_peft_model(model, LoraConfig(r=lc.lora_r, lora_alpha=lc.lora_alpha, target_modules=list(lc.target_modules)))
    refs = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    # Small nonzero weights: every adapter changes the model a little, as a trained one does.
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.1))
        out = folder / f"user{i:03d}"
        peft_model.save_pretrained(str(out))
        refs.append(AdapterRef(f"user{i:03d}", str(out)))
    return refs


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful AI assistant named Heed."}, {"role": "user", "content": prompt}]


def _timed_tokens(engine, fn) -> tuple[float, int]:
    before = engine.tokens_generated
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, engine.tokens_generated - before


def serving(config, s: PerfSettings, refs: list) -> dict:
    """Tokens/s with and without an adapter, first token, switching and loading, memory, 8 users at once."""
    import torch
    from peft import PeftModel

    from heed.engine import Engine, load_base

    model, tokenizer = load_base(config)
    gen = replace(config.generation, do_sample=False, max_new_tokens=s.new_tokens)
    engine = Engine(model, tokenizer, model_cfg=replace(config.model, max_cached_adapters=len(refs) + 1, max_batch=8), gen_cfg=gen)
    engine.fixed_length = True  # every reply exactly s.new_tokens long, with or without an adapter
    out: dict = {"torch_threads": torch.get_num_threads()}

    # Memory first, while nothing else has been allocated: every user's adapter loaded at once.
    rss0 = _rss_mb()
    loads = []
    for ref in refs:
        t = time.perf_counter()
        engine.ensure_adapter(ref)
        loads.append(1000 * (time.perf_counter() - t))
    lora_bytes = sum(p.numel() * p.element_size() for n, p in engine.peft.named_parameters() if "lora_" in n)
    out.update(users_in_memory=len(refs), memory_adapters_mb=round(_rss_mb() - rss0, 1), rss_mb_with_adapters=round(_rss_mb(), 1),
               adapter_weights_mb=round(lora_bytes / 2**20, 1))
    out["adapter_load_ms"] = _median(loads[1:])  # the first also wraps the model in peft

    a, b = refs[0], refs[1]
    engine.generate(_chat(PROMPTS[0]), adapter=a)  # warm up

    # Adapted vs bare, interleaved so drift in machine load hits both alike. User a asks again and again (a
    # conversation: hybrid serving merges a from its second reply); c and d take turns, so each of their replies
    # is a first reply after someone else's (unmerged).
    c, d = refs[2], refs[3]
    base_tps, adapted_tps, switched_tps, how = [], [], [], set()
    for i in range(s.runs):
        p = _chat(PROMPTS[i % len(PROMPTS)])
        for ref, acc in ((None, base_tps), (a, adapted_tps), (c, switched_tps), (d, switched_tps)):
            dt, n = _timed_tokens(engine, lambda: engine.generate(p, adapter=ref))
            acc.append(n / dt)
            who = "base" if ref is None else "same user" if ref is a else "switched"
            how.add(f"{who}: {engine.adapters.how or 'bare'}")
    out["serving"] = engine.serving
    out["served_as"] = sorted(how)
    out["base_tokens_per_s"] = _median(base_tps)
    out["adapter_tokens_per_s"] = _median(adapted_tps)
    out["adapter_tokens_per_s_ratio"] = _median([x / y for x, y in zip(adapted_tps, base_tps)])
    out["switched_adapter_tokens_per_s_ratio"] = _median([(x + y) / 2 / z for x, y, z in
                                                          zip(switched_tps[::2], switched_tps[1::2], base_tps)])
    out["merged_copies_mb"] = round(engine.adapters.merged_bytes / 2**20, 1)

    # The plain library doing the same: peft's unmerged LoRA forward, on its own copy of the base model.
    plain, tok = load_base(config)
    plain_peft = PeftModel.from_pretrained(plain, a.path)
    plain_tps = []
    for i in range(s.runs):
        ids = torch.tensor([engine.prompt_ids(_chat(PROMPTS[i % len(PROMPTS)]), max_new_tokens=s.new_tokens)])
        t = time.perf_counter()
        with torch.inference_mode():
            res = plain_peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.new_tokens,
                                      min_new_tokens=s.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
        plain_tps.append((res.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    out["plain_peft_tokens_per_s"] = _median(plain_tps)
    out["plain_peft_ratio"] = out["plain_peft_tokens_per_s"] / out["base_tokens_per_s"]
    del plain_peft, plain

    firsts = []
    for i in range(s.runs):
        t = time.perf_counter()
        stream = engine.stream(_chat(PROMPTS[i % len(PROMPTS)]), adapter=a)
        next(stream)
        firsts.append(1000 * (time.perf_counter() - t))
        stream.close()
        engine.wait_idle()
    out["first_token_ms"] = _median(firsts)

    switches = []
    for i in range(max(10, 2 * s.runs)):
        ref = a if i % 2 else b
        t = time.perf_counter()
        engine.activate(ref)
        switches.append(1000 * (time.perf_counter() - t))
    out["adapter_switch_ms"] = _median(switches)

    # A merge: x merged, then y asked twice (hybrid merges y the second time; merged mode at once).
    merges = []
    for i in range(max(4, s.runs)):
        x, y = (a, b) if i % 2 else (b, a)
        engine.activate(x)
        engine.activate(x)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            engine.activate(y)
            times.append(1000 * (time.perf_counter() - t))
        merges.append(times[0] if engine.serving == "merged" else times[1])
    out["merge_ms"] = _median(merges) if engine.serving in ("merged", "hybrid") else None
    engine.activate(None)

    # A user's answer right after another user's, asked again, and in a batch beside another user's: the same
    # text, or an answer would depend on who asked before (hybrid: hooks, then merged).
    same, asked, paths = 0, PROMPTS[:4], set()
    for p in map(_chat, asked):
        engine.generate(p, adapter=b)
        engine.generate(p, adapter=b)  # hybrid: b merged, so a's next reply is by hooks
        first = engine.generate(p, adapter=a)
        how_first = engine.adapters.how
        again = engine.generate(p, adapter=a)
        paths.add(f"{how_first}, then {engine.adapters.how}, then batched")
        same += first == again == engine.generate_batch([p, p], adapters=[a, b])[0]
    out["answers_same_alone_again_batched"] = [same, len(asked)]
    out["answers_compared"] = sorted(paths)

    # 8 users at once, 8 different adapters: total tokens/s over one user alone.
    eight = refs[:8]
    alone, together, bare, plain_mixed = [], [], [], []
    for i in range(s.runs):
        dt, n = _timed_tokens(engine, lambda: engine.generate(_chat(PROMPTS[i % 8]), adapter=eight[i % 8]))
        alone.append(n / dt)
        tps, batches = _eight_users(engine, eight)
        together.append(tps)
        out["eight_users_batches"] = batches
        # The same 8 requests without adapters: how much of the batch's speed the mixed LoRA costs.
        bare.append(_eight_users(engine, [None] * 8)[0])
        plain_mixed.append(_peft_mixed_tps(engine, eight, gen))
    out["one_user_tokens_per_s"] = _median(alone)
    out["eight_users_tokens_per_s"] = _median(together)
    out["mixed_adapter_batch_speedup_8"] = _median([t / a_ for t, a_ in zip(together, alone)])
    out["eight_users_no_adapter_tokens_per_s"] = _median(bare)
    out["eight_users_adapters_vs_none"] = _median([t / b_ for t, b_ in zip(together, bare)])
    out["plain_peft_adapter_names_tokens_per_s_8"] = _median(plain_mixed)
    out["plain_peft_adapter_names_speedup_8"] = _median([p / a_ for p, a_ in zip(plain_mixed, alone)])
    return out


def _eight_users(engine, adapters) -> tuple[float, int]:
    """(total tokens/s, batches) of 8 threads that ask the engine at once, as 8 browser sessions do."""
    import threading

    start = threading.Barrier(len(adapters))

    def user(k):
        start.wait()
        engine.generate(_chat(PROMPTS[k]), adapter=adapters[k])

    threads = [threading.Thread(target=user, args=(k,)) for k in range(len(adapters))]
    before, b0 = engine.tokens_generated, engine.batches_run
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return (engine.tokens_generated - before) / (time.perf_counter() - t), engine.batches_run - b0


def _peft_mixed_tps(engine, refs, gen) -> float:
    """peft's own mixed-adapter batch (``adapter_names``) on the same 8 prompts, for comparison."""
    import torch

    with engine._lock:
        engine.activate(None)
        ids = [engine.prompt_ids(_chat(PROMPTS[k]), max_new_tokens=gen.max_new_tokens) for k in range(len(refs))]
        width = max(map(len, ids))
        pad = engine.tokenizer.pad_token_id
        x = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        engine.peft.base_model.enable_adapter_layers()
        try:
            t = time.perf_counter()
            with torch.inference_mode():
                res = engine.peft.generate(input_ids=x, attention_mask=mask, adapter_names=[r.key for r in refs],
                                           **engine._gen_kwargs(gen, gen.max_new_tokens, padding=(mask == 0).sum(dim=1), prompt_width=width))
            dt = time.perf_counter() - t
        finally:
            engine.peft.base_model.disable_adapter_layers()
    return (res.shape[1] - width) * len(refs) / dt


def learner(config_path: str, out: Path) -> dict:
    """The learner engineer's benchmark (bench/learner_bench.py), or nulls with a note while it is missing."""
    keys = LEARNER_KEYS
    try:
        from bench.learner_bench import run_learner_bench
    except ImportError:
        return {**{k: None for k in keys}, "learner_note": "bench/learner_bench.py is not in this checkout yet"}
    res = run_learner_bench(config_path, out)
    return {**{k: res.get(k) for k in keys}, "learner": res}


SECTIONS = ("store", "serving", "learner")


def run(config_path: str, *, quick: bool, out: Path, skip_learner: bool = False, only: tuple[str, ...] = SECTIONS,
        say=print) -> dict:
    """Measure ``only`` these sections; with fewer than all, the other figures are kept from ``out``."""
    from heed.config import load_config
    from heed.engine import set_threads
    from heed.models import resolve_model

    s = QUICK if quick else PerfSettings()
    first = load_config(config_path)
    set_threads(first.model.torch_threads)
    t0 = time.time()
    results: dict = {}
    if set(only) != set(SECTIONS) and out.is_file():
        results = json.loads(out.read_text())
        # Every section's latest rerun stays on record: the report says when each kept figure was measured.
        results["sections_rerun"] = {**results.get("sections_rerun", {}), **{name: time.strftime("%Y-%m-%d %H:%M") for name in only}}
    results.update({"config_file": config_path, "settings": s.__dict__, "machine": platform.processor() or platform.machine()})
    with tempfile.TemporaryDirectory(prefix="heed-perf-") as tmp:
        config = load_config(config_path, overrides={"data_dir": tmp, "model": {"name_or_path": str(resolve_model(first))}})
        results["model"] = Path(config.model.name_or_path).name
        results["torch_threads"] = config.model.torch_threads
        if "store" in only:
            say("store: writes and queries ...")
            results.update(perf_store.writes(config, seconds=s.write_seconds, runs=3))
            results.update(perf_store.queries(Path(tmp) / "big.db", rows=s.feedback_rows, runs=s.runs))
        if "serving" in only:
            say("serving: adapters ...")
            refs = make_adapters(config, Path(tmp) / "adapters", s.users)
            results.update(serving(config, s, refs))
    if skip_learner:
        results.update({k: None for k in LEARNER_KEYS}, learner_note="left out (--skip-learner)")
    elif "learner" in only:
        say("learner ...")
        results.update(learner(config_path, out.parent / "learner_bench.json"))
    results["seconds" if set(only) == set(SECTIONS) else "seconds_rerun"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    from bench.report import write_perf

    write_perf(results, out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench perf", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny offline model and small sizes (seconds)")
    p.add_argument("--config", help="Heed YAML config (default: configs/default.yaml, or configs/tiny.yaml with --quick)")
    p.add_argument("--out", help="result JSON (default: bench/results/perf.json; quick: bench/results/quick/perf.json)")
    p.add_argument("--skip-learner", action="store_true", help="leave the learner figures out")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="measure only these sections; the rest of --out's figures are kept")
    args = p.parse_args(argv)
    config = args.config or ("configs/tiny.yaml" if args.quick else "configs/default.yaml")
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "") / "perf.json"
    res = run(config, quick=args.quick, out=out, skip_learner=args.skip_learner, only=tuple(args.only))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    print(f"wrote {out}")
    return 0
