"""Which device and dtype the model runs in: ``model.device`` and ``model.dtype`` resolved for this machine.

``dtype: auto`` means bf16 wherever the hardware computes it natively: a CUDA
GPU that supports it, or a CPU with bf16 matrix instructions (x86 AVX512-BF16
or AMX, Arm's BF16 extension). Measured on the embedded model on such a CPU
(AMD EPYC with AVX512-BF16, 2 threads, ``heed bench dtype`` ->
``bench/results/dtype.json``): the learner's DPO training 2.5x faster than in
fp32, greedy generation 1.9x (one answer) to 2.6x (32 at once). A CPU without
them emulates bf16 and is slower in it, so auto keeps fp32 there.

The learner takes ``learner.dtype`` (auto by default); serving takes
``model.dtype``, fp32 in the CPU configs: see ``learner_config`` for why.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import replace
from pathlib import Path

# /proc/cpuinfo flag names of native bf16 matrix arithmetic (x86: "flags", Arm: "Features").
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_flags(cpuinfo: str) -> set[str]:
    """Every flag or feature /proc/cpuinfo text names, across its processors."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 matrices in hardware (not emulated)?"""
    if platform.system() != "Linux":
        return False  # no cheap, reliable probe elsewhere: fp32 is never the slow choice there
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(cpu_flags(text) & _BF16_FLAGS)


def pick_device_dtype(model_cfg):
    """(device string, torch dtype) for a ``ModelConfig``; a CUDA device that is not there is an error."""
    import torch

    device = model_cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {device!r} but CUDA is not available on this machine")
    dtype_name = model_cfg.dtype
    if dtype_name == "auto":
        native = torch.cuda.is_bf16_supported() if device.startswith("cuda") else cpu_has_native_bf16()
        dtype_name = "bfloat16" if native else "float32"
    return device, getattr(torch, dtype_name)


def contiguous_head_input(model) -> None:
    """Make the output layer's input contiguous before it multiplies.

    Generation hands the head a slice (each row's last position). With a
    non-contiguous 3-D input, torch's bf16 matmul on CPU expands the head's
    weight once per row: 2.7 GB and 1.5 s for a batch of 48 on the embedded
    model (49152 x 576 head), where a contiguous copy of the slice costs nothing.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def learner_config(config):
    """``config`` as the learner loads its base model to train: ``model.dtype`` replaced by ``learner.dtype``.

    Training is where bf16 pays without a cost: the adapter's own weights stay
    fp32 and a run's batches are the same every time, so it reproduces. The gate
    and serving keep ``model.dtype`` (fp32 on a CPU by default): on the embedded
    model bf16 greedy answers ran past 256 tokens twice as often (21 against 10
    of 96 prompts), and the gate must judge what users will get.
    """
    want = config.learner.dtype
    return config if want == "model" else replace(config, model=replace(config.model, dtype=want))
