"""The personalization benchmark's own knobs, typed like heed.config: defaults, help, validation.

``FULL`` runs the embedded model; ``QUICK`` runs the same code on the tiny
offline model in about a minute. A YAML file (``--bench-config``) can change
any field; ``learner`` and ``generation`` are overrides merged over the Heed
config, so a benchmark can try a recipe without touching the product defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heed.config import ConfigError

FEEDBACK_TRACKS = ("all", "edit", "correction", "thumbs")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class BenchConfig:
    personas: list = _f(["brief", "bullets", "asks_back", "in_short", "signs_off"], "Personas that learn with every feedback kind (the 'all' track).")
    checkpoints: list = _f([4, 8, 16, 32], "Feedback events after which the learner runs and held-out acceptance is measured; one adapter grows through them.")
    kind_personas: list = _f(["brief"], "Personas that also learn from one feedback kind alone (edits only, corrections only, thumbs only).")
    kind_tracks: list = _f(["edit", "correction", "thumbs"], "Which single-kind tracks to run for kind_personas.")
    kind_checkpoints: list = _f([8, 16], "Checkpoints of the single-kind tracks.")
    target_events: int = _f(16, "The checkpoint the targets are judged at (acceptance, degeneration, isolation).")
    heldout_every: int = _f(3, "Every n-th prompt is held out (never chatted about), the rest train.")
    max_heldout: int = _f(0, "Use at most this many held-out prompts (0: all).")
    eval_max_new_tokens: int = _f(256, "Reply length when judging held-out answers; answers cut off at it count as degenerate.")
    # 5 users x 32 prompts, mixed adapters, 256 tokens: 309 s in batches of 48 against 330 s in batches of 16 (another
    # day): larger batches barely help once every batch runs to the longest answer.
    eval_batch: int = _f(48, "Held-out answers decoded at once (Engine.generate_batch's batch); rows of different users share the batch, and with continuous batching a row that ends hands its slot to the next prompt.")
    chats_per_event: int = _f(3, "A single-kind user stops chatting after this many chats per missing event (accepted answers give no edit).")
    interactivity_prompts: int = _f(6, "Corrected prompts asked again in a new session, without the correction, after learning.")
    observer_prompts: int = _f(2, "Prompts a user who gives no feedback asks before and after everyone learns (answers must be identical).")
    seed: int = _f(0, "Seed of the simulated users' choices.")
    time_budget_minutes: float = _f(58.0, "Single-kind tracks that would end after this are skipped (and reported); the 'all' tracks always run.")
    generation: dict = _f({}, "Overrides of the Heed generation config while users chat (the product's greedy decoding; 'regenerate' samples).")
    # Empty: the full run measures the product's own recipe (configs/default.yaml).
    learner: dict = _f({}, "Overrides of the Heed learner config for this benchmark.")

    def __post_init__(self) -> None:
        from bench.personas import get

        def check(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"bench.{key}: {msg}")

        check(bool(self.personas) or bool(self.kind_personas), "personas", "name at least one persona (or kind_personas for a by-kind run)")
        for name in [*self.personas, *self.kind_personas]:
            try:
                get(name)
            except KeyError as exc:
                raise ConfigError(f"bench.personas: {exc.args[0]}") from exc
        for key in ("checkpoints", "kind_checkpoints"):
            cps = getattr(self, key)
            check(all(isinstance(c, int) and c > 0 for c in cps) and cps == sorted(set(cps)), key, "must be increasing positive integers")
        check(bool(self.checkpoints), "checkpoints", "must not be empty")
        check(all(k in FEEDBACK_TRACKS[1:] for k in self.kind_tracks), "kind_tracks", f"each must be one of {FEEDBACK_TRACKS[1:]}")
        check(self.target_events > 0, "target_events", "must be positive")
        check(2 <= self.heldout_every <= 20, "heldout_every", "must be between 2 and 20")
        check(self.max_heldout >= 0, "max_heldout", "must be >= 0")
        check(self.time_budget_minutes > 0, "time_budget_minutes", "must be > 0")
        check(1 <= self.eval_max_new_tokens <= 4096, "eval_max_new_tokens", "must be between 1 and 4096")
        check(1 <= self.eval_batch <= 256, "eval_batch", "must be between 1 and 256")
        check(1 <= self.chats_per_event <= 100, "chats_per_event", "must be between 1 and 100")
        check(self.interactivity_prompts >= 0 and self.observer_prompts >= 0, "interactivity_prompts", "must be >= 0")
        check(isinstance(self.generation, dict) and isinstance(self.learner, dict), "learner", "overrides must be mappings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = BenchConfig()

QUICK = BenchConfig(
    personas=["says_thanks", "says_hello"],
    checkpoints=[4, 8, 16, 32],
    kind_personas=["says_thanks"],
    kind_tracks=["edit", "correction", "thumbs"],
    kind_checkpoints=[4, 8],
    max_heldout=12,
    eval_max_new_tokens=16,
    eval_batch=12,
    interactivity_prompts=3,
    observer_prompts=2,
    generation={"max_new_tokens": 16},
    # The tiny random model predicts nearly uniformly (tiny embeddings under RMSNorm): an exact
    # answer takes ~100 optimizer steps, so a quick run trains longer and on every linear layer.
    learner={"learning_rate": 0.005, "epochs": 30, "lora_r": 16, "lora_alpha": 32, "min_new_feedback": 1,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
)


def load_bench_config(path: str | Path | None, *, quick: bool) -> BenchConfig:
    """The preset (QUICK or FULL) with a YAML file's fields over it; unknown keys are errors."""
    import yaml

    base = QUICK if quick else FULL
    if path is None:
        return dataclasses.replace(base)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bench config not found: {p}")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown key bench.{unknown[0]} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(base, **data)
