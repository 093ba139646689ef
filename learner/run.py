"""One learner run for one user: lease -> pairs -> train -> gate -> rename -> one transaction.

Crash safety: the adapter is written to a temp folder beside its final place,
renamed into place, and only then does one store transaction record the
version, switch the active one and mark the feedback consumed. A crash before
that transaction leaves the old adapter active and the feedback unconsumed; the
next run cleans the leftovers and trains again.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

from heed.config import HeedConfig
from heed.store import Store

from .pairs import build_examples

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Fault = Callable[[str], None]

_VERSION_DIR = re.compile(r"^v(\d+)$")


def user_dir(config: HeedConfig, user_id: int) -> Path:
    return config.adapters_path / str(user_id)


def clean_leftovers(config: HeedConfig, store: Store, *, user_id: int) -> list[str]:
    """Remove temp folders and version folders no store row knows (from crashed runs)."""
    folder = user_dir(config, user_id)
    if not folder.is_dir():
        return []
    known = {Path(a["path"]).name for a in store.list_adapters(user_id=user_id)}
    removed = []
    for child in folder.iterdir():
        if child.name.startswith(".tmp-") or (_VERSION_DIR.match(child.name) and child.name not in known):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def prune_versions(config: HeedConfig, store: Store, *, user_id: int) -> None:
    """Keep the newest ``keep_versions`` version folders plus the active one."""
    keep = config.learner.keep_versions
    rows = [a for a in store.list_adapters(user_id=user_id) if a["status"] != "deleted"]
    for a in rows[keep:]:
        if a["status"] == "active":
            continue
        shutil.rmtree(a["path"], ignore_errors=True)
        store.mark_adapter_deleted(user_id=user_id, version=a["version"])


def _next_version(config: HeedConfig, store: Store, user_id: int) -> int:
    on_disk = [int(m.group(1)) for c in user_dir(config, user_id).glob("v*") if (m := _VERSION_DIR.match(c.name))]
    return max([store.next_adapter_version(user_id=user_id) - 1, *on_disk, 0]) + 1


def _replay(store: Store, *, user_id: int, exclude: set[int], size: int, seed: int) -> list[dict]:
    """A bounded random sample of older training examples from promoted runs (no forgetting)."""
    old = [p for p in store.list_pairs(user_id=user_id, split="train", promoted_only=True) if p["feedback_id"] not in exclude]
    rng = random.Random(f"{seed}:{user_id}:{len(old)}")
    return old if len(old) <= size else rng.sample(old, size)


def learn_user(config: HeedConfig, store: Store, *, user_id: int, trigger: str = "manual",
               progress: Progress | None = None, fault: Fault | None = None) -> dict:
    """Run the learner for one user. Returns a summary dict with ``status``:
    'busy' (another run holds the user), 'skipped' (not enough new feedback),
    'promoted', 'rejected' or 'failed'."""
    lc = config.learner
    holder = store.new_lease_holder(trigger)
    if not store.acquire_lease(user_id=user_id, holder=holder, seconds=lc.lease_seconds):
        return {"status": "busy", "user_id": user_id, "reason": "another learner run is training this user"}
    run_id = None
    tmp: Path | None = None
    step = fault or (lambda point: None)
    t0 = time.perf_counter()
    try:
        store.fail_stale_runs()
        clean_leftovers(config, store, user_id=user_id)
        read_at = time.time()
        feedback = store.list_feedback(user_id=user_id, unconsumed_only=True)
        if len(feedback) < lc.min_new_feedback:
            return {"status": "skipped", "user_id": user_id, "reason": f"{len(feedback)} new feedback events (< {lc.min_new_feedback})"}
        run_id = store.start_run(user_id=user_id, trigger=trigger)
        if progress:
            progress("pairs", 0.0)
        examples = build_examples(store, user_id=user_id, feedback=feedback, heldout_fraction=lc.heldout_fraction,
                                  seed=lc.seed, all_feedback=store.list_feedback(user_id=user_id))
        new_train = [e for e in examples if e["split"] == "train"]
        replay = _replay(store, user_id=user_id, exclude={f["id"] for f in feedback}, size=lc.replay_size, seed=lc.seed + run_id)
        dpo = [e for e in new_train + replay if e["kind"] == "dpo"]
        kto = [e for e in new_train + replay if e["kind"] == "kto"]
        heldout = [e for e in examples if e["split"] == "heldout"]
        heldout += [p for p in store.list_pairs(user_id=user_id, split="heldout") if p["feedback_id"] not in {f["id"] for f in feedback}]
        fb_ids = [f["id"] for f in feedback]
        summary = {"user_id": user_id, "run_id": run_id, "n_feedback": len(feedback), "n_examples": len(examples),
                   "n_train_new": len(new_train), "n_replay": len(replay), "n_heldout": len(heldout)}
        base_metrics = {"feedback_read_at": read_at, **summary}
        if not dpo and len(kto) < 2:
            # Nothing trainable yet (e.g. all new examples held out): keep them and consume the feedback.
            store.promote(user_id=user_id, run_id=run_id, holder=holder, version=None, path=None, feedback_ids=fb_ids,
                          pairs=examples, metrics=base_metrics)
            store.finish_run(user_id=user_id, run_id=run_id, status="skipped", metrics=base_metrics, n_feedback=len(feedback),
                             n_pairs=len(examples), error="nothing to train on: every new example is held out or unpaired")
            return {"status": "skipped", **summary, "reason": "nothing to train on yet"}

        active = store.active_adapter(user_id=user_id)
        version = _next_version(config, store, user_id)
        folder = user_dir(config, user_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-v{version:04d}-{uuid.uuid4().hex[:8]}"
        final = folder / f"v{version:04d}"
        step("before_train")
        from .train import train_adapter

        metrics = train_adapter(config, init_adapter=active["path"] if active else None, dpo_pairs=dpo, kto_examples=kto,
                                out_dir=tmp, progress=progress)
        step("after_save")
        verdict = {"promote": True, "reasons": []}
        if lc.gate_enabled:
            if progress:
                progress("gate", 0.0)
            from .gate import evaluate

            verdict = evaluate(config, candidate_dir=str(tmp), active_dir=active["path"] if active else None, heldout=heldout)
        step("before_rename")
        os.replace(tmp, final)
        tmp = None
        step("before_commit")
        status = "promoted" if verdict["promote"] else "rejected"
        all_metrics = {**base_metrics, **metrics, "gate": verdict, "seconds": time.perf_counter() - t0,
                       "previous_version": active["version"] if active else None}
        store.promote(user_id=user_id, run_id=run_id, holder=holder, version=version, path=str(final), feedback_ids=fb_ids,
                      pairs=examples, metrics=all_metrics, status="active" if verdict["promote"] else "rejected")
        step("after_commit")
        store.finish_run(user_id=user_id, run_id=run_id, status=status, metrics=all_metrics, n_feedback=len(feedback),
                         n_pairs=len(examples), candidate_version=version,
                         error=None if verdict["promote"] else "; ".join(verdict["reasons"]))
        prune_versions(config, store, user_id=user_id)
        if progress:
            progress("done", 1.0)
        return {"status": status, "version": version, **summary, "reasons": verdict["reasons"],
                "seconds": all_metrics["seconds"], "gate": verdict}
    except Exception as exc:
        log.error("learner run for user %s failed: %s", user_id, exc)
        if run_id is not None:
            store.finish_run(user_id=user_id, run_id=run_id, status="failed", error=f"{type(exc).__name__}: {exc}",
                             metrics={"traceback": traceback.format_exc()[-4000:]})
        return {"status": "failed", "user_id": user_id, "run_id": run_id, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        store.release_lease(user_id=user_id, holder=holder)


def learn_all(config: HeedConfig, store: Store, *, trigger: str = "schedule", progress_for: Callable[[int], Progress | None] | None = None) -> list[dict]:
    """One pass over every user with enough new feedback; one user's failure never stops the rest."""
    results = []
    for user_id in store.users_with_unconsumed(at_least=config.learner.min_new_feedback):
        results.append(learn_user(config, store, user_id=user_id, trigger=trigger,
                                  progress=progress_for(user_id) if progress_for else None))
    return results
