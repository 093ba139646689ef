"""Half-precision serving whose answers do not depend on the batch: attention row by row.

In bf16 a user's greedy answer changed with the prompts padded into its batch
(0 of 8 answers alone matched the same prompt in a batch; ``heed bench dtype``).
Two things differ between a row alone and the same row in a batch, and both are
fixed here or in the engine:

- attention over left padding: SDPA sums a row's keys in blocks, so padding
  shifts where its real keys fall and changes the rounding. ``row_attention``
  runs SDPA once per group of rows that start at the same position, on their
  real keys only: exactly the call the row gets alone. (Grouped rows and strided
  slices were checked to give the same bits as one contiguous row.)
- a matmul of one row takes another CPU kernel than two or more rows do, and
  rounds differently (17 of 115,200 outputs of a 1536-wide bf16 product; every
  width and row count from 2 up agreed). The engine never generates a single
  row in half precision: a lone request gets a duplicate that nobody reads.

With both, bf16 answers are the same alone, in a batch and in a reversed batch
(``tests/test_invariant.py``; the tiny test model's rounding never shows
the problem, the embedded model's test does). fp32 needs neither: its rounding is
fine enough that greedy answers matched without them.
"""
from __future__ import annotations

NAME = "heed_rows"


def row_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA per group of rows with the same first real key; rows' padded queries get zeros (they are never read)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None or (q_len > 1 and q_len != kv_len):
        # No padding (one call is the alone call), or a prefill against an existing cache, which Heed never runs.
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    last = attention_mask[:, 0, -1, :]  # the keys each row's newest query may see
    valid = last if last.dtype == torch.bool else last == 0
    starts = valid.to(torch.int8).argmax(-1).tolist()
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], value.shape[-1])
    for start in sorted(set(starts)):
        rows = torch.tensor([i for i, s in enumerate(starts) if s == start], device=query.device)
        q0 = start if q_len > 1 else 0
        o, _ = sdpa_attention_forward(module, query[rows, :, q0:], key[rows, :, start:], value[rows, :, start:], None, **kwargs)
        out[rows, q0:] = o
    return out, None


def use_row_attention(model) -> bool:
    """Switch ``model`` from SDPA to ``row_attention``; False (unchanged) for models on another attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False  # eager, flash or a model's own attention: their arguments are not SDPA's
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False  # row_attention reads only each row's padding from the mask: a window would be lost
    AttentionInterface.register(NAME, row_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
