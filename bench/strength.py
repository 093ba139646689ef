"""Each user's adapter served stronger or weaker: does scaling the learned LoRA delta lift acceptance?

A LoRA adapter adds ``s·B·A`` to a layer's weights, ``s = lora_alpha / r``. Serving it
with ``γ·s`` moves every answer further along the direction the user's feedback
taught (γ > 1) or back towards the base (γ < 1) at no cost per token. This replays
a kept run: each user's active adapter, copied with ``lora_alpha`` times γ for every
γ given, answers the benchmark's held-out prompts greedily, exactly as the benchmark
does, and every persona's judge rates them. γ = 1 is the run's own figure. No choice
sees a judge; the table shows what each γ does to every persona, so that one γ for
everyone can be judged on all of them at once. Run it alone (it generates with the model):
``heed bench strength --data-dir D [--scales 1,1.5,2] [--bench-config bench/seed1.yaml] [--out bench/results/strength.json]``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.gate_audit import _persona_of

RESULTS = Path(__file__).resolve().parent / "results"


def scaled_copy(src: Path, dst: Path, gamma: float) -> Path:
    """``src``'s adapter with its LoRA delta times ``gamma`` (its ``lora_alpha`` and any per-module alpha scaled)."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise SystemExit(f"{src}: a DoRA adapter's delta does not scale with lora_alpha")
    cfg["lora_alpha"] = cfg["lora_alpha"] * gamma
    cfg["alpha_pattern"] = {k: v * gamma for k, v in (cfg.get("alpha_pattern") or {}).items()}
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    for weights in src.glob("adapter_model.*"):
        shutil.copyfile(weights, dst / weights.name)
    return dst


def strength(data_dir: Path, *, scales: list[float], bench_config: str | None = None, config_path: str | None = None,
             quick: bool = False, say=print) -> dict:
    from bench.kept_run import active_adapter, held_out_chats, open_kept_run, simulated_users
    from bench.personalize import judge
    from bench.personas import get
    from heed.engine import AdapterRef

    if not scales or any(not 0 < g <= 10 for g in scales):
        raise SystemExit("--scales must be numbers in (0, 10]")
    run = open_kept_run(data_dir, bench_config=bench_config, config_path=config_path, quick=quick)
    bench, prompts, config, engine, heed = run.bench, run.prompts, run.config, run.engine, run.heed
    judges = {n: get(n) for n in dict.fromkeys([*bench.personas, *bench.kind_personas])}
    scratch = Path(tempfile.mkdtemp(prefix="heed-strength-"))
    try:
        subjects = [("base", None, None, 0, None, None)]  # (user, uid, persona, version, gamma, adapter)
        for uid, name in simulated_users(heed.store):
            active = active_adapter(heed.store, uid)
            if active is None:
                continue
            for g in scales:
                path = Path(active["path"]) if g == 1 else scaled_copy(Path(active["path"]), scratch / f"u{uid}-{g}", g)
                subjects.append((name, uid, _persona_of(name), active["version"], g, AdapterRef(f"strength-u{uid}-x{g:g}".replace(".", "_"), str(path))))
        gen = replace(config.generation, do_sample=False)
        chats, refs = [], []
        for _, uid, _, _, _, ref in subjects:
            chats += held_out_chats(heed, uid, prompts, config.generation.system_prompt)
            refs += [ref] * len(prompts)
        t0 = time.perf_counter()
        out = engine.generate_batch(chats, adapters=refs, max_new_tokens=bench.eval_max_new_tokens, gen=gen,
                                    with_finish=True, batch=bench.eval_batch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n, rows = len(prompts), []
    for k, (name, _, persona, version, g, _) in enumerate(subjects):
        answers = out[k * n:(k + 1) * n]
        m = judge(answers, prompts, judges)
        row = {"user": name, "persona": persona, "version": version, "scale": g, "accept": m["accept"][persona] if persona else None,
               "accept_by": m["accept"], "style_only": m["style_only"].get(persona) if persona else None, "degenerate": m["degenerate"],
               "off_topic": m["off_topic"], "templated": m["templated"], "mean_words": round(m["mean_words"], 1)}
        say(json.dumps(row))
        rows.append({**row, "answers": [{"prompt": q, "answer": t, "finished": f} for q, (t, f) in zip(prompts, answers)]})
    return {"data_dir": str(data_dir), "scales": scales, "n_heldout_prompts": n, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def others_move(row: dict, base: dict) -> float:
    """The largest move of another persona's judge from its rate on the base model's answers."""
    return max((abs(v - base["accept_by"][p]) for p, v in row["accept_by"].items() if p != row["persona"]), default=0.0)


def summary_md(res: dict) -> str:
    base = next(r for r in res["rows"] if r["user"] == "base")
    by = {(r["user"], r["scale"]): r for r in res["rows"] if r["persona"]}
    users = list(dict.fromkeys(r["user"] for r in res["rows"] if r["persona"]))
    lines = [f"{res['n_heldout_prompts']} held-out prompts, greedy. Each cell: acceptance by the user's own judge "
             "(degenerate · off topic · templated), and the largest move of another persona's judge from the base's.", "",
             "| user | " + " | ".join(f"γ = {g:g}" for g in res["scales"]) + " |", "|---|" + "---|" * len(res["scales"])]
    for u in users:
        cells = []
        for g in res["scales"]:
            r = by[(u, g)]
            cells.append(f"{100 * r['accept']:.0f}% ({100 * r['degenerate']:.0f} · {100 * r['off_topic']:.0f} · "
                         f"{100 * r['templated']:.0f}), others ±{100 * others_move(r, base):.0f}")
        lines.append(f"| {u} v{by[(u, res['scales'][0])]['version']} | " + " | ".join(cells) + " |")
    means = [sum(by[(u, g)]["accept"] for u in users) / max(len(users), 1) for g in res["scales"]]
    lines.append("| mean | " + " | ".join(f"{100 * m:.0f}%" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench strength", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="a kept run: the folder given to `heed bench personalize --data-dir`")
    p.add_argument("--config", help="the Heed config the run used (default: configs/default.yaml, or configs/tiny.yaml with --quick)")
    p.add_argument("--bench-config", help="the bench YAML the run used (its personas and held-out prompts)")
    p.add_argument("--scales", default="1,1.5,2", help="comma-separated multipliers of each adapter's LoRA delta (1: as trained)")
    p.add_argument("--quick", action="store_true", help="the run was `heed bench personalize --quick`")
    p.add_argument("--out", default=str(RESULTS / "strength.json"))
    args = p.parse_args(argv)
    try:
        scales = list(dict.fromkeys(float(s) for s in args.scales.split(",") if s.strip()))
    except ValueError:
        raise SystemExit(f"--scales: not a comma-separated list of numbers: {args.scales!r}") from None
    res = strength(Path(args.data_dir), scales=scales, bench_config=args.bench_config, config_path=args.config, quick=args.quick)
    out = Path(args.out)
    answers = out.with_name(out.stem + "_answers.jsonl")
    with answers.open("w", encoding="utf-8") as f:
        for r in res["rows"]:
            for a in r["answers"]:
                f.write(json.dumps({"user": r["user"], "scale": r["scale"], **a}) + "\n")
    out.write_text(json.dumps({**res, "rows": [{k: v for k, v in r.items() if k != "answers"} for r in res["rows"]]}, indent=1))
    out.with_suffix(".md").write_text(f"# Adapter strength: {args.data_dir}\n\n" + summary_md(res) + "\n")
    print(summary_md(res))
    print(f"wrote {out}, {out.with_suffix('.md')} and {answers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
