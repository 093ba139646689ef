"""A shorter step along the one a run took: an adapter part of the way from where the run started to its candidate.

When the gate refuses a candidate it says the step went too far (a collapse into one
reply, drift, forgotten answers), not that the feedback was wrong. Like a backtracking
line search, the run then judges points nearer its start on the same path, which costs
a gate pass, not another training run (weight interpolation between a start and a
fine-tuned model is WiSE-FT's robustness trick). A new adapter starts at B = 0, so
scaling B by t moves every weight delta exactly t of the way; a continued one moves
both A and B t of the way from the active adapter's (the weight delta then lies on a
curve between the two, off the straight line by t(1-t)·ΔB·ΔA).
"""
from __future__ import annotations

import shutil
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
# What describes the adapter; the gate's kept answers and scores belong to the candidate, not to this point.
ADAPTER_FILES = ("adapter_config.json", "README.md")


def shrink_step(*, start_dir: str | None, candidate_dir: Path, out_dir: Path, t: float) -> None:
    """Write into ``out_dir`` the adapter ``t`` of the way from ``start_dir`` (None: no adapter) to ``candidate_dir``."""
    from safetensors.torch import load_file, save_file

    if not 0.0 < t < 1.0:
        raise ValueError(f"a shorter step is a share in (0, 1), got {t}")
    cand = load_file(str(Path(candidate_dir) / WEIGHTS))
    start = load_file(str(Path(start_dir) / WEIGHTS)) if start_dir else {}
    out = {}
    for name, w in cand.items():
        if start:
            s = start.get(name)
            if s is None or s.shape != w.shape:
                raise ValueError(f"{name}: the candidate does not continue the adapter in {start_dir}")
            out[name] = (s.float() + t * (w.float() - s.float())).to(w.dtype)
        elif "lora_B" in name:
            out[name] = (t * w.float()).to(w.dtype)
        else:  # lora_A: with B scaled, the product moves t of the way whatever A is
            out[name] = w
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ADAPTER_FILES:
        if (Path(candidate_dir) / f).is_file():
            shutil.copy2(Path(candidate_dir) / f, out_dir / f)
    save_file(out, str(out_dir / WEIGHTS), metadata={"format": "pt"})


def describe_attempts(attempts: list[dict], status: str) -> list[str]:
    """What a run's refused steps were, for its summary line: [] when its first candidate was final."""
    if len(attempts) < 2:
        return []
    return [f"{a['step']:.0%} of its step refused: {'; '.join(a['reasons'])}" for a in attempts[:-1]] + \
           [f"{status} at {attempts[-1]['step']:.0%}"]
