"""Typed configuration: one dataclass per component, loaded from YAML.

Every field has a default and a one-line help (``metadata["help"]``) and is
validated in ``__post_init__``. Unknown keys and bad values raise
``ConfigError`` naming the offending key, so a typo never silently falls back
to a default.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "embedded:smollm2"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ModelConfig:
    name_or_path: str = _f(EMBEDDED_MODEL, "HF model folder, hub-cache id, 'embedded:smollm2' (packaged GGUF) or 'tiny:<seed>' (built offline, for tests).")
    device: str = _f("cpu", "Where the model runs: cpu, cuda, cuda:N or auto.")
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16, float16 or auto (bf16 where the GPU or CPU computes it natively, else fp32; the embedded model's bf16 answers run past the limit more often, see docs/MEASUREMENTS.md).")
    torch_threads: int = _f(2, "torch.set_num_threads for inference and training; 0 leaves torch's default.")
    max_cached_adapters: int = _f(16, "How many users' adapters the engine keeps loaded (LRU).")
    trust_remote_code: bool = _f(False, "Allow model code from the model folder (off: only transformers' own classes run).")
    max_batch: int = _f(8, "Replies generated together when several users ask at once (each keeps its own adapter).")
    batch_window_ms: int = _f(5, "How long a new request waits for others to join its batch, in milliseconds.")
    continuous_batching: bool = _f(True, "A request joins the batch being answered at its next token, and a row leaves it when its answer ends (heed.decode); off: each batch runs to its longest answer while new requests wait. Batch-invariant half-precision serving and sliding-window models always use whole batches.")
    batch_invariant: bool = _f(True, "In bf16/fp16 on a CPU, answer each row as it would be answered alone (attention row by row, no lone-row matmuls, every adapter by the batched LoRA path): answers do not depend on who else shares the batch. fp32 is close enough without it.")
    adapter_serving: str = _f("auto", "One user's adapter: 'unmerged' (LoRA added by hooks: switching users costs nothing), 'merged' (folded into copies of the base weights: each switch rewrites them), 'hybrid' (unmerged right after another user's reply, merged when the same user asks again: faster, but a reply's rounding then depends on who asked before; fp32 only), 'auto' (merged on CUDA, unmerged on CPU).")

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path.strip()), "model.name_or_path", "must not be empty")
        _check(self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"), "model.device", f"unknown device {self.device!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16", "auto"), "model.dtype", f"unknown dtype {self.dtype!r}")
        _check(0 <= self.torch_threads <= 256, "model.torch_threads", "must be between 0 and 256")
        _check(1 <= self.max_cached_adapters <= 10_000, "model.max_cached_adapters", "must be between 1 and 10000")
        _check(1 <= self.max_batch <= 256, "model.max_batch", "must be between 1 and 256")
        _check(0 <= self.batch_window_ms <= 1000, "model.batch_window_ms", "must be between 0 and 1000")
        _check(self.adapter_serving in ("auto", "merged", "unmerged", "hybrid"), "model.adapter_serving",
               f"must be auto, merged, unmerged or hybrid, got {self.adapter_serving!r}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(192, "Longest reply, in tokens.")
    do_sample: bool = _f(False, "Sample (True) or greedy decoding (False, reproducible).")
    temperature: float = _f(0.7, "Sampling temperature (used when do_sample).")
    top_p: float = _f(0.9, "Nucleus sampling mass (used when do_sample).")
    repetition_penalty: float = _f(1.0, "Penalty on repeated tokens; 1.0 turns it off.")
    penalize_end_of_turn: bool = _f(True, "Let repetition_penalty lower the end-of-turn token too, which every chat prompt already holds. Off, fewer answers run past the limit (embedded model, 96 questions: 3 cut off at 256 tokens instead of 10) but in a full benchmark run the adapters learned brevity that leaked into other users' judges (docs/MEASUREMENTS.md).")
    penalty_counts_prompt: bool = _f(True, "Let repetition_penalty count the prompt's tokens (the question's own words) too, as transformers does; off, it counts only what the answer already said (the end of a turn follows penalize_end_of_turn). Off, the base model's held-out answers ran longer and 9 of 32 were cut off instead of 3 (docs/MEASUREMENTS.md).")
    system_prompt: str = _f("You are a helpful AI assistant named Heed.", "System message put before every conversation.")
    max_message_chars: int = _f(8000, "Longest user message, edit or correction accepted, in characters.")
    max_context_tokens: int = _f(1536, "Oldest turns are dropped so the prompt fits in this many tokens.")
    seed: int = _f(0, "Seed that, with the request (user, context, adapter, which click), fixes each regenerated answer.")

    def __post_init__(self) -> None:
        _check(1 <= self.max_new_tokens <= 8192, "generation.max_new_tokens", "must be between 1 and 8192")
        _check(0.0 < self.temperature <= 5.0, "generation.temperature", "must be in (0, 5]")
        _check(0.0 < self.top_p <= 1.0, "generation.top_p", "must be in (0, 1]")
        _check(0.5 <= self.repetition_penalty <= 3.0, "generation.repetition_penalty", "must be in [0.5, 3]")
        _check(1 <= self.max_message_chars <= 1_000_000, "generation.max_message_chars", "must be between 1 and 1000000")
        _check(16 <= self.max_context_tokens <= 1_000_000, "generation.max_context_tokens", "must be between 16 and 1000000")
        _check(0 <= self.seed < 2**32, "generation.seed", "must be between 0 and 2**32-1")


@dataclass
class StoreConfig:
    path: str = _f("heed.db", "SQLite file; relative paths are under data_dir.")
    busy_timeout_ms: int = _f(10_000, "How long a writer waits for the lock before 'database is locked'.")

    def __post_init__(self) -> None:
        _check(bool(self.path.strip()), "store.path", "must not be empty")
        _check(0 <= self.busy_timeout_ms <= 600_000, "store.busy_timeout_ms", "must be between 0 and 600000")


DPO_LOSSES = ("sigmoid", "apo_zero", "sigmoid_norm", "ipo", "none")


@dataclass
class LearnerConfig:
    min_new_feedback: int = _f(1, "A user is trained only with at least this many unconsumed feedback events.")
    praise_alone_trains: bool = _f(False, "Train a run whose new feedback only approves answers (thumbs up, good ratings)? Off: it waits, kept, for a run with something to fix: the adapter already gives those answers, and a run on them alone drifted (docs/MEASUREMENTS.md).")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path while training.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get LoRA weights.")
    learning_rate: float = _f(1e-3, "AdamW learning rate for the adapter.")
    epochs: int = _f(2, "Passes over the run's pairs.")
    batch_size: int = _f(4, "Pairs per optimizer step.")
    min_steps: int = _f(0, "At least this many optimizer steps per run: a run with few new examples takes more passes over them (0: just epochs).")
    beta: float = _f(0.1, "DPO/KTO temperature: how far the policy may move from the reference.")
    dpo_loss: str = _f("sigmoid", "trl DPO loss on pairs: 'sigmoid' (DPO), 'apo_zero' (anchored: chosen up, rejected down), 'sigmoid_norm' (length-normalized), 'ipo', or 'none' (the SFT term alone).")
    sft_weight: float = _f(1.0, "Weight of the SFT term on chosen answers (keeps DPO from reward-hacking); 0 disables.")
    imitate: str = _f("endorsed", "Whose chosen answers the SFT term imitates: 'endorsed' (the user's edits, answers voted up, corrected answers they confirmed; a pick of the better of two only trains DPO, in its own pass first) or 'all' (every pair's chosen answer).")
    extension_pairs: str = _f("dpo", "A pair whose chosen answer is the rejected one plus an addition (a question, a sign-off): 'dpo' trains it as any pair; 'sft' by the SFT term alone (there DPO can only learn 'do not stop here'). Ignored with paired_loss 'kto'.")
    # Every rejected answer and thumbs-down ends with the end-of-turn token; DPO and KTO push its probability down where
    # such an answer stopped, wherever its flaw was, and an edit that only adds a line pushes "stop here" down outright.
    spare_end: bool = _f(True, "Leave the end-of-turn token out of what DPO lowers in a rejected answer and KTO in an undesirable one: an answer is worse for what it says, not for ending.")
    edit_weight: float = _f(1.0, "How many times an edit's pair and answer count against a vote's or a pick's: the user wrote that answer (rounded to copies).")
    shared_prefixes: bool = _f(True, "Compute what a batch's rows share (the prompt, an answer an edit repeats) once, as a token tree: the same numbers up to float rounding, fewer tokens (learner/packing.py).")
    precompute_reference: bool = _f(True, "Score the DPO pairs under the reference once before training, not at every step (the same numbers, a quarter fewer forward passes over 3 epochs).")
    reference: str = _f("base", "DPO/KTO reference: 'base' (the adapter disabled) or 'previous' (a frozen copy of the active adapter).")
    paired_loss: str = _f("dpo", "How pairs train: 'dpo' (DPO + SFT term; unpaired examples get a KTO pass before) or 'kto' (each pair split into a good and a bad example; one KTO pass for all).")
    unpaired: str = _f("kto", "How feedback with no partner trains (a lone thumb, a conversation's rating): 'kto' (a KTO pass before the pairs) or 'none' (it does not train; a thumb still pairs with an opposite vote on the same answer's context, a rating still weighs its conversation's pairs).")
    kto_max_per_pair: float = _f(0.0, "With paired_loss 'dpo', at most this many lone-thumb (KTO) examples per pair in a run, drawn keeping their share of ups and downs (0: no cap); a run of thumbs alone is not capped.")
    kto_weight_balance: bool = _f(True, "Weigh KTO's desirable/undesirable losses so both labels count equally however many of each there are.")
    dtype: str = _f("auto", "Base weights dtype while training (LoRA weights stay fp32; the gate judges in model.dtype): 'auto' (bf16 where the GPU or CPU computes it natively, else fp32), 'model' (model.dtype), float32 or bfloat16.")
    # Room for a whole answer at the serving limit (256 new tokens) plus its prompt: at 256, trl cut the end off 1-4 of
    # the 4-24 examples of every benchmark run (a long rejected answer's tail: where it failed to ask back or sign off).
    max_length: int = _f(512, "Prompt + answer tokens kept per example; the oldest turns of a long context are dropped first.")
    replay_size: int = _f(16, "Older training pairs replayed with each run (bounds cost as history grows).")
    heldout_fraction: float = _f(0.2, "Share of each user's answers whose feedback is kept out of training for the gate.")
    seed: int = _f(0, "Seed for replay sampling, splits and training.")
    keep_versions: int = _f(5, "Adapter versions kept on disk per user (the active one always kept).")
    adapters_dir: str = _f("adapters", "Where adapters live; relative paths are under data_dir.")
    gate_enabled: bool = _f(True, "Judge candidates before promotion; off promotes every finished run.")
    # The serving limit: the gate judges the answers a user would get. At 160 tokens (room for ~100 words and a
    # line a user wants added) the gate refused candidates for answers cut there that end by 256: in benchmark draw 0
    # in-short kept 31% after 32 events at 160 against 72% at 256, mean 74% against 82%; draw 2's mean after 16
    # events 64% against 72%. Its cost: slower runs (the answers run 96 tokens further), a few more degenerate
    # answers (in-short 9% against 6%). At 96 an asks-back answer plus its question did not fit at all.
    gate_max_new_tokens: int = _f(256, "Reply length when the gate samples the candidate's answers (the serving limit).")
    gate_max_contexts: int = _f(16, "At most this many of the user's held-out contexts are among the gate's answers...")
    gate_answers: int = _f(24, "...which are always this many: probe prompts fill the rest (at most 24), so the gate costs the same for any history.")
    gate_probes: str = _f("mixed", "Which probe prompts fill the gate's answers after the user's held-out contexts: 'mixed' (alternating the two sets: over three benchmark draws it refused two bad candidates the factual set let through, and nothing else), 'factual' (short questions of fact, the original set) or 'everyday' (how-to questions like a chat user's, where a collapse into one template shows).")
    gate_max_degenerate_increase: float = _f(0.15, "Refuse when the share of empty, one-word, echoed or repetitive answers rises by more than this...")
    gate_min_degenerate_answers: int = _f(3, "...and by at least this many answers, for every share bound of the gate (one odd answer among a few dozen is noise).")
    # The base model's answers were cut 4% of the time at 160 tokens, 9% at 256 (the benchmark's held-out questions).
    gate_max_cutoff_increase: float = _f(0.25, "Refuse when the share of answers that never end (cut at gate_max_new_tokens) rises by more than this.")
    # With learner.spare_end, benchmark draw 0's asks-back adapter after 16 events opened every answer with "I'm glad you
    # asked! What's the most popular thing you've tried...?": 12 of the gate's 23 probe answers shared no word with the
    # question (the base 0, every other adapter of that run at most 3), none degenerate or cut off.
    gate_max_offtopic_increase: float = _f(0.25, "Refuse when the share of answers that answer nothing (degenerate, or sharing no content word with the question: heed.quality.on_topic) rises by more than this.")
    gate_max_templated_increase: float = _f(0.15, "Refuse when the share of sound answers that are mostly one template said to every question (heed.quality.templated) rises by more than this; 1 turns it off.")
    # Against the active adapter alone, runs that each stay under a bound add up past it: in benchmark draw 0 asks-back's
    # 16-event candidate cut 38% of the gate's answers, the adapter before it 29%, the base 4%. Refused, that user kept
    # 59% of held-out answers accepted; promoted (max_length 256, one run earlier), it fell to 44%, 38% degenerate.
    gate_bounds_from_base: bool = _f(True, "The degeneration and cut-off bounds hold against the base model too, not only the active adapter (runs each under a bound cannot add up past it).")
    # A refusal could mean the step went too far (a collapse into one reply, drift, forgotten answers), so a run may judge a
    # point nearer its start on the same path, like a line search (learner/shrink.py). Off: in benchmark draw 0 the half
    # steps the gate passed served their users worse than the adapters kept (asks-back 56% against 69% after 16 events,
    # a third of its answers off topic; signs-off 91% against 97%), bench/retry.yaml.
    gate_retries: int = _f(0, "When the gate refuses a candidate, judge an adapter part of the way from the run's start to it, up to this many times (0: a refused run ends there); each costs a gate pass, not a training run.")
    gate_retry_step: float = _f(0.5, "How far along the refused candidate's step each retry goes, as a share of the attempt before it.")
    gate_max_kl: float = _f(2.0, "Refuse when per-token KL from the base on probe prompts exceeds this (nats).")
    # DPO lowers held-out chosen likelihood by 0.1-0.4 nats/token even when answers get better: every candidate
    # the old -0.1 refused in the full benchmark was as good or better by its persona's judge (bench/results/gate_audit.json).
    gate_min_logp_gain: float = _f(-0.5, "Refuse when held-out chosen log-likelihood per token drops below this vs the active adapter...")
    gate_min_heldout: int = _f(2, "...judged only with at least this many held-out examples (one is noise)...")
    gate_min_margin_gain: float = _f(0.0, "...unless the held-out chosen-vs-rejected margin per token grew by more than this vs the active adapter (displacement, not forgetting).")
    schedule_minutes: int = _f(30, "Interval of `heed learn --schedule` (used when schedule_cron is empty).")
    schedule_cron: str = _f("", "Crontab line for `heed learn --schedule` (e.g. '0 3 * * *'); empty uses schedule_minutes.")
    lease_seconds: int = _f(900, "A run's claim on a user; renewed while it trains, so it expires only after a crash.")

    def __post_init__(self) -> None:
        _check(self.min_new_feedback >= 1, "learner.min_new_feedback", "must be >= 1")
        _check(1 <= self.lora_r <= 512, "learner.lora_r", "must be between 1 and 512")
        _check(self.lora_alpha >= 1, "learner.lora_alpha", "must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "learner.lora_dropout", "must be in [0, 1)")
        _check(bool(self.target_modules) and all(isinstance(m, str) for m in self.target_modules), "learner.target_modules", "must be a non-empty list of names")
        _check(0.0 < self.learning_rate <= 1.0, "learner.learning_rate", "must be in (0, 1]")
        _check(1 <= self.epochs <= 100, "learner.epochs", "must be between 1 and 100")
        _check(1 <= self.batch_size <= 1024, "learner.batch_size", "must be between 1 and 1024")
        _check(0 <= self.min_steps <= 10_000, "learner.min_steps", "must be between 0 and 10000")
        _check(0.0 < self.beta <= 10.0, "learner.beta", "must be in (0, 10]")
        _check(self.dpo_loss in DPO_LOSSES, "learner.dpo_loss", f"must be one of {', '.join(DPO_LOSSES)}, got {self.dpo_loss!r}")
        _check(0.0 <= self.sft_weight <= 100.0, "learner.sft_weight", "must be in [0, 100]")
        _check(self.imitate in ("endorsed", "all"), "learner.imitate", f"must be 'endorsed' or 'all', got {self.imitate!r}")
        _check(self.extension_pairs in ("dpo", "sft"), "learner.extension_pairs", f"must be 'dpo' or 'sft', got {self.extension_pairs!r}")
        # 'sft' zeroes DPO's margin by scoring the chosen answer twice: two dropout masks would make them differ.
        _check(self.extension_pairs != "sft" or self.lora_dropout == 0, "learner.extension_pairs", "'sft' needs lora_dropout 0")
        _check(self.extension_pairs != "sft" or self.sft_weight > 0, "learner.extension_pairs", "'sft' needs sft_weight > 0 (those pairs would train nothing)")
        _check(1.0 <= self.edit_weight <= 4.0, "learner.edit_weight", "must be between 1 and 4")
        _check(self.dpo_loss != "none" or self.sft_weight > 0, "learner.sft_weight", "must be > 0 when dpo_loss is 'none' (nothing would train)")
        _check(self.reference in ("base", "previous"), "learner.reference", f"must be 'base' or 'previous', got {self.reference!r}")
        _check(self.paired_loss in ("dpo", "kto"), "learner.paired_loss", f"must be 'dpo' or 'kto', got {self.paired_loss!r}")
        _check(self.unpaired in ("kto", "none"), "learner.unpaired", f"must be 'kto' or 'none', got {self.unpaired!r}")
        _check(0.0 <= self.kto_max_per_pair <= 100.0, "learner.kto_max_per_pair", "must be between 0 and 100")
        _check(self.dtype in ("auto", "model", "float32", "bfloat16"), "learner.dtype", f"must be auto, model, float32 or bfloat16, got {self.dtype!r}")
        _check(16 <= self.max_length <= 32_768, "learner.max_length", "must be between 16 and 32768")
        _check(0 <= self.replay_size <= 100_000, "learner.replay_size", "must be between 0 and 100000")
        _check(0.0 <= self.heldout_fraction < 1.0, "learner.heldout_fraction", "must be in [0, 1)")
        _check(0 <= self.seed < 2**32, "learner.seed", "must be between 0 and 2**32-1")
        _check(1 <= self.keep_versions <= 1000, "learner.keep_versions", "must be between 1 and 1000")
        _check(bool(self.adapters_dir.strip()), "learner.adapters_dir", "must not be empty")
        _check(1 <= self.gate_max_new_tokens <= 4096, "learner.gate_max_new_tokens", "must be between 1 and 4096")
        _check(0 <= self.gate_max_contexts <= 1000, "learner.gate_max_contexts", "must be between 0 and 1000")
        _check(self.gate_max_contexts < self.gate_answers <= self.gate_max_contexts + 24, "learner.gate_answers",
               "must exceed gate_max_contexts (probe prompts measure drift) by at most the 24 probe prompts")
        _check(0.0 <= self.gate_max_degenerate_increase <= 1.0, "learner.gate_max_degenerate_increase", "must be in [0, 1]")
        _check(1 <= self.gate_min_degenerate_answers <= 1000, "learner.gate_min_degenerate_answers", "must be between 1 and 1000")
        _check(1 <= self.gate_min_heldout <= 1000, "learner.gate_min_heldout", "must be between 1 and 1000")
        _check(0.0 <= self.gate_max_cutoff_increase <= 1.0, "learner.gate_max_cutoff_increase", "must be in [0, 1]")
        _check(0.0 <= self.gate_max_offtopic_increase <= 1.0, "learner.gate_max_offtopic_increase", "must be in [0, 1]")
        _check(0.0 <= self.gate_max_templated_increase <= 1.0, "learner.gate_max_templated_increase", "must be in [0, 1]")
        _check(self.gate_probes in ("factual", "everyday", "mixed"), "learner.gate_probes", "must be 'factual', 'everyday' or 'mixed'")
        _check(0 <= self.gate_retries <= 5, "learner.gate_retries", "must be between 0 and 5")
        _check(0.0 < self.gate_retry_step < 1.0, "learner.gate_retry_step", "must be in (0, 1): a retry takes a shorter step")
        _check(self.gate_max_kl > 0, "learner.gate_max_kl", "must be > 0")
        _check(math.isfinite(self.gate_min_margin_gain), "learner.gate_min_margin_gain", "must be a finite number")
        _check(1 <= self.schedule_minutes <= 10_080, "learner.schedule_minutes", "must be between 1 and 10080")
        if self.schedule_cron.strip():
            _check(len(self.schedule_cron.split()) == 5, "learner.schedule_cron", "must have 5 fields: minute hour day month weekday")
        _check(10 <= self.lease_seconds <= 86_400, "learner.lease_seconds", "must be between 10 and 86400")


@dataclass
class AppConfig:
    host: str = _f("127.0.0.1", "Address the web app binds; keep loopback unless you put it behind a proxy.")
    port: int = _f(7860, "Port of the web app.")
    title: str = _f("Heed", "Title shown in the browser.")
    login_max_failures: int = _f(5, "Failed logins in a row before the account is locked for a while.")
    login_lockout_seconds: int = _f(60, "How long an account stays locked after too many failures.")

    def __post_init__(self) -> None:
        _check(bool(self.host.strip()), "app.host", "must not be empty")
        _check(1 <= self.port <= 65535, "app.port", "must be between 1 and 65535")
        _check(1 <= self.login_max_failures <= 1000, "app.login_max_failures", "must be between 1 and 1000")
        _check(0 <= self.login_lockout_seconds <= 86_400, "app.login_lockout_seconds", "must be between 0 and 86400")


@dataclass
class HeedConfig:
    data_dir: str = _f("data", "Folder for the database, adapters and the converted model; relative to the working directory.")
    model: ModelConfig = _f(None, "The base model and how it runs.")
    generation: GenerationConfig = _f(None, "How replies are generated.")
    store: StoreConfig = _f(None, "The SQLite store.")
    learner: LearnerConfig = _f(None, "How adapters are trained, judged and promoted.")
    app: AppConfig = _f(None, "The web app.")

    def __post_init__(self) -> None:
        _check(bool(self.data_dir.strip()), "data_dir", "must not be empty")
        for name, cls in _SECTIONS.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())

    # Resolved paths, so every component agrees on where files live.
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def db_path(self) -> Path:
        p = Path(self.store.path).expanduser()
        return p if p.is_absolute() else self.data_path / p

    @property
    def adapters_path(self) -> Path:
        p = Path(self.learner.adapters_dir).expanduser()
        return p if p.is_absolute() else self.data_path / p

    @property
    def models_path(self) -> Path:
        return self.data_path / "models"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationConfig,
    "store": StoreConfig,
    "learner": LearnerConfig,
    "app": AppConfig,
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        _check(-(2**63) < value < 2**63, key, "is out of range")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        _check(abs(value) < 2**63 if isinstance(value, int) else math.isfinite(value), key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key, f"expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    _check(isinstance(data, dict), prefix or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in _SECTIONS and cls is HeedConfig:
            kwargs[name] = _build(_SECTIONS[name], value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, hints[name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def config_from_dict(data: dict | None) -> HeedConfig:
    """Build a validated HeedConfig from a plain (YAML-shaped) dict."""
    return _build(HeedConfig, data or {}, "")


def load_config(path: str | os.PathLike | None = None, *, overrides: dict | None = None) -> HeedConfig:
    """Load a YAML config file (or defaults when path is None), then apply overrides.

    ``overrides`` is a nested dict merged over the file, e.g.
    ``{"data_dir": "/tmp/x", "model": {"torch_threads": 1}}``.
    """
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


def describe(cls: type = HeedConfig) -> list[tuple[str, Any, str]]:
    """(key, default, help) for every knob, for docs and `heed config`."""
    rows = []
    for f in dataclasses.fields(cls):
        if cls is HeedConfig and f.name in _SECTIONS:
            for k, d, h in describe(_SECTIONS[f.name]):
                rows.append((f"{f.name}.{k}", d, h))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows
