"""Exact prefix sharing for the learner's forward passes: a batch's rows computed as one token tree.

A causal model's hidden state at a position depends only on the tokens up to it,
so rows that begin with the same tokens compute the same states for that
stretch. A preference batch is full of such stretches: the chosen and rejected
answers of a pair share their prompt (system message and question), every row
shares the system message, and an edit that adds a sign-off or a closing
question repeats the whole original answer before it; one that cuts an answer
down keeps its first sentences. trl pads each row to the longest one and
computes them all separately.

``shared_prefixes(model)`` patches the model's backbone for the duration of a
``with`` block: a right-padded batch becomes a few rows (segments, see
``plan_segments``), each holding each distinct prefix of its rows once (a token
trie), every token at its own position, attending to exactly its own ancestors;
the hidden states are gathered back into the padded layout the trainer expects.
The logits are the same function of the same tokens, so training is unchanged
but for float rounding; the gradient of a shared state is the sum of what every
row sharing it contributes, as it is when the rows are computed apart. (With
LoRA dropout, rows sharing a state share its dropout mask too.)

Only batches it can compute exactly are packed: 2-D right-padded input without
a cache, on an attention implementation that takes an explicit mask (sdpa,
eager). Anything else goes to the backbone unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class Tree:
    """A batch's rows as a token trie: node ``n`` is token ``tokens[n]`` at ``positions[n]`` under ``parents[n]``."""

    tokens: list[int]
    positions: list[int]
    parents: list[int]
    index: list[list[int]]  # index[row][t]: the node of the row's t-th token

    @property
    def size(self) -> int:
        return len(self.tokens)


def token_tree(rows: list[list[int]]) -> Tree:
    """The trie of ``rows``; parents come before their children, so the order is causal."""
    tokens: list[int] = []
    positions: list[int] = []
    parents: list[int] = []
    children: list[dict[int, int]] = []
    roots: dict[int, int] = {}
    index: list[list[int]] = []
    for row in rows:
        path: list[int] = []
        level, parent = roots, -1
        for pos, tok in enumerate(row):
            node = level.get(tok)
            if node is None:
                node = len(tokens)
                tokens.append(tok)
                positions.append(pos)
                parents.append(parent)
                children.append({})
                level[tok] = node
            path.append(node)
            level, parent = children[node], node
        index.append(path)
    return Tree(tokens, positions, parents, index)


def ancestor_mask(parents: list[int], width: int | None = None):
    """(width, width) bool: node i may attend to node j when j is i or one of its ancestors.

    Positions past the tree (padding to ``width``) attend to themselves only, so no softmax row is empty.
    """
    import torch

    n = len(parents)
    width = n if width is None else width
    mask = torch.zeros(width, width, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    for i in range(n, width):
        mask[i, i] = True
    return mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan_segments(rows: list[list[int]], *, budget: int) -> list[list[int]]:
    """Row numbers grouped into segments of about equal tree size, as few as keep each within ``budget`` tokens.

    Rows are taken in token order, so rows that share more than the whole batch
    shares (a pair's chosen and rejected answers to one question) form a group
    that always stays in one segment, and a row shares at least as much with the
    row before it as with any other. The batch computes every segment padded to
    the widest one, and a segment of m tokens attends over m x m: one segment
    while it fits the budget (attention is cheap at a few hundred tokens), else
    the groups spread over the fewest segments that fit, largest group first
    into the smallest segment. A group larger than the budget is a segment alone.
    """
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lambda r: rows[r])
    shared = [_common_prefix(rows[a], rows[b]) for a, b in zip(order, order[1:])]
    floor = min(shared, default=0)  # what every row shares (the system message)
    groups: list[list[int]] = [[order[0]]]
    sizes = [len(rows[order[0]])]
    for r, lcp in zip(order[1:], shared):
        if lcp > floor:
            groups[-1].append(r)
            sizes[-1] += len(rows[r]) - lcp
        else:
            groups.append([r])
            sizes.append(len(rows[r]))
    total = sum(sizes) - floor * (len(groups) - 1)
    bins = max(1, -(-total // budget))
    while True:
        segments: list[list[int]] = [[] for _ in range(min(bins, len(groups)))]
        load = [0] * len(segments)
        for g in sorted(range(len(groups)), key=lambda g: -sizes[g]):
            i = load.index(min(load))
            segments[i] += groups[g]
            load[i] += sizes[g] - (floor if load[i] else 0)
        if max(load) <= budget or bins >= len(groups):
            return segments
        bins += 1


def _row_lengths(attention_mask) -> list[int] | None:
    """Each row's token count when the batch is right-padded (ones, then zeros); None otherwise."""
    import torch

    lengths = attention_mask.sum(dim=1)
    width = attention_mask.shape[1]
    expected = torch.arange(width, device=attention_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), expected):
        return None
    return lengths.tolist()


class _Stats:
    """Tokens the packed forwards computed against what the padded batches held."""

    def __init__(self) -> None:
        self.padded = 0
        self.real = 0
        self.packed = 0
        self.calls = 0

    def as_dict(self) -> dict:
        return {"padded_tokens": self.padded, "real_tokens": self.real, "packed_tokens": self.packed,
                "packed_calls": self.calls}


# Tokens in one segment: attention over a segment is quadratic in its size, cheap up to several hundred tokens
# (embedded model, 2 CPU threads, forward and backward of 8 DPO pairs: 1199 tokens as one tree 6.8 s, as segments 5.7 s,
# padded rows 10.2 s; 4 pairs: 635 tokens as one tree 3.2 s, padded 6.0 s).
SEGMENT_TOKENS = 768

# Inputs that already fix positions or reuse a cache: the batch is computed as given.
_UNPACKABLE = ("position_ids", "cache", "past_key_values", "inputs_embeds")
# Outputs besides the last hidden state would come back in the packed layout: such calls are computed as given.
_PER_ROW_OUTPUTS = ("use_cache", "output_hidden_states", "output_attentions", "output_router_logits")


def _packable(backbone) -> bool:
    config = backbone.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False  # flash kernels take no mask; heed.invariant's row attention reads only the padding
    # Sliding layers are checked per batch (the window never bites within it); other kinds are not plain causal.
    return all(t in ("full_attention", "sliding_attention") for t in getattr(config, "layer_types", None) or [])


def _packed_forward(backbone, original, stats: _Stats):
    import torch

    eager = getattr(backbone.config, "_attn_implementation", None) == "eager"
    # An explicit mask replaces the model's own: a sliding window would be lost on rows longer than it.
    window = getattr(backbone.config, "sliding_window", None) if getattr(backbone.config, "use_sliding_window", True) else None

    def forward(*args, **kwargs):
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        plain = (args or input_ids is None or attention_mask is None or input_ids.dim() != 2 or attention_mask.dim() != 2
                 or any(kwargs.get(k) for k in _PER_ROW_OUTPUTS) or any(kwargs.get(k) is not None for k in _UNPACKABLE))
        lengths = None if plain else _row_lengths(attention_mask)
        if lengths is None or (window and max(lengths) > window):
            return original(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache", *_UNPACKABLE)}
        device = input_ids.device
        rows = [input_ids[r, :n].tolist() for r, n in enumerate(lengths)]
        # Two rows' worth: a pair's chosen and rejected answers always share one segment.
        segments = plan_segments(rows, budget=SEGMENT_TOKENS)
        trees = [token_tree([rows[r] for r in seg]) for seg in segments]
        width = max(t.size for t in trees)
        tokens = torch.zeros(len(trees), width, dtype=torch.long)
        positions = torch.zeros(len(trees), width, dtype=torch.long)
        allowed = torch.stack([ancestor_mask(t.parents, width) for t in trees])
        # Padding positions read node 0; the trainers never score them (their labels are -100).
        gather = torch.zeros(len(rows), input_ids.shape[1], dtype=torch.long)
        for s_, (seg, tree) in enumerate(zip(segments, trees)):
            tokens[s_, :tree.size] = torch.tensor(tree.tokens)
            positions[s_, :tree.size] = torch.tensor(tree.positions)
            for r, path in zip(seg, tree.index):
                gather[r, :len(path)] = torch.tensor(path) + s_ * width
        allowed = allowed.to(device)[:, None]
        if eager:
            # eager attention adds its mask to the scores
            dtype = backbone.get_input_embeddings().weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        else:
            mask = allowed
        out = original(input_ids=tokens.to(device), attention_mask=mask, position_ids=positions.to(device),
                       use_cache=False, **rest)
        hidden = out.last_hidden_state
        out.last_hidden_state = hidden.reshape(-1, hidden.shape[-1])[gather.to(device)]
        stats.calls += 1
        stats.padded += input_ids.numel()
        stats.real += sum(lengths)
        stats.packed += len(trees) * width
        return out

    return forward


@contextlib.contextmanager
def shared_prefixes(model, *, enabled: bool = True):
    """Within the block, the backbone of ``model`` (a causal LM, peft-wrapped or not) computes each batch as a
    token tree. Yields the token counts (``as_dict()``) for the run's metrics."""
    stats = _Stats()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "base_model", None)
    if not enabled or backbone is None or backbone is inner or not _packable(backbone):
        yield stats
        return
    own = backbone.__dict__.get("forward")  # a forward set on the instance (a hook) is put back as it was
    backbone.forward = _packed_forward(backbone, backbone.forward, stats)
    try:
        yield stats
    finally:
        if own is None:
            del backbone.forward
        else:
            backbone.forward = own


def pad_right(rows: list[list[int]], *, pad: int = 0, device=None):
    """(input_ids, attention_mask) of ``rows`` padded on the right, as the trainers' collators pad."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def answer_log_probs(model, sequences: list[tuple[list[int], int]], *, full: bool = False, max_tokens: int = 1024):
    """For each (ids, start): the log-probabilities of ``ids[start:]``, each given the tokens before it (a 1-D
    tensor), or with ``full`` the whole log-softmax row at each of those positions (answer length x vocabulary).

    Sequences are scored together, at most ``max_tokens`` tokens per forward pass (so the logits of a pass stay
    a few hundred MB), with the prefixes they share computed once. Call under ``torch.inference_mode()``.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: sequences[i][0])  # shared prompts side by side
    out: list = [None] * len(sequences)
    batch: list[int] = []

    def flush() -> None:
        ids, mask = pad_right([sequences[i][0] for i in batch], device=device)
        with shared_prefixes(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(batch):
            seq, start = sequences[i]
            lp = torch.log_softmax(logits[row, start - 1:len(seq) - 1].float(), dim=-1)
            out[i] = lp if full else lp.gather(-1, ids[row, start:len(seq), None])[:, 0]
        batch.clear()

    for i in order:
        if batch and (len(batch) + 1) * max(len(sequences[j][0]) for j in (*batch, i)) > max_tokens:
            flush()
        batch.append(i)
    if batch:
        flush()
    return out
