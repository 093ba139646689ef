"""`heed bench batching`: continuous batching (heed.decode) against whole batches (transformers' generate).

Two workloads the product has, each run both ways on one loaded engine, the
ways alternating so drift in machine load hits both; answers are greedy and the
run checks both ways give the same text for every request:

- chat: ``--users`` threads each ask ``--chats`` held-out-style questions one
  after another (a user sends the next when the last answer ends), as the
  simulated users of ``heed bench personalize`` and the chat UI do. Whole
  batches make a request that arrives mid-answer wait for the batch's longest
  answer; continuously it joins at the next token.
- evaluation: ``--rows`` questions answered by ``Engine.generate_batch`` with
  ``--batch`` rows decoding at once, as the benchmark's held-out evaluation and
  the learner's gate do. Whole batches run each batch to its longest answer;
  continuously a row that ends hands its slot to the next question.

- first token: a new request while another user's ``--long-tokens`` answer
  is under way: whole batches make it wait for that answer to end.

Writes ``bench/results/batching.json``: seconds per run, medians, and whole ÷
continuous (above 1: continuous is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _chats(engine, prompts: list[str]) -> list[list[dict]]:
    system = {"role": "system", "content": engine.gen_cfg.system_prompt}
    return [[system, {"role": "user", "content": p}] for p in prompts]


def chat_workload(engine, chats: list[list[list[dict]]]) -> tuple[float, list[list[str]]]:
    """Each user's chats in turn, all users at once: (seconds, answers per user)."""
    got: dict[int, list[str]] = {}
    start = threading.Barrier(len(chats))

    def user(u: int) -> None:
        start.wait()
        got[u] = [engine.generate(c) for c in chats[u]]

    threads = [threading.Thread(target=user, args=(u,)) for u in range(len(chats))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, [got[u] for u in range(len(chats))]


def eval_workload(engine, chats: list[list[dict]], batch: int) -> tuple[float, list[str]]:
    t = time.perf_counter()
    out = engine.generate_batch(chats, batch=batch)
    return time.perf_counter() - t, out


def first_token_workload(engine, long_chat: list[dict], ask: list[dict], *, long_tokens: int, after: int) -> float:
    """Seconds from a request to its first piece of text while another user's long answer is ``after`` tokens in."""
    started = threading.Event()

    def long_answer() -> None:
        for i, _ in enumerate(engine.stream(long_chat, max_new_tokens=long_tokens)):
            if i + 1 == after:
                started.set()

    th = threading.Thread(target=long_answer)
    engine.fixed_length = True  # the long answer runs to its limit whatever the model says
    try:
        th.start()
        started.wait()
        t = time.perf_counter()
        stream = engine.stream(ask, max_new_tokens=8)
        next(stream)
        waited = time.perf_counter() - t
        stream.close()
        th.join()
        engine.wait_idle()  # the closed request's row may still be in a batch: a live worker at exit aborts torch
    finally:
        engine.fixed_length = False
    return waited


def _switch(engine, continuous: bool) -> None:
    engine.wait_idle()
    engine.continuous = continuous


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench batching", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml", help="Heed YAML config (the engine's model and generation)")
    p.add_argument("--out", default=str(RESULTS / "batching.json"))
    p.add_argument("--runs", type=int, default=2, help="runs of each workload each way (medians are reported)")
    p.add_argument("--users", type=int, default=5)
    p.add_argument("--chats", type=int, default=3, help="chats per user, one after another")
    p.add_argument("--rows", type=int, default=48, help="questions in the evaluation workload")
    p.add_argument("--batch", type=int, default=16, help="evaluation rows decoding at once")
    p.add_argument("--long-tokens", type=int, default=256, help="length of the answer running when a new request comes")
    args = p.parse_args(argv)

    from bench.prompts import split
    from heed.config import load_config
    from heed.engine import Engine, set_threads

    config = load_config(args.config)
    set_threads(config.model.torch_threads)
    engine = Engine.load(config)
    if not engine.continuous:
        raise SystemExit("this model/config is served in whole batches only (heed.decode.supports_continuous, invariant bf16)")
    engine.gen_cfg = replace(engine.gen_cfg, do_sample=False)
    train, heldout = split()
    users = [_chats(engine, train[u * args.chats:(u + 1) * args.chats]) for u in range(args.users)]
    rows = _chats(engine, (heldout * (args.rows // len(heldout) + 1))[:args.rows])
    seconds: dict[str, dict[str, list[float]]] = {w: {"whole": [], "continuous": []} for w in ("chat", "eval", "first_token")}
    answers: dict[str, dict[str, list]] = {w: {} for w in ("chat", "eval")}
    tokens: dict[str, int] = {}
    t0 = time.perf_counter()
    for run in range(args.runs):
        for how in (("whole", "continuous") if run % 2 == 0 else ("continuous", "whole")):
            _switch(engine, how == "continuous")
            before = engine.tokens_generated
            s, a = chat_workload(engine, users)
            tokens["chat"] = engine.tokens_generated - before
            seconds["chat"][how].append(s)
            answers["chat"][how] = a
            _switch(engine, how == "continuous")
            before = engine.tokens_generated
            s, a = eval_workload(engine, rows, args.batch)
            tokens["eval"] = engine.tokens_generated - before
            seconds["eval"][how].append(s)
            answers["eval"][how] = a
            _switch(engine, how == "continuous")
            seconds["first_token"][how].append(first_token_workload(engine, rows[0], rows[1], long_tokens=args.long_tokens,
                                                                    after=min(16, args.long_tokens // 4)))
            print(f"run {run} {how}: chat {seconds['chat'][how][-1]:.1f} s, eval {seconds['eval'][how][-1]:.1f} s, "
                  f"first token beside a running answer {seconds['first_token'][how][-1]:.2f} s", flush=True)
    med = {w: {how: statistics.median(v) for how, v in d.items()} for w, d in seconds.items()}
    same = {
        "chat": sum(x == y for a, b in zip(answers["chat"]["whole"], answers["chat"]["continuous"]) for x, y in zip(a, b)),
        "eval": sum(x == y for x, y in zip(answers["eval"]["whole"], answers["eval"]["continuous"])),
    }
    res = {
        "config_file": args.config, "model": config.model.name_or_path, "device": str(engine.device),
        "dtype": str(next(engine.base.parameters()).dtype).replace("torch.", ""),
        "torch_threads": config.model.torch_threads, "max_batch": config.model.max_batch,
        "cpu_count": os.cpu_count(), "load_avg_at_end": list(os.getloadavg()),
        "workloads": {"chat": {"users": args.users, "chats_each": args.chats, "tokens": tokens["chat"]},
                      "eval": {"rows": args.rows, "batch": args.batch, "tokens": tokens["eval"]},
                      "first_token": {"running_answer_tokens": args.long_tokens,
                                      "asked_after": min(16, args.long_tokens // 4)}},
        "runs": args.runs, "seconds": seconds, "median_seconds": med,
        "whole_over_continuous": {w: med[w]["whole"] / med[w]["continuous"] for w in med},
        "same_answers": {"chat": f"{same['chat']}/{args.users * args.chats}", "eval": f"{same['eval']}/{args.rows}"},
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("median_seconds", "whole_over_continuous", "same_answers")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
