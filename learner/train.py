"""One user's adapter update: DPO (+ SFT term) on pairs, KTO on unpaired thumbs, with trl.

Training continues from the user's active adapter. trl then copies that
adapter into a frozen "ref" adapter, so the reference is the previous version;
for a first adapter the reference is the base with the LoRA disabled. Either
way no second copy of the base weights is made.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

from heed.config import HeedConfig

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def _rows_dpo(pairs: list[dict], system: str) -> list[dict]:
    rows = []
    for p in pairs:
        prompt = [{"role": "system", "content": system}, *p["prompt"]]
        # Rating weights become repetition: trl's DPO has no per-example weight.
        for _ in range(max(1, round(p.get("weight", 1.0)))):
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": p["chosen"]}],
                         "rejected": [{"role": "assistant", "content": p["rejected"]}]})
    return rows


def _rows_kto(examples: list[dict], system: str) -> list[dict]:
    return [{"prompt": [{"role": "system", "content": system}, *e["prompt"]],
             "completion": [{"role": "assistant", "content": e["completion"]}], "label": bool(e["label"])} for e in examples]


def _progress_callback(progress: Progress | None, stage: str):
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if progress and state.max_steps:
                progress(stage, state.global_step / state.max_steps)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return _CB()


def load_trainable(config: HeedConfig, init_adapter: str | None):
    """(model, tokenizer, peft_config_or_None) ready for a trl trainer."""
    from peft import LoraConfig, PeftModel

    from heed.engine import load_base

    model, tokenizer = load_base(config)
    lc = config.learner
    if init_adapter:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        return model, tokenizer, None
    peft_config = LoraConfig(r=lc.lora_r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                             target_modules=list(lc.target_modules), task_type="CAUSAL_LM")
    return model, tokenizer, peft_config


def _quiet(trainer):
    from transformers import PrinterCallback

    # With tqdm off, transformers prints every log dict to stdout; the CLI draws its own bar.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _common_args(config: HeedConfig, out: str, n_rows: int) -> dict:
    from heed.engine import pick_device_dtype

    lc = config.learner
    device, dtype = pick_device_dtype(config.model)
    import torch

    return dict(
        output_dir=out, per_device_train_batch_size=min(lc.batch_size, max(n_rows, 1)), num_train_epochs=lc.epochs,
        learning_rate=lc.learning_rate, beta=lc.beta, max_length=lc.max_length, seed=lc.seed,
        # bf16 and checkpointing halve CPU speed for no gain at this size (STACK.md).
        bf16=dtype == torch.bfloat16, fp16=False, gradient_checkpointing=False, use_cpu=device == "cpu",
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
        remove_unused_columns=False, dataloader_num_workers=0,
    )


def train_adapter(config: HeedConfig, *, init_adapter: str | None, dpo_pairs: list[dict], kto_examples: list[dict],
                  out_dir: Path, progress: Progress | None = None) -> dict:
    """Train and save the adapter (PEFT layout) into ``out_dir``; return training metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from heed.engine import set_threads

    set_threads(config.model.torch_threads)
    lc = config.learner
    system = config.generation.system_prompt
    model, tokenizer, peft_config = load_trainable(config, init_adapter)
    metrics: dict = {"dpo_rows": 0, "kto_rows": 0}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="heed-trainer-") as scratch:
        if dpo_pairs:
            rows = _rows_dpo(dpo_pairs, system)
            losses = ["sigmoid", "sft"] if lc.sft_weight > 0 else ["sigmoid"]
            weights = [1.0, lc.sft_weight] if lc.sft_weight > 0 else [1.0]
            args = DPOConfig(**_common_args(config, scratch, len(rows)), loss_type=losses, loss_weights=weights)
            cb = _progress_callback(progress, "dpo")
            trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[cb])
            result = _quiet(trainer).train()
            model, peft_config = trainer.model, None
            metrics.update(dpo_rows=len(rows), dpo_loss=result.training_loss, dpo_steps=result.global_step,
                           dpo_losses=cb.losses[-50:])
            metrics.update({f"dpo_{k.replace('/', '_')}": v for k, v in (trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}).items()
                            if isinstance(v, (int, float)) and k.startswith(("rewards", "logps"))})
        kto = list(kto_examples)
        # KTO estimates its KL term from mismatched examples in a batch: one example cannot train.
        if len(kto) >= 2:
            rows = _rows_kto(kto, system)
            if "ref" in getattr(model, "peft_config", {}):
                model.delete_adapter("ref")
            args = KTOConfig(**_common_args(config, scratch, len(rows)))
            cb = _progress_callback(progress, "kto")
            trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[cb])
            result = _quiet(trainer).train()
            model = trainer.model
            metrics.update(kto_rows=len(rows), kto_loss=result.training_loss, kto_steps=result.global_step)
        if not metrics["dpo_rows"] and not metrics["kto_rows"]:
            raise ValueError("nothing to train on")
    metrics["train_seconds"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), selected_adapters=["default"])
    if not math.isfinite(metrics.get("dpo_loss", 0.0)) or not math.isfinite(metrics.get("kto_loss", 0.0)):
        raise FloatingPointError(f"training diverged: {metrics}")
    return metrics
