"""One learner run for one user: lease -> pairs -> train -> gate -> rename -> one transaction.

Crash safety: the adapter is written to a temp folder beside its final place,
renamed into place, and only then does one store transaction record the
version, switch the active one and mark the feedback consumed. A crash before
that transaction leaves the old adapter active and the feedback unconsumed; the
next run takes over the dead run's lease, marks its row failed, removes its
leftovers and trains again.

The ``fault`` hook is called with the name of each step (``before_train``,
``before_save``, ``after_save``, ``before_rename``, ``before_commit``,
``after_commit``) so tests can crash a run there.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import random
import re
import shutil
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

from heed.config import HeedConfig
from heed.store import Store, StoreError

from .pairs import build_examples, counts
from .shrink import shrink_step

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Fault = Callable[[str], None]

_VERSION_DIR = re.compile(r"^v(\d+)$")
# Share of the progress bar each stage fills; one bar per run.
_STAGES = {"pairs": (0.0, 0.03), "load": (0.03, 0.06), "train": (0.06, 0.75), "gate": (0.75, 0.99)}


def user_dir(config: HeedConfig, user_id: int) -> Path:
    return config.adapters_path / str(user_id)


def clean_leftovers(config: HeedConfig, store: Store, *, user_id: int) -> list[str]:
    """Remove temp folders and version folders no store row knows (from crashed runs).

    Call only while holding the user's lease: a live run's temp folder is not a leftover.
    """
    folder = user_dir(config, user_id)
    if not folder.is_dir():
        return []
    known = {Path(a["path"]).name for a in store.list_adapters(user_id=user_id) if a["status"] != "deleted"}
    removed = []
    for child in folder.iterdir():
        if child.name.startswith(".tmp-") or (_VERSION_DIR.match(child.name) and child.name not in known):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def sweep_leftovers(config: HeedConfig, store: Store) -> dict[int, list[str]]:
    """On start: clean every user's leftovers whose lease is free (busy users are left to their run)."""
    removed: dict[int, list[str]] = {}
    if not config.adapters_path.is_dir():
        return removed
    holder = store.new_lease_holder("sweep")
    for child in config.adapters_path.iterdir():
        if not child.name.isdigit():
            continue
        uid = int(child.name)
        if store.acquire_lease(user_id=uid, holder=holder, seconds=60):
            try:
                store.fail_interrupted_runs(user_id=uid)
                if gone := clean_leftovers(config, store, user_id=uid):
                    removed[uid] = gone
            finally:
                store.release_lease(user_id=uid, holder=holder)
    return removed


def prune_versions(config: HeedConfig, store: Store, *, user_id: int) -> list[int]:
    """Keep the newest ``keep_versions`` version folders plus the active one."""
    keep = config.learner.keep_versions
    rows = [a for a in store.list_adapters(user_id=user_id) if a["status"] != "deleted"]
    pruned = []
    for a in rows[keep:]:
        if a["status"] == "active":
            continue
        store.mark_adapter_deleted(user_id=user_id, version=a["version"])
        shutil.rmtree(a["path"], ignore_errors=True)
        pruned.append(a["version"])
    return pruned


def _next_version(config: HeedConfig, store: Store, user_id: int) -> int:
    on_disk = [int(m.group(1)) for c in user_dir(config, user_id).glob("v*") if (m := _VERSION_DIR.match(c.name))]
    return max([store.next_adapter_version(user_id=user_id) - 1, *on_disk, 0]) + 1


def release_freed_memory() -> bool:
    """Give the heap the trainer freed back to the OS before the gate loads its own copy of the model.

    glibc keeps freed blocks for this process to reuse, and the gate's fp32 copy and its batch landed
    beside them: on the embedded model (bf16 training, ``heed bench perf --only learner``) a 16-edit run
    peaked at 1.26x a plain TRL script's memory without this, 1.13x with it, in the same time. False where there is
    no glibc ``malloc_trim`` (macOS, musl): nothing is lost there but memory.
    """
    if platform.system() != "Linux":
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def only_praise(examples: list[dict]) -> bool:
    """Do these (new, trainable) examples only approve answers: desirable KTO examples, no pair, nothing bad?"""
    return bool(examples) and all(e["kind"] == "kto" and e.get("label") for e in examples)


def replay_sample(store: Store, *, user_id: int, exclude: set[int], size: int, seed: int) -> list[dict]:
    """A bounded random sample of older training examples from promoted runs (no forgetting, bounded cost)."""
    old = store.replay_pool(user_id=user_id, exclude_feedback=exclude)
    rng = random.Random(f"{seed}:{user_id}:{len(old)}")
    return old if len(old) <= size else rng.sample(old, size)


def _stage_progress(progress: Progress | None) -> Progress | None:
    if progress is None:
        return None

    def show(stage: str, frac: float) -> None:
        lo, hi = _STAGES.get(stage, (1.0, 1.0))
        progress(stage, lo + (hi - lo) * max(0.0, min(1.0, frac)))

    return show


def learn_user(config: HeedConfig, store: Store, *, user_id: int, trigger: str = "manual",
               progress: Progress | None = None, fault: Fault | None = None) -> dict:
    """Run the learner for one user. Returns a summary dict with ``status``:
    'busy' (another run holds the user), 'skipped' (not enough to train on),
    'promoted', 'rejected' or 'failed'."""
    lc = config.learner
    holder = store.new_lease_holder(trigger)
    if not store.acquire_lease(user_id=user_id, holder=holder, seconds=lc.lease_seconds):
        return {"status": "busy", "user_id": user_id, "reason": "another learner run is training this user"}
    show = _stage_progress(progress)
    step = fault or (lambda point: None)
    run_id, tmp, summary, committed = None, None, {"user_id": user_id}, None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def keepalive() -> bool:
        return store.renew_lease(user_id=user_id, holder=holder, seconds=lc.lease_seconds)

    try:
        store.fail_interrupted_runs(user_id=user_id)
        clean_leftovers(config, store, user_id=user_id)
        read_at = time.time()
        feedback = store.list_feedback(user_id=user_id, unconsumed_only=True)
        if len(feedback) < lc.min_new_feedback:
            return {"status": "skipped", "user_id": user_id, "reason": f"{len(feedback)} new feedback events (< {lc.min_new_feedback})"}
        if show:
            show("pairs", 0.0)
        fb_ids = [f["id"] for f in feedback]
        examples = build_examples(store, user_id=user_id, feedback=feedback, heldout_fraction=lc.heldout_fraction,
                                  seed=lc.seed, all_feedback=store.list_feedback(user_id=user_id), edit_weight=lc.edit_weight)
        new_train = [e for e in examples if e["split"] == "train" and e["kind"] in ("dpo", "kto")]
        # A refused candidate's examples are still the user's word: they train once more, with this run's (without
        # it a refused run threw the user's edits away; in the benchmark, one left the next run only thumbs-down).
        carried = store.unlearned_pairs(user_id=user_id, exclude_feedback=set(fb_ids))
        replay = replay_sample(store, user_id=user_id, exclude=set(fb_ids), size=lc.replay_size, seed=lc.seed + max(fb_ids))
        dpo = [e for e in new_train + carried + replay if e["kind"] == "dpo"]
        kto = [e for e in new_train + carried + replay if e["kind"] == "kto"] if lc.unpaired == "kto" else []
        # The gate's held-out set: this run's first, then the newest older ones; bounded, so the gate's cost
        # does not grow with the user's history. (sft examples repeat the pairs' chosen answers.)
        heldout = [e for e in examples if e["split"] == "heldout" and e["kind"] != "sft"]
        older = [p for p in store.list_pairs(user_id=user_id, split="heldout") if p["feedback_id"] not in set(fb_ids) and p["kind"] != "sft"]
        heldout = (heldout + older[::-1])[:lc.gate_max_contexts]
        timings["pairs_s"] = time.perf_counter() - t0
        summary.update(n_feedback=len(feedback), n_examples=len(examples), n_train_new=len(new_train), n_carried=len(carried),
                       n_replay=len(replay), n_heldout=len(heldout), examples=counts(examples))
        from .rows import untrainable

        why_not = untrainable(config, dpo, kto)
        if not why_not and only_praise(new_train) and not carried and not lc.praise_alone_trains:
            why_not = "the new feedback only approves answers the adapter already gives"
        reason = None
        if why_not:
            reason = "nothing to train on yet: the new examples are held out" if not new_train else \
                     f"nothing to train on yet: {why_not}; kept for the next run"
            last = store.list_runs(user_id=user_id, limit=1)
            if new_train and last and last[0]["status"] == "skipped" and last[0]["n_feedback"] == len(feedback) and last[0]["error"] == reason:
                # The same untrainable feedback as last pass: one row says it, not one per scheduler pass.
                return {"status": "skipped", **summary, "reason": reason}
        run_id = store.start_run(user_id=user_id, trigger=trigger)
        summary["run_id"] = run_id
        base_metrics = {"feedback_read_at": read_at, **summary}
        if reason:
            if not new_train:
                # Held-out examples are what the gate judges later runs by: keep them and consume their feedback.
                store.promote(user_id=user_id, run_id=run_id, holder=holder, version=None, path=None, feedback_ids=fb_ids,
                              pairs=examples, metrics=base_metrics)
            store.finish_run(user_id=user_id, run_id=run_id, status="skipped", metrics={**base_metrics, **timings},
                             n_feedback=len(feedback), n_pairs=len(examples), error=reason)
            return {"status": "skipped", **summary, "reason": reason}

        active = store.active_adapter(user_id=user_id)
        version = _next_version(config, store, user_id)
        folder = user_dir(config, user_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-v{version:04d}-{uuid.uuid4().hex[:8]}"
        final = folder / f"v{version:04d}"
        step("before_train")
        if show:
            show("load", 0.0)
        metrics, verdict, attempts = _train_and_judge(config, dpo=dpo, kto=kto, active=active, heldout=heldout, out_dir=tmp,
                                                      show=show, keepalive=keepalive, step=step, timings=timings)
        if not keepalive():
            raise StoreError("this run no longer holds the user's lease; not promoting")
        step("before_rename")
        os.replace(tmp, final)
        tmp = final  # until the transaction commits, the version folder is still this run's to remove
        step("before_commit")
        status = "promoted" if verdict["promote"] else "rejected"
        timings["seconds"] = time.perf_counter() - t0
        all_metrics = {**base_metrics, **metrics, **timings, "gate": verdict, "attempts": attempts,
                       "previous_version": active["version"] if active else None}
        store.promote(user_id=user_id, run_id=run_id, holder=holder, version=version, path=str(final), feedback_ids=fb_ids,
                      pairs=examples, metrics=all_metrics, status="active" if verdict["promote"] else "rejected")
        tmp, committed = None, (status, version, all_metrics)
        step("after_commit")
        store.finish_run(user_id=user_id, run_id=run_id, status=status, metrics=all_metrics, n_feedback=len(feedback),
                         n_pairs=len(examples), candidate_version=version,
                         error=None if verdict["promote"] else "; ".join(verdict["reasons"]))
        pruned = prune_versions(config, store, user_id=user_id)
        if progress:
            progress("done", 1.0)
        return {"status": status, "version": version, **summary, "reasons": verdict["reasons"],
                "seconds": timings["seconds"], "timings": timings, "gate": verdict, "attempts": attempts, "pruned": pruned,
                "rows": {k: metrics.get(k) for k in ("dpo_rows", "prefer_rows", "kto_rows", "kto_rows_capped", "rows_cut")}}
    except Exception as exc:
        log.error("learner run for user %s failed: %s", user_id, exc)
        timings["seconds"] = time.perf_counter() - t0
        if committed is not None:
            # The transaction went through: the version is in service whatever failed after it (pruning, bookkeeping).
            status, version, all_metrics = committed
            store.finish_run(user_id=user_id, run_id=run_id, status=status, metrics=all_metrics, n_feedback=summary["n_feedback"],
                             n_pairs=summary["n_examples"], candidate_version=version, error=f"after promotion: {type(exc).__name__}: {exc}")
            return {"status": status, "version": version, **summary, "error": f"{type(exc).__name__}: {exc}", "seconds": timings["seconds"]}
        if run_id is None:
            # Failed before its row was written (e.g. reading the feedback): a failed run is still a row.
            run_id = store.start_run(user_id=user_id, trigger=trigger)
        if run_id is not None:
            store.finish_run(user_id=user_id, run_id=run_id, status="failed", error=f"{type(exc).__name__}: {exc}",
                             metrics={**summary, **timings, "traceback": traceback.format_exc()[-4000:]},
                             n_feedback=summary.get("n_feedback", 0), n_pairs=summary.get("n_examples", 0))
        return {"status": "failed", **summary, "run_id": run_id, "error": f"{type(exc).__name__}: {exc}", "seconds": timings["seconds"]}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        store.release_lease(user_id=user_id, holder=holder)


def _train_and_judge(config: HeedConfig, *, dpo: list[dict], kto: list[dict], active: dict | None, heldout: list[dict],
                     out_dir: Path, show: Progress | None, keepalive: Callable[[], bool], step: Fault,
                     timings: dict[str, float]) -> tuple[dict, dict, list[dict]]:
    """Train a candidate into ``out_dir`` and judge it; when the gate refuses it, judge adapters part of the way from
    the run's start to it (``learner.gate_retries``, learner/shrink.py). ``out_dir`` ends holding the last one judged.
    Returns (train metrics, the last verdict, one entry per adapter judged)."""
    from .train import train_adapter

    lc = config.learner
    start = active["path"] if active else None
    t1 = time.perf_counter()
    metrics = train_adapter(config, init_adapter=start, dpo_pairs=dpo, kto_examples=kto, out_dir=out_dir, progress=show,
                            keepalive=keepalive, before_save=lambda: step("before_save"))
    timings["train_s"] = time.perf_counter() - t1
    gc.collect()  # the trainer's model copy goes before the gate loads its own: lower peak memory
    release_freed_memory()
    step("after_save")
    if not lc.gate_enabled:
        return metrics, {"promote": True, "reasons": []}, []
    from .gate import evaluate

    # The refused full step, beside out_dir under a temp name (a crash leaves it to clean_leftovers).
    full = out_dir.with_name(out_dir.name + "-full")
    attempts: list[dict] = []
    t = 1.0
    try:
        for attempt in range(1 + lc.gate_retries):
            if attempt:
                if not keepalive():
                    raise StoreError("this run no longer holds the user's lease; not retrying")
                if not full.exists():
                    os.replace(out_dir, full)
                shutil.rmtree(out_dir, ignore_errors=True)
                t *= lc.gate_retry_step
                shrink_step(start_dir=start, candidate_dir=full, out_dir=out_dir, t=t)
                log.info("gate refused the candidate (%s); judging %.0f%% of its step", "; ".join(verdict["reasons"]), 100 * t)
            t2 = time.perf_counter()
            verdict = evaluate(config, candidate_dir=str(out_dir), active_dir=start, heldout=heldout, progress=show)
            took = time.perf_counter() - t2
            timings["gate_s"] = timings.get("gate_s", 0.0) + took
            gc.collect()
            attempts.append({"step": t, "promote": verdict["promote"], "reasons": verdict["reasons"], "gate_s": took})
            if verdict["promote"]:
                break
    finally:
        shutil.rmtree(full, ignore_errors=True)
    return metrics, verdict, attempts


def learn_all(config: HeedConfig, store: Store, *, trigger: str = "schedule",
              progress_for: Callable[[int], Progress | None] | None = None) -> list[dict]:
    """One pass over every user with enough new feedback; one user's failure never stops the rest."""
    results = []
    for user_id in store.users_with_unconsumed(at_least=config.learner.min_new_feedback):
        try:
            results.append(learn_user(config, store, user_id=user_id, trigger=trigger,
                                      progress=progress_for(user_id) if progress_for else None))
        except Exception as exc:  # e.g. the database locked while taking the lease: try the next user
            log.error("learner pass: user %s: %s", user_id, exc)
            results.append({"status": "failed", "user_id": user_id, "error": f"{type(exc).__name__}: {exc}"})
    return results
