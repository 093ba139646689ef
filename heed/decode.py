"""Continuous batching: a request joins the running batch at the next step and leaves it when its answer ends.

``model.generate`` answers a fixed batch: a request that arrives while it runs
waits for the longest answer in it, and rows that already ended go on being
computed (as padding) until the last one does. ``Decoder`` runs the decoding
loop itself, one forward pass per step over the rows still answering:

- a new row is prefilled alone (its prompt's keys and values are what they are
  with nobody else there) and its first token streams at once; its cache is
  then left-padded to the batch's length (or the batch's to its) and stacked
  under the others';
- a row that ended (end of turn, its token limit, its reader gone) is sliced
  out before the next step, and cache columns that are padding for every row
  left are trimmed;
- each row keeps its own decoding: a repetition penalty over its own tokens
  (never a batch-mate's padding), greedy, or sampled with its own seeded
  generator, so a sampled regeneration shares a batch with greedy chats and
  still draws the tokens it would draw alone.

The engine holds its lock per step, not per answer, so the adapter state is
set again every step (cheap: hooks are repointed; per-row LoRA stacks live as
long as the rows do). Models whose layers keep a sliding window are served by
``model.generate`` instead: their caches cannot be padded and stacked like this.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from collections import deque

from .adapter_slots import AdapterLoadError
from .lora_batch import BatchStreamer, Row, RowLora


def supports_continuous(model) -> bool:
    """True when every layer attends to every earlier key (a plain growing cache that rows can share)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not getattr(config, "sliding_window", None)


def _cache_keyword(model) -> str:
    # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _key(row: Row):
    return row.adapter.key if row.adapter is not None else None


class Decoder:
    """The rows being answered together and their shared (left-padded) cache."""

    def __init__(self, engine, *, capacity: int) -> None:
        self.engine, self.capacity = engine, capacity
        self.rows: list[Row] = []
        self.streamer = BatchStreamer([], engine.tokenizer, on_finish=engine._count, lock=engine._tok_lock)
        self.eos = engine.tokenizer.eos_token_id
        top_k = getattr(engine.base.generation_config, "top_k", None)
        self.top_k = 50 if top_k is None else top_k  # transformers' default when a model's config sets none
        self._cache_kw = _cache_keyword(engine.base)
        self._reset()

    def _reset(self) -> None:
        self.rows = []
        self.cache = None
        # Per row: which cache columns are real, the next position id, the token to feed next, the tokens the
        # repetition penalty counts, the penalty, whether the end of a turn is spared, the sampler's generator.
        self.mask = self.pos = self.next = self.seen = self.penalty = self.spare = None
        self.gens: list = []
        self.lora: RowLora | None = None

    # -- membership ---------------------------------------------------------------
    @property
    def room(self) -> int:
        return self.capacity - len(self.rows)

    def fits(self, row: Row) -> bool:
        """Room for ``row`` without holding more distinct adapters than the engine's cache keeps."""
        keys = {_key(r) for r in self.rows}
        return self.room > 0 and (_key(row) in keys or len(keys) < self.engine.model_cfg.max_cached_adapters)

    def join(self, row: Row) -> None:
        """Prefill ``row`` alone, stream its first token, and add it to the batch (caller holds the engine lock)."""
        import torch

        eng = self.engine
        if row.cancel.is_set():
            return
        try:
            if row.adapter is not None:
                eng.ensure_adapter(row.adapter)
        except AdapterLoadError as exc:
            row.fail(exc)
            return
        from transformers import DynamicCache

        cache = DynamicCache(config=eng.base.config)
        n = len(row.ids)
        ids = torch.tensor([row.ids], device=eng.device)
        ctx, model, extra = self._state([row.adapter], fresh=True)
        with torch.inference_mode(), ctx:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n, device=eng.device)[None],
                        use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}, **extra)
        logits = out.logits[:, -1, :].float()
        gen = row.gen
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=eng.device)
        if gen.penalty_counts_prompt:
            seen[0, ids[0]] = True
        elif gen.penalize_end_of_turn:
            seen[0, self.eos] = True  # every chat prompt ends turns with it (heed.lora_batch.answer_penalty)
        spare = torch.tensor([not gen.penalize_end_of_turn], device=eng.device)
        if spare[0]:
            seen[0, self.eos] = False
        penalty = torch.tensor([[float(gen.repetition_penalty)]], device=eng.device)
        generator = None
        if gen.do_sample:
            generator = torch.Generator(device=eng.device)
            generator.manual_seed(int(gen.seed))
        tok = self._choose(logits, seen, penalty, [row], [generator])[0]
        self.streamer.feed(row, tok)
        if row.done:
            return
        self._see(seen, spare, torch.tensor([tok], device=eng.device))
        mask = torch.ones(1, n, dtype=torch.long, device=eng.device)
        if self.cache is None:
            eng.batches_run += 1
            self.cache, self.mask = cache, mask
            self.pos = torch.tensor([n], device=eng.device)
            self.next = torch.tensor([tok], device=eng.device)
            self.seen, self.penalty, self.spare, self.gens, self.rows = seen, penalty, spare, [generator], [row]
            self.lora = None
            return
        width = self.mask.shape[1]
        if n < width:
            mask = self._pad(cache, mask, width - n)
        elif n > width:
            self.mask = self._pad(self.cache, self.mask, n - width)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])
        self.pos = torch.cat([self.pos, self.pos.new_tensor([n])])
        self.next = torch.cat([self.next, self.next.new_tensor([tok])])
        self.seen, self.penalty = torch.cat([self.seen, seen]), torch.cat([self.penalty, penalty])
        self.spare = torch.cat([self.spare, spare])
        self.gens.append(generator)
        self.rows.append(row)
        self.lora = None  # rebuilt for the new rows at the next mixed step

    @staticmethod
    def _pad(cache, mask, n: int):
        """``n`` padding columns on the left of ``cache`` and ``mask``; returns the mask."""
        import torch.nn.functional as F

        for layer in cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, n, 0))
            layer.values = F.pad(layer.values, (0, 0, n, 0))
        return F.pad(mask, (n, 0))

    def _leave(self) -> None:
        """Finish cancelled rows; slice ended ones out; trim columns that are padding for every row left."""
        import torch

        for r in self.rows:
            if r.cancel.is_set() and not r.done:
                self.streamer.stop(r)
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self.mask, self.pos, self.next = self.mask[idx], self.pos[idx], self.next[idx]
        self.seen, self.penalty, self.spare = self.seen[idx], self.penalty[idx], self.spare[idx]
        self.gens = [self.gens[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        if self.lora is not None:
            self.lora.select(keep)
        first = int(self.mask.any(dim=0).to(torch.int8).argmax())
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    # -- one step -------------------------------------------------------------------
    def _state(self, refs: list, *, fresh: bool = False):
        """(context, model, extra kwargs) computing each row with its own adapter, set up under the engine lock."""
        eng = self.engine
        keys = {r.key if r is not None else None for r in refs}
        if len(keys) == 1:
            if fresh or eng.adapters.serving_key != next(iter(keys)):
                # Once per new answer, as a whole batch did, not per step: hybrid serving merges an adapter
                # activated twice in a row.
                eng.activate(refs[0])
            return contextlib.nullcontext(), eng.base, {}
        eng.adapters.restore_base()
        if self.lora is None:
            for ref in {r.key: r for r in refs if r is not None}.values():
                eng.ensure_adapter(ref)  # another thread may have evicted it between steps
            self.lora = RowLora(eng.peft, [r.key if r is not None else None for r in refs])
        return self.lora.attached()

    def step(self) -> None:
        """One token for every row (caller holds the engine lock)."""
        import torch

        self._leave()
        if not self.rows:
            return
        try:
            ctx, model, extra = self._state([r.adapter for r in self.rows])
        except AdapterLoadError as exc:
            self.fail(exc)
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        with torch.inference_mode(), ctx:
            out = model(input_ids=self.next[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                        use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache}, **extra)
        self.pos = self.pos + 1
        toks = self._choose(out.logits[:, -1, :].float(), self.seen, self.penalty, self.rows, self.gens)
        for row, tok in zip(self.rows, toks):
            self.streamer.feed(row, tok)
        self.next = torch.tensor(toks, device=self.next.device)
        self._see(self.seen, self.spare, self.next)
        self._leave()

    def fail(self, exc: BaseException) -> None:
        """Every row in the batch ends with ``exc`` (a failed forward pass leaves the cache unusable)."""
        for r in self.rows:
            r.fail(exc)
        self._reset()

    def _see(self, seen, spare, toks) -> None:
        import torch

        seen[torch.arange(len(toks), device=seen.device), toks] = True
        seen[spare, self.eos] = False

    def _choose(self, scores, seen, penalty, rows: list[Row], gens: list) -> list[int]:
        """Each row's next token: its repetition penalty, then greedy or its own sampler (transformers' order)."""
        import torch

        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        if self.engine.fixed_length:
            scores[:, self.eos] = float("-inf")
        toks = scores.argmax(dim=-1).tolist()
        for i, (row, g) in enumerate(zip(rows, gens)):
            if row.gen.do_sample:
                toks[i] = self._sample(row.gen, scores[i:i + 1], g)
        return toks

    def _sample(self, gen, scores, generator) -> int:
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if gen.temperature and gen.temperature != 1.0:
            scores = TemperatureLogitsWarper(gen.temperature)(None, scores)
        if self.top_k:
            scores = TopKLogitsWarper(self.top_k)(None, scores)
        if gen.top_p is not None and gen.top_p < 1.0:
            scores = TopPLogitsWarper(gen.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator)[0, 0])


def _joining(engine, dec: Decoder) -> list[Row]:
    """Waiting requests that fit in ``dec`` now, oldest first; cancelled ones are dropped (caller holds ``_cv``)."""
    taken, rest = [], deque()
    keys = {_key(r) for r in dec.rows}
    while engine._pending and len(taken) < dec.room:
        r = engine._pending.popleft()
        if r.cancel.is_set():
            continue
        if _key(r) in keys or len(keys) < engine.model_cfg.max_cached_adapters:
            taken.append(r)
            keys.add(_key(r))
        else:
            rest.append(r)
    engine._pending.extendleft(reversed(rest))
    return taken


def serve(engine, log) -> bool:
    """The engine's worker: requests join between steps, up to ``model.max_batch`` at once.

    True when idle (the thread ends; a later request starts a new one, so engines
    can be freed), False when ``engine.continuous`` was switched off.
    """
    window = engine.model_cfg.batch_window_ms / 1000
    dec = Decoder(engine, capacity=engine.model_cfg.max_batch)
    while engine.continuous or dec.rows:
        with engine._cv:
            if not engine._pending and not dec.rows:
                engine._cv.wait(timeout=2.0)
                if not engine._pending:
                    engine._worker = None
                    return True
        if window and not dec.rows:
            time.sleep(window)  # let requests that arrive together start together
        with engine._lock:
            with engine._cv:
                joining = _joining(engine, dec) if engine.continuous else []
            engine._decoding = len(dec.rows) + len(joining)
            for r in joining:
                try:
                    dec.join(r)
                except Exception as exc:  # delivered to its consumer; the others go on
                    log.exception("prefill failed for a request of %d tokens", len(r.ids))
                    r.fail(exc)
            try:
                dec.step()
            except Exception as exc:  # delivered to every row's consumer; keep serving the others
                log.exception("generation failed for a batch of %d", len(dec.rows))
                dec.fail(exc)
            engine._decoding = len(dec.rows)
    return False


def decode_now(engine, rows: list[Row], *, capacity: int) -> None:
    """Answer ``rows`` in the calling thread, at most ``capacity`` at a time, each freed slot taken by the next."""
    dec = Decoder(engine, capacity=capacity)
    waiting = deque(rows)
    with engine._lock:
        engine._callers += 1  # the lock is let go between steps: wait_idle must still see this batch
    try:
        while waiting or dec.rows:
            with engine._lock:
                try:
                    while waiting and dec.fits(waiting[0]):
                        dec.join(waiting.popleft())
                    dec.step()
                except BaseException as exc:
                    dec.fail(exc)
                    for r in rows:
                        r.fail(exc)
                    raise
    finally:
        with engine._lock:
            engine._callers -= 1
