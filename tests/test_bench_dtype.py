"""`heed bench dtype --quick`: both dtypes measured on the tiny model, and fp32 answers do not depend on their batch."""
from __future__ import annotations

import json
import math


def test_dtype_bench_measures_both_dtypes_and_fp32_answers_are_batch_invariant(tmp_path):
    from bench.cli import main

    out = tmp_path / "dtype.json"
    assert main(["dtype", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for dtype in ("float32", "bfloat16"):
        assert res["train_seconds"][dtype] > 0 and math.isfinite(res["train_loss"][dtype])
    for mode in ("float32", "bfloat16", "bfloat16_plain"):
        assert set(res["tokens_per_s"][mode]) == {"1", "4"} and all(v > 0 for v in res["tokens_per_s"][mode].values())
    # Serving rests on this: a user's greedy answer is the same whoever else is in the batch.
    for mode in ("float32", "bfloat16"):
        inv = res["batch_invariance"][mode]
        assert inv["same_in_batch"] == inv["same_in_reversed_batch"] == inv["prompts"] == 4
    assert all(res["answer_quality"][m]["prompts"] == 4 for m in ("float32", "bfloat16", "float32_end_spared"))
    assert res["train_speedup_bf16"] > 0 and isinstance(res["cpu_native_bf16"], bool)
