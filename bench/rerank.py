"""Best of k by the adapter's own implicit reward: does choosing among sampled answers lift acceptance?

A DPO adapter defines a reward without any judge: ``r(x, y) = log π_adapter(y|x) -
log π_base(y|x)`` (times β, which does not change which answer wins). Held-out
preference accuracy of that reward saturates at 1.00 even when greedy answers do
not change (docs/MEASUREMENTS.md), so the reward ranks what the user wants above
what they do not, but greedy decoding does not reach it. This replays a kept run:
each user's active adapter (and the base model) answers the benchmark's held-out
prompts ``k`` times (greedy, then ``k - 1`` samples, each with its own seed);
every answer is scored under the adapter and under the base, and each way of
choosing one answer per prompt is judged as the benchmark judges:

- ``greedy``: the first answer, what the product serves now (the run's own figure);
- ``sample``: the second answer, one sample alone;
- ``sound``: the first answer ``heed.quality`` finds sound (not degenerate, cut off or off
  topic, as the gate checks; the greedy one when none is): what the filter alone does;
- ``reward``: the highest summed implicit reward; ``reward_per_token``: per answer token;
- ``likelihood``: the highest mean log-probability per token under the adapter alone;
- ``reward_sound``: the highest reward among the sound answers. The filter applies checks the
  benchmark's acceptance includes, so part of its gain is by construction: ``sound`` measures that part;
- ``consensus``: the answer sharing the most word pairs with the other k-1 (minimum Bayes risk under
  bigram overlap): the typical answer, not an outlier;
- ``oracle``: accepted when any of the k answers is (a ceiling no chooser passes).

No chooser sees a persona's judge. Run it
alone (it generates with the model):
``heed bench rerank --data-dir D [--k 4] [--bench-config bench/seed1.yaml] [--out bench/results/rerank.json]``.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CHOOSERS = ("greedy", "sample", "sound", "reward", "reward_per_token", "likelihood", "reward_sound", "consensus", "oracle")


def answer_scores(engine, ref, sequences: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """(log-likelihood, token count) of each (ids, answer start) under adapter ``ref`` (None: the base model),
    scored as the gate scores held-out answers (``learner.gate.total_log_probs``)."""
    import torch

    from learner.gate import total_log_probs

    with engine._lock, torch.inference_mode():
        if ref is not None:
            engine.ensure_adapter(ref)
        return total_log_probs(engine, ref, sequences)


def _bigrams(text: str) -> set[tuple[str, str]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return set(zip(words, words[1:]))


def overlap(a: set, b: set) -> float:
    """Dice overlap of two answers' word pairs (1: the same pairs)."""
    return 2 * len(a & b) / max(len(a) + len(b), 1)


def choose(cands: list[dict]) -> dict[str, int]:
    """Index of the answer each chooser picks among one prompt's candidates: each has its ``text``, whether
    ``heed.quality`` finds it ``sound`` and, where scored, its implicit ``reward`` (summed over its
    ``tokens``) and its summed log-probability under the adapter (``logp``)."""
    idx = range(len(cands))
    sound = [i for i in idx if cands[i]["sound"]] or [0]
    grams = [_bigrams(c["text"]) for c in cands]
    agree = [sum(overlap(grams[i], grams[j]) for j in idx if j != i) for i in idx]
    picks = {
        "greedy": 0,
        "sample": 1 if len(cands) > 1 else 0,
        "sound": sound[0],
        "consensus": max(idx, key=lambda i: agree[i]),  # ties: the earliest, so greedy first
    }
    if all("tokens" in c for c in cands):
        picks.update({
            "reward": max(idx, key=lambda i: cands[i]["reward"]),
            "reward_per_token": max(idx, key=lambda i: cands[i]["reward"] / max(cands[i]["tokens"], 1)),
            "likelihood": max(idx, key=lambda i: cands[i]["logp"] / max(cands[i]["tokens"], 1)),
            "reward_sound": max(sound, key=lambda i: cands[i]["reward"]),
        })
    return picks


def tally(answers: list[dict], judges: dict) -> dict:
    """Each chooser's answers judged as the benchmark judges them, from the saved candidates (``rerank``'s rows).
    Answers saved without their token counts (the tool's first version) keep their saved score-based picks."""
    from bench.personalize import judge
    from heed.quality import is_sensible, on_topic

    prompts = [a["prompt"] for a in answers]
    picks = []
    for a in answers:
        scored = ("reward", "tokens", "logp") if "tokens" in a else ()
        cands = [{"text": a["candidates"][r], **{key: a[key][r] for key in scored},
                  "sound": is_sensible(a["candidates"][r], prompt=a["prompt"], finished=a["finished"][r]) and on_topic(a["candidates"][r], a["prompt"])}
                 for r in range(len(a["candidates"]))]
        picks.append({**a.get("picks", {}), **choose(cands)})
    out = {"accept": {}, "style_only": {}, "degenerate": {}, "off_topic": {}, "mean_words": {}}
    for chooser in CHOOSERS[:-1]:
        m = judge([(a["candidates"][p[chooser]], a["finished"][p[chooser]]) for a, p in zip(answers, picks)], prompts, judges)
        for key in ("accept", "style_only", "degenerate", "off_topic"):
            out[key][chooser] = m[key]
        out["mean_words"][chooser] = round(m["mean_words"], 1)
    out["accept"]["oracle"] = {n: sum(any(j.accepts(t, prompt=a["prompt"], finished=f) for t, f in zip(a["candidates"], a["finished"]))
                                      for a in answers) / max(len(answers), 1) for n, j in judges.items()}
    out["picks"] = picks
    return out


def rerank(data_dir: Path, *, k: int = 4, bench_config: str | None = None, config_path: str | None = None,
           quick: bool = False, temperature: float = 0.7, say=print) -> dict:
    from bench.gate_audit import _persona_of
    from bench.kept_run import active_adapter, held_out_chats, open_kept_run, simulated_users
    from bench.personas import get
    from heed.engine import AdapterRef

    if k < 2:
        raise SystemExit("--k must be at least 2 (the greedy answer and one sample)")
    run = open_kept_run(data_dir, bench_config=bench_config, config_path=config_path, quick=quick)
    bench, prompts, config, engine, heed = run.bench, run.prompts, run.config, run.engine, run.heed
    tok = engine.tokenizer
    subjects = []  # (user, uid, persona, version, adapter): the users' active adapters, then the base model
    for uid, name in simulated_users(heed.store):
        active = active_adapter(heed.store, uid)
        if active is not None:
            subjects.append((name, uid, _persona_of(name), active["version"], AdapterRef(f"rerank-u{uid}", active["path"])))
    subjects.append(("base", None, None, 0, None))
    judges = {n: get(n) for n in dict.fromkeys(bench.personas)}
    gens = [replace(config.generation, do_sample=False)]  # the greedy answer, then k - 1 samples, each with its own seed
    gens += [replace(config.generation, do_sample=True, temperature=temperature, seed=s) for s in range(1, k)]
    rows, t0 = [], time.perf_counter()
    for name, uid, persona, version, ref in subjects:
        t = time.perf_counter()
        chats = held_out_chats(heed, uid, prompts, config.generation.system_prompt)
        runs = [engine.generate_batch(chats, adapters=[ref] * len(chats), max_new_tokens=bench.eval_max_new_tokens, gen=g,
                                      with_finish=True, batch=bench.eval_batch) for g in gens]
        prompt_ids = [engine.prompt_ids(c, max_new_tokens=bench.eval_max_new_tokens) for c in chats]
        eos = [tok.eos_token_id]
        flat = [(i, r) for r in range(k) for i in range(len(prompts))]
        # The answer's own tokens, and the end of the turn only where the model ended it.
        seqs = [(prompt_ids[i] + tok(runs[r][i][0], add_special_tokens=False)["input_ids"] + (eos if runs[r][i][1] else []),
                 len(prompt_ids[i])) for i, r in flat]
        under_adapter = answer_scores(engine, ref, seqs)
        under_base = under_adapter if ref is None else answer_scores(engine, None, seqs)
        scored = {(i, r): (a, a - b, n) for (i, r), (a, n), (b, _) in zip(flat, under_adapter, under_base)}
        answers = [{"prompt": q, "candidates": [runs[r][i][0] for r in range(k)], "finished": [runs[r][i][1] for r in range(k)],
                    "reward": [round(scored[i, r][1], 4) for r in range(k)], "logp": [round(scored[i, r][0], 4) for r in range(k)],
                    "tokens": [scored[i, r][2] for r in range(k)]} for i, q in enumerate(prompts)]
        verdict = tally(answers, judges)
        for a, p in zip(answers, verdict.pop("picks")):
            a["picks"] = p
        row = {"user": name, "persona": persona, "version": version, **verdict, "seconds": round(time.perf_counter() - t, 1), "answers": answers}
        say(json.dumps({"user": name, "version": version, "seconds": row["seconds"],
                        **({c: round(row["accept"][c][persona], 3) for c in CHOOSERS} if persona else {})}))
        rows.append(row)
    return {"data_dir": str(data_dir), "k": k, "temperature": temperature, "n_heldout_prompts": len(prompts),
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def summary_md(res: dict) -> str:
    lines = [f"Best of {res['k']} (greedy + {res['k'] - 1} samples at temperature {res['temperature']}), "
             f"{res['n_heldout_prompts']} held-out prompts: each user's acceptance by their own judge "
             "(degenerate · off topic in brackets), and the largest move of another persona's judge from the base's.",
             "", "| user | " + " | ".join(CHOOSERS) + " |", "|---|" + "---|" * len(CHOOSERS)]
    base = next((r for r in res["rows"] if r["user"] == "base"), None)
    for r in res["rows"]:
        if r["persona"] is None:
            continue
        cells = []
        for c in CHOOSERS:
            acc = f"{100 * r['accept'][c][r['persona']]:.0f}%"
            if c != "oracle":
                acc += f" ({100 * r['degenerate'][c]:.0f} · {100 * r['off_topic'][c]:.0f})"
                if base is not None:
                    others = [abs(v - base["accept"]["greedy"][n]) for n, v in r["accept"][c].items() if n != r["persona"]]
                    acc += f", others ±{100 * max(others, default=0):.0f}"
            cells.append(acc)
        lines.append(f"| {r['user']} v{r['version']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retally(res: dict) -> dict:
    """``res`` with every chooser judged again from its saved candidates (a chooser added since: no model needed)."""
    from bench.personas import get

    for row in res["rows"]:
        if any("tokens" not in a and "picks" not in a for a in row["answers"]):
            raise SystemExit(f"{row['user']}: answers saved with neither scores nor picks: rerun with --data-dir")
        verdict = tally(row["answers"], {n: get(n) for n in row["accept"]["greedy"]})
        for a, p in zip(row["answers"], verdict.pop("picks")):
            a["picks"] = p
        row.update(verdict)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench rerank", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="a kept run: the folder given to `heed bench personalize --data-dir`")
    p.add_argument("--retally", metavar="FILE", help="instead: judge every chooser again from a result file's saved answers")
    p.add_argument("--config", help="the Heed config the run used (default: configs/default.yaml, or configs/tiny.yaml with --quick)")
    p.add_argument("--bench-config", help="the bench YAML the run used (its personas and held-out prompts)")
    p.add_argument("--k", type=int, default=4, help="answers per prompt: greedy and k-1 samples")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the k-1 samples")
    p.add_argument("--quick", action="store_true", help="the run was `heed bench personalize --quick`")
    p.add_argument("--out", default=str(RESULTS / "rerank.json"))
    args = p.parse_args(argv)
    if bool(args.data_dir) == bool(args.retally):
        p.error("give --data-dir (answer and judge) or --retally FILE (judge saved answers again)")
    if args.retally:
        res = retally(json.loads(Path(args.retally).read_text()))
    else:
        res = rerank(Path(args.data_dir), k=args.k, bench_config=args.bench_config, config_path=args.config, quick=args.quick,
                     temperature=args.temperature)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(f"# Best of {res['k']}: {res['data_dir']}\n\n" + summary_md(res) + "\n")
    print(summary_md(res))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
