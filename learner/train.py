"""One user's adapter update with trl: DPO (+ an SFT term) on pairs, KTO on unpaired examples.

Training continues from the user's active adapter (a fresh LoRA for a first
run). The reference is never a second copy of the base weights: with
``learner.reference = 'base'`` it is the base with the adapter disabled (trl's
frozen "ref" copy is dropped right after the trainer is built), with
``'previous'`` a frozen copy of the active adapter.

``learner.paired_loss = 'dpo'`` trains pairs with DPO and the unpaired
examples with KTO in a second pass over the same model; ``'kto'`` splits every
pair into a desirable and an undesirable example and trains one KTO pass.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from heed.config import HeedConfig

from .packing import shared_prefixes
from .rows import _Rows, as_kto, kto_weights, split_imitated

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


class LeaseLost(RuntimeError):
    """Another run took the user over while this one trained; it must not promote."""


def torch_threads(config: HeedConfig) -> int:
    """The explicit thread count for training: the configured one, or every core this process may use."""
    return config.model.torch_threads or len(os.sched_getaffinity(0))


def quiet_progress_bars() -> None:
    """The CLI draws one bar per run; the libraries' own bars (tokenizing, loading weights) would interleave."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_trainable(config: HeedConfig, init_adapter: str | None):
    """(peft model with a trainable 'default' adapter, tokenizer). The base weights stay frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    from heed.engine import load_base
    from heed.hardware import learner_config

    model, tokenizer = load_base(learner_config(config))
    lc = config.learner
    set_seed(lc.seed)
    if init_adapter:
        # Continue with the saved adapter's own LoRA shape (a changed lora_r applies to new users' adapters).
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True), tokenizer
    peft_config = LoraConfig(r=lc.lora_r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                             target_modules=list(lc.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config), tokenizer


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}


def _fix_reference(model, reference: str, initial: dict) -> None:
    """After trl built its frozen 'ref' copy of the current adapter: make it the configured reference."""
    if "ref" not in model.peft_config:
        return
    if reference == "base" or not initial:
        # Without a 'ref' adapter trl scores the reference with every adapter disabled: the base model.
        model.delete_adapter("ref")
        return
    import torch

    with torch.no_grad():
        for name, value in initial.items():
            model.get_parameter(name.replace(".default.", ".ref.")).copy_(value)


def precompute_reference(trainer) -> None:
    """Score every DPO row under the reference once, before training, instead of once per step.

    The reference is fixed (the base with the adapter disabled, or the frozen
    copy ``_fix_reference`` set up), so every epoch would recompute the same
    numbers; trl's own ``precompute_ref_log_probs`` runs inside the trainer's
    constructor, before the reference is set to what ``learner.reference`` asks.
    """
    import torch

    ds, bs = trainer.train_dataset, trainer.args.per_device_train_batch_size
    device = trainer.accelerator.device
    chosen, rejected = [], []
    for i in range(0, len(ds), bs):
        batch = trainer.data_collator([ds[j] for j in range(i, min(i + bs, len(ds)))])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen += c.float().cpu().tolist()
        rejected += r.float().cpu().tolist()
    trainer.train_dataset = ds.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
    trainer.precompute_ref_logps = True


def _callback(progress: Progress | None, keepalive: Callable[[], bool] | None, done_before: int, total: int):
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.last: dict = {}
            self.lost = False
            self._renewed = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress("train", min(1.0, (done_before + state.global_step) / max(total, 1)))
            if keepalive and time.monotonic() - self._renewed > 20:
                self._renewed = time.monotonic()
                if not keepalive():
                    self.lost = True
                    control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.last = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}

    return _CB()


def _args(config: HeedConfig, out: str, n_rows: int, phase: str) -> dict:
    import torch

    from heed.hardware import learner_config, pick_device_dtype

    lc = config.learner
    device, dtype = pick_device_dtype(learner_config(config).model)
    cuda = device.startswith("cuda")
    # bf16 autocast over a bf16 base (the LoRA weights stay fp32): on a CPU with native bf16 a step took 0.45x the
    # fp32 time (heed.hardware). Gradient checkpointing only trades time for memory a 135M model does not need.
    bf16 = dtype == torch.bfloat16 or (cuda and torch.cuda.is_bf16_supported())
    return dict(
        output_dir=out, per_device_train_batch_size=min(lc.batch_size, max(n_rows, 1)), num_train_epochs=_epochs(n_rows, config, phase),
        learning_rate=lc.learning_rate, beta=lc.beta, max_length=lc.max_length, seed=lc.seed,
        bf16=bf16, fp16=False, gradient_checkpointing=False, activation_checkpointing=False, use_cpu=not cuda,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
        remove_unused_columns=False, dataloader_num_workers=0, warmup_steps=0,
    )


def _epochs(n_rows: int, config: HeedConfig, phase: str = "dpo") -> int:
    """Passes over a phase's rows: ``epochs``, or (DPO, anchored by its SFT term) more when that gives fewer than ``min_steps`` steps."""
    lc = config.learner
    if phase != "dpo":
        return lc.epochs
    per_epoch = math.ceil(n_rows / min(lc.batch_size, max(n_rows, 1))) if n_rows else 1
    return max(lc.epochs, math.ceil(lc.min_steps / per_epoch))


def cap_kto(rows: list[dict], n: int, *, rng: random.Random) -> list[dict]:
    """At most ``n`` of these KTO rows, drawn from each label in proportion (each present label keeps at least one)."""
    if len(rows) <= n:
        return rows
    if n < 2:
        return []  # KTO needs two
    groups = [[r for r in rows if r["label"]], [r for r in rows if not r["label"]]]
    groups = [g for g in groups if g]
    keep = [max(1, round(n * len(g) / len(rows))) for g in groups]
    if sum(keep) > max(n, len(groups)):
        keep[keep.index(max(keep))] -= sum(keep) - max(n, len(groups))
    return [r for g, k in zip(groups, keep) for r in rng.sample(g, k)]


def _steps(n_rows: int, config: HeedConfig, phase: str = "dpo") -> int:
    bs = min(config.learner.batch_size, max(n_rows, 1))
    return math.ceil(n_rows / bs) * _epochs(n_rows, config, phase) if n_rows else 0


class SpareEnd:
    """A trl collator wrapped so the end of every rejected (DPO) or undesirable (KTO) answer is left out of the loss.

    Each such answer ends with the end-of-turn token, and the loss lowers that
    token's probability where the answer stopped, whatever was wrong with it;
    an edit that only adds a line lowers "stop here" outright. Added up over
    runs, the end of every answer falls: answers that never end. Masked from
    the answer's first end-of-turn token on (what the chat template puts after
    it too), the policy and the reference score the same tokens, so DPO and KTO
    compare what the answer says. Chosen and desirable answers keep their end:
    that is where the user's answer stopped.
    """

    def __init__(self, collate, end_id: int, *, phase: str) -> None:
        self.collate, self.end_id, self.phase = collate, end_id, phase
        self.spared = 0  # end tokens left out, counted over every batch this collator built

    def __call__(self, examples):
        import torch

        out = self.collate(examples)
        mask = out["completion_mask"]
        if self.phase == "kto":
            rows = ~out["label"].bool()
        else:  # trl stacks the chosen rows, then the rejected ones
            n = mask.size(0) // 2
            rows = torch.arange(mask.size(0)) >= n
            # A row trained by the SFT term alone (learner.extension_pairs 'sft') has rejected = chosen: a zero margin.
            rows[n:] &= ~(out["input_ids"][:n] == out["input_ids"][n:]).all(dim=1)
        end = (out["input_ids"] == self.end_id) & mask.bool() & rows[:, None]
        self.spared += int(end.any(dim=1).sum())
        out["completion_mask"] = mask.masked_fill(end.long().cumsum(dim=1) > 0, 0)
        return out


def _quiet(trainer):
    from transformers import PrinterCallback

    # With tqdm off, transformers prints every log dict to stdout; the CLI draws its own bar.
    trainer.remove_callback(PrinterCallback)
    return trainer


@contextlib.contextmanager
def library_noise_muted():
    """peft and trl read a property transformers 5 renamed; its FutureWarning says nothing to a Heed user.

    A process-wide filter for that one message, not ``catch_warnings``: the
    learner runs on background threads (the UI's "learn now", the benchmark),
    and ``catch_warnings`` swaps the global filter list, so a thread that
    leaves it restores the list under another thread still training.
    """
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    yield


def score_answer_tokens_only() -> bool:
    """Make trl's fused LM head score only the answer tokens on a CPU, as it does on a GPU; True when in effect.

    trl 1.16 projects every position of a batch through the 49152-word head on
    a device without Triton, prompt and padding included, and masks the result
    afterwards (to keep tile shapes fixed for compilers; eager CPU torch does
    not recompile). Only positions with a label count: scoring just those gives
    the same log-probabilities and loss, and on the embedded model a 16-edit run
    trained in 55 s instead of 90 s with the same loss to the last digit
    (bf16, 2 threads, one run each way). trl decides that through its private ``_use_triton``
    name; if a later trl lacks it, training stays correct, only slower.
    """
    import trl.trainer.utils as tu

    decide = getattr(tu, "_use_triton", None)
    if decide is None:
        log.info("trl has no _use_triton: its LM head scores every position on a CPU")
        return False
    if getattr(decide, "heed_compact_on_cpu", False):
        return True

    def compact(device) -> bool:
        return device.type == "cpu" or decide(device)

    compact.heed_compact_on_cpu = True
    tu._use_triton = compact
    return True


def train_adapter(config: HeedConfig, **kw) -> dict:
    """Train and save the adapter (PEFT safetensors layout) into ``out_dir``; return training metrics.

    Keywords: ``init_adapter`` (the active adapter's folder or None),
    ``dpo_pairs``, ``kto_examples``, ``out_dir``, and optionally ``progress``,
    ``keepalive`` (called every ~20 s while training; the run renews its lease
    there, and a False stops training with ``LeaseLost``) and ``before_save``.
    """
    with library_noise_muted():
        return _train(config, **kw)


def _train(config: HeedConfig, *, init_adapter: str | None, dpo_pairs: list[dict], kto_examples: list[dict],
           out_dir: Path, progress: Progress | None = None, keepalive: Callable[[], bool] | None = None,
           before_save: Callable[[], None] | None = None) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from heed.engine import set_threads

    lc = config.learner
    quiet_progress_bars()
    set_threads(torch_threads(config))
    compact = score_answer_tokens_only()
    model, tokenizer = load_trainable(config, init_adapter)
    rows = _Rows(tokenizer, config.generation.system_prompt, lc.max_length, extension_pairs=lc.extension_pairs)
    rng = random.Random(lc.seed)
    if lc.paired_loss == "kto":
        dpo_rows, prefer_rows, kto_rows = [], [], rows.kto(as_kto(dpo_pairs) + list(kto_examples))
    else:
        imitated, preferred = split_imitated(dpo_pairs, config)
        dpo_rows, prefer_rows, kto_rows = rows.dpo(imitated), rows.dpo(preferred, imitated=False), rows.kto(kto_examples)
    # Lone thumbs are mostly praise of answers the adapter already gives; the cap bounds how far they can outnumber
    # the pairs that say what to change (off by default: it did not win, docs/MEASUREMENTS.md, "Lone thumbs, measured").
    kto_lone = len(kto_rows)
    if lc.kto_max_per_pair and dpo_rows + prefer_rows:
        kto_rows = cap_kto(kto_rows, int(lc.kto_max_per_pair * len(dpo_rows + prefer_rows)), rng=rng)
    capped = kto_lone - len(kto_rows)
    # KTO estimates its KL term from mismatched examples in a batch: one example cannot train. And with no
    # desirable example it can only push probability away from the answers given, onto anything: measured
    # here, two thumbs-down examples trained that way turned every answer into "- -".
    if len(kto_rows) < 2 or not any(r["label"] for r in kto_rows):
        kto_rows = []
    if not dpo_rows and not kto_rows:
        raise ValueError("nothing to train on")
    rng.shuffle(kto_rows)  # KTO samples in order (its KL pairs neighbours), so mix labels here.
    total = _steps(len(dpo_rows), config) + _steps(len(prefer_rows), config, "prefer") + _steps(len(kto_rows), config, "kto")
    initial = _snapshot(model) if lc.reference == "previous" and init_adapter else {}
    phases = (("kto", kto_rows), ("prefer", prefer_rows), ("dpo", dpo_rows))
    metrics: dict = {"dpo_rows": len(dpo_rows), "prefer_rows": len(prefer_rows), "kto_rows": len(kto_rows), "kto_rows_capped": capped, "rows_cut": rows.cut,
                     "torch_threads": torch.get_num_threads(), "reference": lc.reference, "paired_loss": lc.paired_loss,
                     "continued_from": init_adapter, "phases": [p for p, rows_ in phases if rows_], "head_scores_answers_only": compact}
    scratch = out_dir / "trainer"
    t0 = time.perf_counter()
    done = 0
    tokens: dict = {}
    # KTO first, then the pairs only preferred (DPO alone), DPO with its SFT term on the endorsed answers last:
    # the last pass anchors the answers' content.
    for phase, data in phases:
        if not data:
            continue
        cb = _callback(progress, keepalive, done, total)
        common = _args(config, str(scratch), len(data), phase)
        if phase in ("dpo", "prefer"):
            sft = phase == "dpo" and lc.sft_weight > 0
            losses = ([] if lc.dpo_loss == "none" else [(lc.dpo_loss, 1.0)]) + ([("sft", lc.sft_weight)] if sft else [])
            args = DPOConfig(**common, loss_type=[n for n, _ in losses], loss_weights=[w for _, w in losses])
            trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer, callbacks=[cb])
        else:
            nd = sum(r["label"] for r in data)
            nu = len(data) - nd
            weights = kto_weights(nd, nu, balance=lc.kto_weight_balance)
            args = KTOConfig(**common, **weights)
            trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer, callbacks=[cb])
        _fix_reference(trainer.model, lc.reference, initial)
        if lc.spare_end:
            trainer.data_collator = spared = SpareEnd(trainer.data_collator, tokenizer.eos_token_id, phase=phase)
        with shared_prefixes(trainer.model, enabled=lc.shared_prefixes) as packed:
            if phase != "kto" and lc.precompute_reference:
                precompute_reference(trainer)
            result = _quiet(trainer).train()
        for k, v in (packed.as_dict() if packed.calls else {}).items():
            tokens[k] = tokens.get(k, 0) + v
        if cb.lost:
            raise LeaseLost("another run took this user's lease while training; nothing promoted")
        model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        done += result.global_step
        if lc.spare_end:
            metrics[f"{phase}_ends_spared"] = spared.spared
        metrics.update({f"{phase}_loss": result.training_loss, f"{phase}_steps": result.global_step,
                        f"{phase}_losses": cb.losses[-50:]})
        metrics.update({f"{phase}_{k.replace('/', '_')}": v for k, v in cb.last.items() if k.startswith(("rewards", "logps", "kl"))})
        if not math.isfinite(result.training_loss):
            raise FloatingPointError(f"{phase} training diverged (loss {result.training_loss})")
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics.update(tokens)
    shutil.rmtree(scratch, ignore_errors=True)
    if before_save:
        before_save()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), selected_adapters=["default"])
    return metrics
