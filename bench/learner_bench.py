"""Learner benchmarks (results in a file; not timed tests).

- seconds per pair: a learner run (``learn_user``: pairs, load, train, save, promote;
  the gate's time taken out) against a plain TRL DPOTrainer script training the same
  pairs on the same model with the same hyperparameters. Goal <= 1.1x.
- peak memory (ru_maxrss) of the learner run, gate included, against the plain
  script. Goal <= 1.2x.
- run time at 10x the user's history with the same new feedback (replay and the
  gate's held-out set are bounded, so the cost should not grow). Goal <= 1.3x.
  The history was learned by a run whose gate judged the adapter on the held-out
  set of its day and kept what it answered and scored, as every promoted run
  does; the measured run reuses that as it would for a real user.
- time from the last feedback event to the promoted adapter, for ``events`` new
  edits of a new user, gate included.

Every measurement runs in its own subprocess (so ru_maxrss is that run's own
peak), with the config's explicit torch thread count; the kinds are interleaved
and each figure is the median of ``repeats`` runs because the machine is noisy.
Run it alone: ``flock /tmp/heed-heavy.lock python -m bench.learner_bench``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
GOALS = {"learner_s_per_pair_ratio": 1.1, "learner_peak_rss_ratio": 1.2, "history_10x_time_ratio": 1.3}

_FILLER = [
    "There are several things worth knowing before you start.",
    "Most people find that a little preparation goes a long way here.",
    "It also helps to think about the tools and time you have available.",
    "Different sources give slightly different advice, so take this as a general guide.",
    "If something does not work the first time, it is fine to adjust and try again.",
    "Safety matters too, so follow the usual precautions and read any labels.",
    "Many people also ask a friend or look for a short video that shows each step.",
    "In the end, what works best depends on your own situation and preferences.",
]


def synthetic_events(n: int, *, offset: int = 0) -> list[tuple[str, str, str]]:
    """(question, the model-like long answer, the user's brief edit) for n events: deterministic text."""
    from bench.prompts import PROMPTS

    out = []
    for i in range(offset, offset + n):
        q = PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (take {i // len(PROMPTS) + 1})")
        topic = q.rstrip("?").split(" ", 2)[-1]
        long = f"Here is a detailed answer about {topic}. " + " ".join(_FILLER[(i + k) % len(_FILLER)] for k in range(6))
        brief = f"In brief: {topic} takes a little preparation; start small and adjust as you go."
        out.append((q, long, brief))
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the children: one measurement per process ---------------------------------------------------
def child_plain(spec: dict) -> dict:
    """A plain TRL script: load the model, DPOTrainer with a LoRA, train, save. Same pairs and hyperparameters."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from heed.config import load_config
    from heed.hardware import learner_config, pick_device_dtype
    from learner.train import _epochs  # the same number of passes the learner makes (min_steps)

    config = load_config(spec["config"], overrides=spec["overrides"])
    lc = config.learner
    torch.set_num_threads(spec["threads"])
    device, dtype = pick_device_dtype(learner_config(config).model)
    cuda = device.startswith("cuda")
    system = config.generation.system_prompt
    rows = [{"prompt": [{"role": "system", "content": system}, {"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}
            for q, bad, good in synthetic_events(spec["events"])]
    # The same loss terms the learner is configured with (its SFT term included).
    losses = ([] if lc.dpo_loss == "none" else [lc.dpo_loss]) + (["sft"] if lc.sft_weight > 0 else [])
    weights = ([] if lc.dpo_loss == "none" else [1.0]) + ([lc.sft_weight] if lc.sft_weight > 0 else [])
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device)
    args = DPOConfig(output_dir=spec["work"] + "/plain-trainer", per_device_train_batch_size=min(lc.batch_size, len(rows)),
                     num_train_epochs=_epochs(len(rows), config),
                     learning_rate=lc.learning_rate, beta=lc.beta, max_length=lc.max_length, seed=lc.seed,
                     bf16=dtype == torch.bfloat16 or (cuda and torch.cuda.is_bf16_supported()), gradient_checkpointing=False, activation_checkpointing=False,
                     use_cpu=not cuda, report_to="none",
                     save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                     loss_type=losses, loss_weights=weights)
    lora = LoraConfig(r=lc.lora_r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora)
    trainer.train()
    trainer.model.save_pretrained(spec["work"] + "/plain-adapter")
    return {"seconds": time.perf_counter() - t0, "pairs": len(rows), "steps": trainer.state.global_step}


def _seed_user(heed, uid: int, events: list[tuple[str, str, str]]) -> float:
    """Each event: a conversation, the long answer, the user's edit (through the service). Returns the last edit's time."""
    store = heed.store
    last = 0.0
    for q, long, brief in events:
        conv = store.create_conversation(user_id=uid)
        store.add_message(user_id=uid, conversation_id=conv, role="user", content=q)
        mid = store.add_message(user_id=uid, conversation_id=conv, role="assistant", content=long)
        heed.edit(uid, mid, brief)
        last = time.time()
    return last


def _consume_history(config, store, uid: int, adapter: str) -> None:
    """Mark the user's feedback as learned by an earlier promoted run with ``adapter`` active (no training)."""
    from learner.pairs import build_examples

    feedback = store.list_feedback(user_id=uid, unconsumed_only=True)
    examples = build_examples(store, user_id=uid, feedback=feedback, heldout_fraction=config.learner.heldout_fraction,
                              seed=config.learner.seed, edit_weight=config.learner.edit_weight)
    folder = config.adapters_path / str(uid) / "v0001"
    shutil.copytree(adapter, folder)
    holder = store.new_lease_holder("bench")
    store.acquire_lease(user_id=uid, holder=holder, seconds=600)
    run_id = store.start_run(user_id=uid, trigger="bench-history")
    store.promote(user_id=uid, run_id=run_id, holder=holder, version=1, path=str(folder), feedback_ids=[f["id"] for f in feedback],
                  pairs=examples, metrics={"feedback_read_at": time.time()})
    store.finish_run(user_id=uid, run_id=run_id, status="promoted", n_feedback=len(feedback), n_pairs=len(examples), candidate_version=1)
    store.release_lease(user_id=uid, holder=holder)
    _judge_as_promoted(config, store, uid, folder)


def _judge_as_promoted(config, store, uid: int, folder: Path) -> None:
    """The gate of the run that promoted ``folder``: its held-out set then (the newest first, bounded), against the base."""
    from learner.gate import evaluate

    heldout = [p for p in store.list_pairs(user_id=uid, split="heldout") if p["kind"] != "sft"][::-1]
    evaluate(config, candidate_dir=str(folder), active_dir=None, heldout=heldout[:config.learner.gate_max_contexts])


def child_learner(spec: dict) -> dict:
    """A learner run through learn_user on a fresh store: ``history`` old events (already learned) + ``events`` new ones."""
    import torch

    from heed.config import load_config
    from heed.service import Heed
    from learner.run import learn_user

    config = load_config(spec["config"], overrides=spec["overrides"])
    torch.set_num_threads(spec["threads"])
    # The plain script imports trl before its clock starts; so does this one (a scheduler imports it once).
    import trl  # noqa: F401
    from trl import DPOTrainer, KTOTrainer  # noqa: F401
    heed = Heed(config)
    uid = heed.add_user("bench", "bench-password")
    if spec.get("history"):
        _seed_user(heed, uid, synthetic_events(spec["history"], offset=spec["events"]))
        _consume_history(config, heed.store, uid, spec["adapter"])
    last_feedback = _seed_user(heed, uid, synthetic_events(spec["events"]))
    t0 = time.perf_counter()
    result = learn_user(config, heed.store, user_id=uid, trigger="bench")
    seconds = time.perf_counter() - t0
    if result["status"] not in ("promoted", "rejected"):
        raise RuntimeError(f"learner run {result['status']}: {result.get('error') or result.get('reason')}")
    version = heed.store.list_adapters(user_id=uid)[0]
    run = heed.store.list_runs(user_id=uid)[0]["metrics"]
    return {"seconds": seconds, "seconds_without_gate": seconds - run.get("gate_s", 0.0), "status": result["status"],
            "pairs": run["dpo_rows"], "steps": run.get("dpo_steps"), "n_replay": result["n_replay"], "timings": result.get("timings"),
            "feedback_to_adapter_s": (version["activated_at"] or version["created_at"]) - last_feedback,
            "adapter": version["path"], "gate": {k: v for k, v in (result.get("gate") or {}).items() if k != "samples"},
            "attempts": result.get("attempts")}


def _child_main(kind: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    fn = {"plain": child_plain, "learner": child_learner}[kind]
    out = fn(spec)
    out["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _run_child(kind: str, spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.learner_bench", "--child", kind, "--spec", json.dumps(spec)],
                          cwd=REPO, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} benchmark child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run_learner_bench(config_path: str, out: str | os.PathLike, *, repeats: int = 3, events: int = 16, history_factor: int = 10,
                      say=print) -> dict:
    """Run every learner benchmark on ``config_path``'s model; write and return the results.

    Keys other tools read: learner_s_per_pair_ratio, learner_peak_rss_ratio,
    history_10x_time_ratio, feedback_to_promoted_s (all medians).
    """
    from heed.config import load_config
    from heed.models import resolve_model
    from learner.train import torch_threads

    first = load_config(config_path)
    model = str(resolve_model(first))
    threads = torch_threads(first)
    work = Path(tempfile.mkdtemp(prefix="heed-learner-bench-"))
    t_start = time.time()
    runs: dict[str, list[dict]] = {"plain": [], "learner": [], "history_1x": [], "history_10x": []}
    try:
        def spec(tag: str, r: int, **extra) -> dict:
            d = work / f"{tag}-{r}"
            # Held-out 0 and no replay for a new user: the learner trains exactly the plain script's pairs.
            learner = {"min_new_feedback": 1, "heldout_fraction": 0.0} if tag in ("plain", "learner") else {"min_new_feedback": 1}
            return {"config": str(config_path), "model": model, "threads": threads, "events": events, "work": str(d),
                    "overrides": {"data_dir": str(d), "model": {"name_or_path": model, "torch_threads": threads}, "learner": learner},
                    **extra}

        for r in range(repeats):
            say(f"learner bench: round {r + 1}/{repeats} (plain TRL, learner, history 1x, history {history_factor}x)")
            runs["plain"].append(_run_child("plain", spec("plain", r)))
            runs["learner"].append(_run_child("learner", spec("learner", r)))
            adapter = runs["learner"][-1]["adapter"]
            runs["history_1x"].append(_run_child("learner", spec("h1", r, history=events, adapter=adapter)))
            runs["history_10x"].append(_run_child("learner", spec("h10", r, history=events * history_factor, adapter=adapter)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    plain_s = _median(runs["plain"], "seconds") / runs["plain"][0]["pairs"]
    learner_s = _median(runs["learner"], "seconds_without_gate") / runs["learner"][0]["pairs"]
    res = {
        "config_file": str(config_path), "model": Path(model).name, "torch_threads": threads, "repeats": repeats, "events": events,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
        "plain_s_per_pair": plain_s, "learner_s_per_pair": learner_s,
        "learner_s_per_pair_ratio": learner_s / plain_s,
        "plain_peak_rss_mb": _median(runs["plain"], "peak_rss_mb"),
        "learner_peak_rss_mb": _median(runs["learner"], "peak_rss_mb"),
        "learner_peak_rss_ratio": _median(runs["learner"], "peak_rss_mb") / _median(runs["plain"], "peak_rss_mb"),
        "history_1x_s": _median(runs["history_1x"], "seconds"),
        "history_10x_s": _median(runs["history_10x"], "seconds"),
        "history_10x_time_ratio": _median(runs["history_10x"], "seconds") / _median(runs["history_1x"], "seconds"),
        "feedback_to_promoted_s": _median(runs["learner"], "feedback_to_adapter_s"),
        "learner_run_s": _median(runs["learner"], "seconds"),
        "runs": runs, "minutes": round((time.time() - t_start) / 60, 1),
    }
    res["goals"] = {k: {"goal": g, "value": res[k], "met": res[k] <= g} for k, g in GOALS.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.learner_bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml", help="Heed YAML config whose model and learner settings are measured")
    p.add_argument("--out", default=str(RESULTS / "learner.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--events", type=int, default=16, help="new feedback events (edits) per run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child_main(args.child, args.spec)
    res = run_learner_bench(args.config, args.out, repeats=args.repeats, events=args.events)
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
