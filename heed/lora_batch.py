"""Pieces of the engine's batched generation: a request row, a streamer that feeds each row its
own tokens, per-row stopping, and LoRA for a batch whose rows use different adapters.

One adapter for every row, unmerged (``OneAdapter``): a forward hook on each
LoRA layer adds ``s·B(Ax)`` to the frozen base layer's output. Switching users
is pointing the hooks at another adapter's weights: no weight is rewritten.

Mixed adapters: peft's ``adapter_names`` path loops over the adapters in every
layer (a few small matmuls and index copies each). Here every LoRA layer gets a
forward hook that adds ``B_i (A_i x_i)`` for all rows at once with two batched
matmuls over stacked (zero-padded) weights; a row without an adapter gets
zeros. Adapters peft computes differently (DoRA, LoRA biases, fan-in-fan-out)
fall back to peft's own ``adapter_names`` path.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Row:
    """One request in a batch; ``out`` (a queue) gets text pieces, then ``Row.END`` or an exception."""

    END = object()

    ids: list
    adapter: Any
    max_new: int
    gen: Any
    out: Any = None
    tokens: list = field(default_factory=list)
    sent: int = 0
    done: bool = False
    finished: bool = False
    final: str = ""
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self.done, self.error = True, exc
        if self.out is not None:
            self.out.put(exc)

    def text(self) -> str:
        return self.final


class BatchStreamer:
    """transformers calls ``put`` with the prompt, then with one new token per row per step."""

    def __init__(self, rows: list[Row], tokenizer, on_finish=None, lock=None) -> None:
        self.rows, self.tokenizer, self.on_finish = rows, tokenizer, on_finish
        self.lock = lock or contextlib.nullcontext()
        self.eos = tokenizer.eos_token_id
        self.prompt_seen = False

    def _decode(self, row: Row) -> str:
        with self.lock:
            return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def _finish(self, row: Row, finished: bool) -> None:
        row.done, row.finished = True, finished
        row.final = self._decode(row)
        if self.on_finish is not None:
            self.on_finish(row)  # before the consumer hears the end, so its counts are complete
        if row.out is not None:
            if len(row.final) > row.sent:
                row.out.put(row.final[row.sent:])
            row.out.put(Row.END)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, tok in zip(self.rows, value.reshape(-1).tolist()):
            self.feed(row, tok)

    def feed(self, row: Row, tok: int) -> None:
        """One new token for ``row``: streamed, or the row's end (its end-of-turn, its limit, a cancel)."""
        if row.done:
            return
        if row.cancel.is_set():
            self._finish(row, False)
        elif tok == self.eos:
            self._finish(row, True)
        else:
            row.tokens.append(tok)
            if row.out is not None:
                text = self._decode(row)
                # Hold back a half-decoded multi-byte character until its last byte arrives.
                if len(text) > row.sent and not text.endswith("\ufffd"):
                    row.out.put(text[row.sent:])
                    row.sent = len(text)
            if len(row.tokens) >= row.max_new:
                self._finish(row, False)

    def stop(self, row: Row) -> None:
        """End ``row`` where it is (its reader left): not finished by the model."""
        if not row.done:
            self._finish(row, False)

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                self._finish(row, False)


class RowStop:
    """Per-row stop: a cancelled row, or one at its own token limit, stops while the others go on."""

    def __init__(self, rows: list[Row], prompt_width: int) -> None:
        self.rows, self.width = rows, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        n = input_ids.shape[1] - self.width
        stop = [r.cancel.is_set() or r.done or n >= r.max_new for r in self.rows]
        # A lone row computed twice (heed.invariant): its copy stops with it.
        stop += stop[:1] * (input_ids.shape[0] - len(stop))
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


def sparing_penalty(penalty: float, spare: list[int], padding=None):
    """transformers' repetition penalty, except on the ``spare`` tokens (the end of a turn).

    The penalty counts the prompt too, and a chat template ends every turn of the
    prompt with the end-of-turn token: penalized, it makes every answer less
    likely to end, which on a small model means answers cut off at the limit.
    ``padding`` (each row's left padding, as transformers' own penalty takes it)
    keeps pad tokens out, so a row's scores never depend on its batch-mates.
    """
    import torch
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

    class SparingRepetitionPenalty(LogitsProcessor):
        def __init__(self) -> None:
            self.inner = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)
            self.spare = torch.tensor(sorted(set(spare)), dtype=torch.long)

        def __call__(self, input_ids, scores):
            spare = self.spare.to(scores.device)
            kept = scores[:, spare].clone()
            scores = self.inner(input_ids, scores)
            scores[:, spare] = kept
            return scores

    return SparingRepetitionPenalty()


def answer_penalty(penalty: float, prompt_width: int, always: list[int] = ()):
    """A repetition penalty on what the answer itself already said, not on the prompt.

    transformers' penalty counts every prompt token, so an answer pays for using
    the question's own words: the subject it is asked about. Here only the
    tokens generated after ``prompt_width`` (the batch's left-padded prompt, the
    same width for every row) count, so no row depends on its batch-mates'
    prompts or padding. ``always`` tokens are penalized as if said (the end of a
    turn, which every chat prompt holds: ``generation.penalize_end_of_turn``).
    """
    import torch
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

    class AnswerRepetitionPenalty(LogitsProcessor):
        def __init__(self) -> None:
            self.inner = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_width)
            self.always = torch.tensor(sorted(set(always)), dtype=torch.long)

        def __call__(self, input_ids, scores):
            scores = self.inner(input_ids, scores)
            if len(self.always):
                always = self.always.to(scores.device)
                # Those the answer already said were penalized once above; the rest are penalized here.
                said = (input_ids[:, prompt_width:, None] == always).any(dim=1)
                s = scores[:, always]
                scores[:, always] = torch.where(said, s, torch.where(s < 0, s * penalty, s / penalty))
            return scores

    return AnswerRepetitionPenalty()


def vanilla(layer, key: str) -> bool:
    """Plain LoRA on a Linear: ``y += s·B(Ax)``, which the fast paths compute themselves."""
    import torch

    return (type(layer).__name__ == "Linear" and key not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "lora_bias", {}).get(key, False) and not getattr(layer, "fan_in_fan_out", False)
            and isinstance(layer.lora_A[key], torch.nn.Linear))


class OneAdapter:
    """Forward hooks that add one adapter's LoRA to every layer it has, unmerged; ``use(key)`` switches."""

    def __init__(self) -> None:
        self._handles: dict = {}  # LoRA layer -> hook handle
        self._weights: dict[str, dict] = {}  # adapter key -> {layer: (A, B, scale)}
        self._active: dict = {}  # layer -> (A, scaled B) of the adapter in use
        self._active_key: str | None = None

    def add(self, key: str, layers) -> None:
        """Know ``key``'s weights (its vanilla LoRA layers) and hook any layer not hooked yet."""
        self._weights[key] = {m: (m.lora_A[key].weight, m.lora_B[key].weight, m.scaling[key]) for m in layers if key in m.lora_A}
        for m in self._weights[key]:
            if m not in self._handles:
                self._handles[m] = m.register_forward_hook(self._hook)
        if key == self._active_key:  # new weights under the key in use: rescale them
            self._active_key = None
            self.use(key)

    def forget(self, key: str) -> None:
        if self._active_key == key:
            self.use(None)
        self._weights.pop(key, None)

    def use(self, key: str | None) -> None:
        if key == self._active_key:  # add() resets the key when the weights under it change
            return
        import torch

        # Only the active adapter's B is kept pre-scaled (one small copy, not one per cached user): a
        # token then costs two small matmuls and an add per layer; at batch 1 on CPU the op count is the cost.
        with torch.no_grad():
            self._active = {m: (a, b * scale) for m, (a, b, scale) in self._weights[key].items()} if key is not None else {}
        self._active_key = key

    @property
    def active(self) -> bool:
        return bool(self._active)

    def _hook(self, module, args, output):
        w = self._active.get(module)
        if w is None:
            return output
        import torch.nn.functional as F

        a, b = w
        x = args[0]
        if x.dtype != a.dtype:
            return output + F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)
        return output + F.linear(F.linear(x, a), b)


class MergedAdapter:
    """One adapter folded into spare copies of the base weights (``W0 + s·BA``) that are swapped in.

    ``W0`` is never written: ``restore`` swaps the original Parameters back, so
    the base model comes back bit-identical.
    """

    def __init__(self) -> None:
        self._originals: dict = {}  # LoRA layer -> its untouched base weight Parameter
        self._buffers: dict = {}  # LoRA layer -> Parameter that holds W0 + delta while merged
        self.held: str | None = None  # the adapter whose W0 + s·BA the buffers hold

    def know(self, layers) -> None:
        for layer in layers:
            self._originals.setdefault(layer, layer.get_base_layer().weight)

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def forget(self, key: str) -> None:
        if self.held == key:
            self.held = None

    def merge(self, key: str, layers) -> None:
        """Swap in ``W0 + s·BA`` of ``key``; computed only when the buffers hold another adapter's."""
        import torch

        layers = list(layers)
        if self.held == key and all(layer in self._buffers for layer in layers):
            for layer in layers:  # the same user again after the bare base model: nothing to recompute
                layer.get_base_layer().weight = self._buffers[layer]
            return
        self.held = None  # half-written buffers must never be taken for key's
        try:
            with torch.no_grad():
                for layer in layers:
                    w0 = self._originals[layer]
                    buf = self._buffers.get(layer)
                    if buf is None or buf.shape != w0.shape:
                        buf = self._buffers[layer] = torch.nn.Parameter(torch.empty_like(w0), requires_grad=False)
                    a, b = layer.lora_A[key].weight, layer.lora_B[key].weight
                    torch.addmm(w0, b.to(w0.dtype), a.to(w0.dtype), alpha=layer.scaling[key], out=buf.data)
                    # A new Parameter object, not .data: a tied weight (lm_head/embeddings) must keep its own W0.
                    layer.get_base_layer().weight = buf
        except BaseException:
            # Out of memory half-way: the layers merged so far would serve this user's LoRA to everyone after.
            self.restore()
            raise
        self.held = key

    def restore(self) -> None:
        for layer, weight in self._originals.items():
            layer.get_base_layer().weight = weight


def _stacks(layer, keys: list[str | None]):
    """(A, B) with A: (rows, in, r) and B: (rows, r, out), scale folded into B; zeros where a row has no LoRA here."""
    import torch

    present = [k for k in keys if k is not None and k in layer.lora_A]
    if not present:
        return None
    r_max = max(layer.lora_A[k].weight.shape[0] for k in present)
    w = layer.get_base_layer().weight
    out_f, in_f = w.shape
    a = torch.zeros(len(keys), in_f, r_max, dtype=w.dtype, device=w.device)
    b = torch.zeros(len(keys), r_max, out_f, dtype=w.dtype, device=w.device)
    for i, k in enumerate(keys):
        if k is not None and k in layer.lora_A:
            wa, wb = layer.lora_A[k].weight, layer.lora_B[k].weight
            r = wa.shape[0]
            a[i, :, :r] = wa.t()
            b[i, :r, :] = wb.t() * layer.scaling[k]
    return a, b


def _hook(a, b):
    import torch

    def add_lora(module, args, output):
        x = args[0]
        return output + torch.bmm(torch.bmm(x.to(a.dtype), a), b).to(output.dtype)

    return add_lora


@contextlib.contextmanager
def _attached(stacks):
    handles = []
    try:
        for layer, (a, b) in stacks:
            handles.append(layer.register_forward_hook(_hook(a, b)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _peft_mixed(peft):
    peft.base_model.enable_adapter_layers()
    try:
        yield
    finally:
        peft.base_model.disable_adapter_layers()


class RowLora:
    """LoRA per batch row for the adapters ``keys`` (one per row, None: none), built once and attached per forward.

    The continuous decoder (``heed.decode``) keeps one across its steps: rows that
    leave are sliced out of the stacks instead of rebuilding them.
    """

    def __init__(self, peft, keys: list[str | None]) -> None:
        from peft.tuners.lora import LoraLayer

        self.peft, self.keys = peft, list(keys)
        layers = [m for m in peft.modules() if isinstance(m, LoraLayer)]
        self.vanilla = all(vanilla(layer, k) for layer in layers for k in set(keys) if k is not None and k in layer.lora_A)
        self.stacks = [(layer, st) for layer in layers if (st := _stacks(layer, self.keys)) is not None] if self.vanilla else []

    def select(self, rows: list[int]) -> None:
        """Keep only the batch rows ``rows`` (in that order)."""
        import torch

        self.keys = [self.keys[i] for i in rows]
        if self.stacks:
            idx = torch.tensor(rows, device=self.stacks[0][1][0].device)
            self.stacks = [(layer, (a[idx], b[idx])) for layer, (a, b) in self.stacks]

    def attached(self):
        """(context, model, extra forward/generate kwargs) computing every row with its own adapter."""
        if self.vanilla:
            return _attached(self.stacks), self.peft.base_model.model, {}
        names = [k if k is not None else "__base__" for k in self.keys]
        return _peft_mixed(self.peft), self.peft, {"adapter_names": names}


def mixed_lora(peft, keys: list[str | None]):
    """(context, model, extra generate kwargs) to run one batch whose rows use the adapters ``keys``."""
    return RowLora(peft, keys).attached()
