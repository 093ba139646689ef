"""A kept `heed bench personalize --data-dir D` run, opened again for a replay (rerank, strength, rejudge)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class KeptRun:
    bench: object  # the run's BenchConfig
    prompts: list[str]  # its held-out prompts
    config: object  # the HeedConfig it ran with, in D
    engine: object
    heed: object  # the service over the run's store


def open_kept_run(data_dir: Path, *, bench_config: str | None, config_path: str | None, quick: bool) -> KeptRun:
    """The run in ``data_dir`` with an engine on its model; exits before loading anything when there is none."""
    from bench.personalize import heed_config
    from bench.prompts import split
    from bench.settings import load_bench_config
    from heed.engine import Engine, load_base, set_threads
    from heed.service import Heed

    bench = load_bench_config(bench_config, quick=quick)
    _, prompts = split(heldout_every=bench.heldout_every)
    prompts = prompts[:bench.max_heldout] if bench.max_heldout else prompts
    config = heed_config(config_path, quick=quick, bench=bench, data_dir=str(data_dir), kept=True)[0]
    set_threads(config.model.torch_threads)
    model, tok = load_base(config)
    engine = Engine(model, tok, model_cfg=config.model, gen_cfg=config.generation)
    return KeptRun(bench, prompts, config, engine, Heed(config, engine=engine))


def simulated_users(store) -> list[tuple[int, str]]:
    """(id, name) of the run's simulated users: named PERSONA-TRACK (the observer has no persona)."""
    with store.db.connect() as db:
        return [(uid, name) for uid, name in db.execute("SELECT id, name FROM users ORDER BY id") if "-" in name]


def active_adapter(store, user_id: int) -> dict | None:
    """The user's active adapter version whose folder is still there, or None."""
    return next((a for a in store.list_adapters(user_id=user_id) if a["status"] == "active" and os.path.isdir(a["path"])), None)


def held_out_chats(heed, user_id: int | None, prompts: list[str], system_prompt: str) -> list[list[dict]]:
    """Each prompt as a new session's first turn: the user's system prompt (with their standing notes), or
    ``system_prompt`` for the base model (``user_id`` None)."""
    system = heed.system_prompt(user_id) if user_id is not None else system_prompt
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in prompts]
