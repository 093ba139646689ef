"""Judge a kept personalization run's adapters again, under other generation settings.

A decoding change (the repetition penalty's scope, a token limit, a system
prompt) changes what every adapter says, and a full `heed bench personalize`
run measures it only through retrained adapters that took another path: the
draw's own spread hides the change. This replays the held-out check on the
*same* adapters: for each config given, the base model and every adapter
version a simulated user ever had (promoted ones; ``--all`` adds the refused),
answering the benchmark's held-out prompts exactly as the benchmark does, judged
by every persona of the run. The first config should reproduce the run's own
figures (same adapters, same decoding; answers do not depend on their batch-mates,
docs/MEASUREMENTS.md, "Runs reproduce"): given the run's result file, the tool checks that,
version by version, and says where it does not.

A variant is a bench config: its ``generation`` overrides apply (decoding, the
system prompt, the context budget); its personas, held-out prompts and answer
length (``eval_max_new_tokens``) must be the run's. ``heed bench personalize --data-dir D``
(or ``--keep``) keeps the run in D; then
``heed bench rejudge --data-dir D --bench-config bench/seed1.yaml --bench-config bench/answer_penalty.yaml``.
Run it alone (it generates with the model).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from bench.gate_audit import _persona_of

RESULTS = Path(__file__).resolve().parent / "results"


def _versions(store, user_id: int, *, everything: bool) -> list[dict]:
    keep = ("active", "retired", "rejected") if everything else ("active", "retired")
    return [a for a in sorted(store.list_adapters(user_id=user_id), key=lambda a: a["version"]) if a["status"] in keep]


def rejudge(data_dir: Path, variants: list[str | None], *, config_path: str | None = None, quick: bool = False,
            everything: bool = False, say=print) -> dict:
    """``variants``: bench configs (None: the preset) whose generation settings each replay decodes with; the first is the run's."""
    from bench.kept_run import held_out_chats, simulated_users
    from bench.personalize import heed_config, judge
    from bench.personas import get
    from bench.prompts import split
    from bench.settings import load_bench_config
    from heed.engine import AdapterRef, Engine, load_base, set_threads
    from heed.service import Heed

    benches = [load_bench_config(v, quick=quick) for v in variants]
    bench = benches[0]
    for v, b in zip(variants[1:], benches[1:]):
        if (b.personas, b.kind_personas, b.heldout_every, b.max_heldout, b.eval_max_new_tokens) != \
                (bench.personas, bench.kind_personas, bench.heldout_every, bench.max_heldout, bench.eval_max_new_tokens):
            raise SystemExit(f"{v}: another set of personas or held-out prompts than {variants[0]}: only generation settings may differ")
    _, prompts = split(heldout_every=bench.heldout_every)
    prompts = prompts[:bench.max_heldout] if bench.max_heldout else prompts
    judges = {n: get(n) for n in dict.fromkeys([*bench.personas, *bench.kind_personas])}
    configs = [heed_config(config_path, quick=quick, bench=b, data_dir=str(data_dir), kept=True)[0] for b in benches]
    labels = [v or "preset" for v in variants]
    set_threads(configs[0].model.torch_threads)
    model, tok = load_base(configs[0])
    engine = Engine(model, tok, model_cfg=configs[0].model, gen_cfg=configs[0].generation)
    heeds = [Heed(c, engine=engine) for c in configs]  # each variant's system prompt, with the user's standing notes
    heed = heeds[0]
    users = simulated_users(heed.store)
    # (label, user, persona, version, status, adapter): the base model first.
    subjects = [("base", None, None, 0, "base", None)]
    missing = []
    for uid, name in users:
        for a in _versions(heed.store, uid, everything=everything):
            if os.path.isdir(a["path"]):
                subjects.append((name, uid, _persona_of(name), a["version"], a["status"], AdapterRef(f"rejudge-u{uid}v{a['version']}", a["path"])))
            else:
                missing.append(f"{name} v{a['version']}")
    if missing:
        say("not replayed (folder gone, e.g. pruned): " + ", ".join(missing))
    rows, t0 = [], time.perf_counter()
    for path, config, h in zip(labels, configs, heeds):
        gen = replace(config.generation, do_sample=False)
        engine.gen_cfg = config.generation  # the prompt's context budget is the engine's
        chats, refs = [], []
        for _, uid, _, _, _, ref in subjects:
            chats += held_out_chats(h, uid, prompts, config.generation.system_prompt)
            refs += [ref] * len(prompts)
        t = time.perf_counter()
        out = engine.generate_batch(chats, adapters=refs, max_new_tokens=bench.eval_max_new_tokens, gen=gen,
                                    with_finish=True, batch=bench.eval_batch)
        n = len(prompts)
        for k, (name, _, persona, version, status, _) in enumerate(subjects):
            answers = out[k * n:(k + 1) * n]
            m = judge(answers, prompts, judges)
            row = {"config": path, "user": name, "persona": persona, "version": version, "status": status,
                   "accept": m["accept"][persona] if persona else None, "accept_by": m["accept"], "degenerate": m["degenerate"],
                   "off_topic": m["off_topic"], "mean_words": round(m["mean_words"], 1)}
            say(json.dumps(row))
            rows.append({**row, "answers": [{"prompt": q, "answer": t, "finished": f} for q, (t, f) in zip(prompts, answers)]})
        say(f"{path}: {len(subjects)} answer sets in {time.perf_counter() - t:.0f} s")
    return {"data_dir": str(data_dir), "configs": labels, "not_replayed": missing, "generation": {p: c.generation.__dict__ for p, c in zip(labels, configs)},
            "n_heldout_prompts": len(prompts), "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def served_at_checkpoints(run: dict) -> dict[tuple[str, int], int]:
    """{(user name, adapter version): checkpoint} for every version a run's checkpoint was judged with."""
    out = {}
    for key, track in (run.get("tracks") or {}).items():
        version = None
        for p in track["points"][1:]:
            learn = p.get("learn") or {}
            if learn.get("status") == "promoted":
                version = learn.get("version")
            if version is not None:
                out.setdefault((key.replace("/", "-"), version), p["checkpoint"])
    return out


def run_mismatches(res: dict, run: dict) -> list[str]:
    """Where the first config's replay of a version differs from the run's own figure for it (should be nowhere)."""
    first = res["configs"][0]
    out = []
    for (user, version), cp in served_at_checkpoints(run).items():
        row = next((r for r in res["rows"] if r["config"] == first and r["user"] == user and r["version"] == version), None)
        point = next(p for p in run["tracks"][user.replace("-", "/", 1)]["points"][1:] if p["checkpoint"] == cp)
        if row is None:
            out.append(f"{user} v{version}: not replayed")
        elif abs(row["accept"] - point["accept"][row["persona"]]) > 1e-9:
            out.append(f"{user} v{version}: {row['accept']:.3f} replayed, {point['accept'][row['persona']]:.3f} in the run")
    return out


def compare_md(res: dict, run: dict | None = None) -> str:
    """Each adapter version's acceptance under every config, side by side, with the run's own figure where it had one."""
    cfgs = res["configs"]
    by = {(r["config"], r["user"], r["version"]): r for r in res["rows"]}
    subjects = list(dict.fromkeys((r["user"], r["persona"], r["version"], r["status"]) for r in res["rows"]))
    judged = served_at_checkpoints(run) if run else {}
    lines = ["| user | version | " + " | ".join(f"`{c}`: accepted · degenerate · off topic · words" for c in cfgs) + " | in the run |",
             "|---|---|" + "---|" * len(cfgs) + "---|"]
    for user, persona, version, status in subjects:
        cells = []
        for c in cfgs:
            r = by[(c, user, version)]
            acc = r["accept"] if persona else max(r["accept_by"].values(), default=0.0)
            cells.append(f"{100 * acc:.0f}% · {100 * r['degenerate']:.0f}% · {100 * r['off_topic']:.0f}% · {r['mean_words']:.0f}")
        seen = ""
        if (user, version) in judged:
            cp = judged[(user, version)]
            point = next(p for p in run["tracks"][user.replace("-", "/", 1)]["points"][1:] if p["checkpoint"] == cp)
            seen = f"{100 * point['accept'][persona]:.0f}% @{point['events']}"
        label = f"v{version} ({status})" if persona else "base (best judge)"
        lines.append(f"| {user} | {label} | " + " | ".join(cells) + f" | {seen} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench rejudge", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="a kept run: the folder given to `heed bench personalize --data-dir`")
    p.add_argument("--config", help="the Heed config the run used (default: configs/default.yaml, or configs/tiny.yaml with --quick)")
    p.add_argument("--bench-config", action="append", default=None,
                   help="a bench YAML whose generation settings to decode with (repeat; the first is the run's own; none: the preset)")
    p.add_argument("--run", help="the run's result JSON, to set its own figures beside the replayed ones")
    p.add_argument("--all", action="store_true", help="refused versions too, not only promoted ones")
    p.add_argument("--quick", action="store_true", help="the run was `heed bench personalize --quick`")
    p.add_argument("--out", default=str(RESULTS / "rejudge.json"))
    args = p.parse_args(argv)
    res = rejudge(Path(args.data_dir), args.bench_config or [None], config_path=args.config, quick=args.quick, everything=args.all)
    run = json.loads(Path(args.run).read_text()) if args.run else None
    if run is not None:
        res["run_mismatches"] = run_mismatches(res, run)
        for line in res["run_mismatches"]:
            print(f"warning: not the run's own figure: {line}")
    out = Path(args.out)
    answers = out.with_name(out.stem + "_answers.jsonl")
    with answers.open("w", encoding="utf-8") as f:
        for r in res["rows"]:
            for a in r["answers"]:
                f.write(json.dumps({"config": r["config"], "user": r["user"], "version": r["version"], **a}) + "\n")
    out.write_text(json.dumps({**res, "rows": [{k: v for k, v in r.items() if k != "answers"} for r in res["rows"]]}, indent=1))
    out.with_suffix(".md").write_text(f"# Rejudged: {args.data_dir}\n\n" + compare_md(res, run) + "\n")
    print(f"wrote {out}, {out.with_suffix('.md')} and {answers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
