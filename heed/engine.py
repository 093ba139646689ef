"""The engine: one frozen base model, users' LoRA adapters on top, streamed and batched generation.

Adapters are loaded once into a peft multi-adapter model and kept in an LRU
cache (``heed.adapter_slots``). Requests go through one queue and one worker, so
concurrent users share forward passes: by default a request joins the batch being
decoded at its next token and leaves it when its answer ends (``heed.decode``, up
to ``model.max_batch`` rows); with ``model.continuous_batching`` off (and for
invariant half precision) the worker answers whatever is waiting in one
``generate`` call. The base ``W0`` parameters are never written: a
user without an adapter gets bit-identical base weights.
- One adapter in the batch, ``model.adapter_serving``: *unmerged* hooks add
  ``s·B(Ax)`` to each LoRA layer's output, and switching users only repoints
  them (embedded model, CPU fp32, ``heed bench perf``: 0.95-0.99x the bare
  model's tokens/s); *merged* (the CUDA default) writes ``W0 + s·BA`` into
  spare weight copies swapped in: no extra kernels, but a switch to another
  user rewrites every adapted weight (perf's merge_ms); *hybrid* (opt-in,
  fp32) serves a user unmerged right after someone else and merged when they
  ask again (0.99-1.02x the bare model), at the price of a reply's rounding
  depending on who asked before.
- Several adapters in one batch: each LoRA layer adds ``s_i·B_i A_i x_i`` per
  row with two batched matmuls (``heed.lora_batch``); rows without one get zeros.
- Half precision (bf16 on a CPU with native bf16, ``heed.hardware``): with
  ``model.batch_invariant`` a row is answered exactly as it would be alone:
  attention row by row (``heed.invariant``), a lone request computed beside a
  copy of itself, and one adapter computed by the same batched LoRA path as
  several.
Hooks, merged weights and peft's state are global, so every forward pass runs
under one lock: two users never see each other's adapter. A thread that waits on
the worker gives its OpenMP pool back first (``heed.openmp``: 1.13x the tokens/s
of one reply, 1.33x of eight).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Iterator

from .adapter_slots import AdapterLoadError, AdapterRef, AdapterSlots, serving_mode
from .config import GenerationConfig, HeedConfig, ModelConfig
from .decode import decode_now, serve, supports_continuous
from .hardware import contiguous_head_input, pick_device_dtype
from .invariant import use_row_attention
from .lora_batch import BatchStreamer, Row, RowStop, answer_penalty, mixed_lora, sparing_penalty
from .openmp import give_back_pool

log = logging.getLogger(__name__)


def set_threads(n: int) -> None:
    import torch

    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_base(config: HeedConfig):
    """(model, tokenizer) for the configured base model, in eval mode, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import resolve_model

    set_threads(config.model.torch_threads)
    path = resolve_model(config)
    device, dtype = pick_device_dtype(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, trust_remote_code=config.model.trust_remote_code)
    model.to(device)
    model.eval()
    contiguous_head_input(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def render(tokenizer, messages: list[dict], *, max_tokens: int) -> list[int]:
    """Token ids of the chat up to a new assistant turn, dropping the oldest turns to fit.

    The system message (if first) and the last user message are always kept.
    """
    msgs = list(messages)
    while True:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        start = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(ids) <= max_tokens or len(msgs) - start <= 1:
            return list(ids)[-max_tokens:]
        del msgs[start]


def _gen_key(gen: GenerationConfig) -> tuple:
    # Requests batch together only when they decode the same way (one seed per batch).
    return (gen.do_sample, gen.temperature, gen.top_p, gen.repetition_penalty, gen.penalize_end_of_turn, gen.penalty_counts_prompt,
            gen.seed if gen.do_sample else None)


class Engine:
    def __init__(self, model, tokenizer, *, model_cfg: ModelConfig, gen_cfg: GenerationConfig) -> None:
        self.base = model
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.gen_cfg = gen_cfg
        self._lock = threading.RLock()
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed").
        self._tok_lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.serving = serving_mode(model_cfg, self.device.type, next(model.parameters()).dtype)
        self.adapters = AdapterSlots(model, model_cfg=model_cfg, serving=self.serving, lock=self._lock)
        # Half precision rounds coarsely enough that batch-mates change greedy answers (heed.invariant). On a CPU
        # only: a GPU's matmul kernels are chosen by shape in other ways a duplicated row does not pin down.
        half = str(next(model.parameters()).dtype) in ("torch.bfloat16", "torch.float16")
        self.invariant = bool(half and self.device.type == "cpu" and model_cfg.batch_invariant and use_row_attention(model))
        self.continuous = bool(model_cfg.continuous_batching and not self.invariant and supports_continuous(model))
        self._pending: deque[Row] = deque()
        self._decoding = 0  # rows the worker's decoder is answering (wait_idle reads it)
        self._callers = 0  # generate_batch calls decoding in their own threads
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batches_run = 0  # generate calls that served requests (tests and benchmarks read these two)
        self.tokens_generated = 0
        # Benchmarks set this so every reply runs to its token limit (end-of-answer suppressed): equal work per run.
        self.fixed_length = False
        give_back_pool()  # loading is done here; the worker's OpenMP pool must not share the cores with this thread's (heed.openmp)

    @classmethod
    def load(cls, config: HeedConfig) -> "Engine":
        model, tokenizer = load_base(config)
        return cls(model, tokenizer, model_cfg=config.model, gen_cfg=config.generation)

    # -- adapters (heed.adapter_slots) ------------------------------------------
    @property
    def peft(self):
        return self.adapters.peft

    @property
    def cached_adapters(self) -> list[str]:
        return self.adapters.cached

    def ensure_adapter(self, ref: AdapterRef) -> None:
        """Load ``ref`` unless cached; evicts the least recently used beyond ``model.max_cached_adapters``."""
        self.adapters.ensure(ref)

    def drop_adapter(self, key: str) -> None:
        self.adapters.drop(key)

    def activate(self, ref: AdapterRef | None) -> None:
        """Make the model compute with ``ref`` (None: the bare base model)."""
        self.adapters.activate(ref)

    # -- generation ---------------------------------------------------------
    def _gen_kwargs(self, gen: GenerationConfig, max_new_tokens: int, *, padding=None, prompt_width: int | None = None) -> dict:
        """generate()'s keywords; ``padding``: each row's left padding (None: no row is padded); ``prompt_width``:
        the (left-padded) prompt's length, where the answer starts."""
        kw = dict(
            max_new_tokens=max_new_tokens,
            do_sample=gen.do_sample,
            repetition_penalty=gen.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if gen.repetition_penalty != 1.0 and not gen.penalty_counts_prompt:
            from transformers import LogitsProcessorList

            if prompt_width is None:
                raise ValueError("a penalty on the answer alone needs to know where the answer starts (prompt_width)")
            eot = [self.tokenizer.eos_token_id] if gen.penalize_end_of_turn else []
            kw.update(repetition_penalty=1.0, logits_processor=LogitsProcessorList([answer_penalty(gen.repetition_penalty, prompt_width, eot)]))
        elif gen.repetition_penalty != 1.0 and not gen.penalize_end_of_turn:
            from transformers import LogitsProcessorList

            spare = sparing_penalty(gen.repetition_penalty, [self.tokenizer.eos_token_id], padding)
            kw.update(repetition_penalty=1.0, logits_processor=LogitsProcessorList([spare]))
        if gen.do_sample:
            kw.update(temperature=gen.temperature, top_p=gen.top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.fixed_length:
            kw["min_new_tokens"] = max_new_tokens
        return kw

    def prompt_ids(self, messages: list[dict], *, max_new_tokens: int | None = None) -> list[int]:
        budget = self.gen_cfg.max_context_tokens - (max_new_tokens or self.gen_cfg.max_new_tokens)
        with self._tok_lock:
            return render(self.tokenizer, messages, max_tokens=max(budget, 8))

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _row(self, messages, adapter, max_new_tokens, gen, out=None) -> Row:
        gen = gen or self.gen_cfg
        n = max_new_tokens or gen.max_new_tokens
        return Row(ids=self.prompt_ids(messages, max_new_tokens=n), adapter=adapter, max_new=n, gen=gen, out=out)

    def _run(self, rows: list[Row]) -> None:
        """Answer ``rows`` in one generate call; each row's tokens land in the row (and its queue)."""
        import torch
        from transformers import StoppingCriteriaList

        with self._lock:
            live = []
            for r in rows:
                try:
                    if r.adapter is not None:
                        self.ensure_adapter(r.adapter)
                    live.append(r)
                except AdapterLoadError as exc:
                    r.fail(exc)
            if not live:
                return
            gen = live[0].gen
            width = max(len(r.ids) for r in live)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in live], device=self.device)
            mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in live], device=self.device)
            keys = {r.adapter.key if r.adapter else None for r in live}
            adapters = [r.adapter.key if r.adapter else None for r in live]
            if self.invariant and len(live) == 1:
                # A lone row's matmuls would take the one-row kernel, which rounds differently: compute it twice.
                # The copy's tokens are the row's own; the streamer and RowStop read only the real row.
                input_ids, mask, adapters = input_ids.repeat(2, 1), mask.repeat(2, 1), adapters * 2
            streamer = BatchStreamer(live, self.tokenizer, on_finish=self._count, lock=self._tok_lock)
            kw = self._gen_kwargs(gen, max(r.max_new for r in live), padding=(mask == 0).sum(dim=1), prompt_width=width)
            self.batches_run += 1
            try:
                with torch.inference_mode():
                    if gen.do_sample:
                        torch.manual_seed(gen.seed)
                    if keys == {None} or (len(keys) == 1 and not self.invariant):
                        self.activate(live[0].adapter)
                        ctx, model, extra = contextlib.nullcontext(), self.base, {}
                    else:
                        # Invariant serving computes one adapter the way it computes several, so a user's rows
                        # get the same LoRA arithmetic whoever shares the batch.
                        self.adapters.restore_base()
                        ctx, model, extra = mixed_lora(self.peft, adapters)
                    with ctx:
                        model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer,
                                       stopping_criteria=StoppingCriteriaList([RowStop(live, width)]), **extra, **kw)
            except BaseException as exc:
                for r in live:
                    r.fail(exc)
                raise

    def _count(self, row: Row) -> None:
        self.tokens_generated += len(row.tokens)

    # -- the request queue ----------------------------------------------------
    def _submit(self, row: Row) -> None:
        give_back_pool()  # this thread now waits on the worker's torch work (heed.openmp)
        with self._cv:
            self._pending.append(row)
            self._cv.notify()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="heed-engine", daemon=True)
                self._worker.start()

    def _take(self) -> list[Row]:
        """The next batch: the oldest request plus waiting ones that decode the same way."""
        first = self._pending.popleft()
        batch, keys, rest = [first], {first.adapter.key if first.adapter else None}, deque()
        while self._pending:
            r = self._pending.popleft()
            key = r.adapter.key if r.adapter else None
            fits = len(batch) < self.model_cfg.max_batch and _gen_key(r.gen) == _gen_key(first.gen)
            if fits and (key in keys or len(keys) < self.model_cfg.max_cached_adapters):
                batch.append(r)
                keys.add(key)
            else:
                rest.append(r)
        self._pending.extendleft(reversed(rest))
        return [r for r in batch if not r.cancel.is_set()]

    def _work(self) -> None:
        # ``continuous`` may be switched while the worker runs (benchmarks compare both): it changes between batches.
        while not (serve(self, log) if self.continuous else self._work_whole()):
            pass

    def _work_whole(self) -> bool:
        """Whole batches, one generate call each; True when idle (the thread ends), False when switched."""
        window = self.model_cfg.batch_window_ms / 1000
        while not self.continuous:
            with self._cv:
                if not self._pending:
                    self._cv.wait(timeout=2.0)
                if not self._pending:
                    # Idle: the thread ends (a later request starts a new one), so engines can be freed.
                    self._worker = None
                    return True
            if window:
                time.sleep(window)  # let requests that arrive together share the batch
            with self._lock:  # taken before the batch leaves the queue, so wait_idle sees it
                with self._cv:
                    batch = self._take()
                if not batch:
                    continue
                try:
                    self._run(batch)
                except Exception:  # already delivered to every row's consumer; keep serving others
                    log.exception("generation failed for a batch of %d", len(batch))
        return False

    # -- public generation API --------------------------------------------------
    def stream(self, messages: list[dict], *, adapter: AdapterRef | None = None, max_new_tokens: int | None = None,
               gen: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the reply's text as it grows, piece by piece.

        Closing the iterator early stops this reply at the next token (others in its batch go on).
        """
        out: queue.Queue = queue.Queue()
        row = self._row(messages, adapter, max_new_tokens, gen, out=out)
        self._submit(row)
        try:
            while True:
                item = out.get()
                if item is Row.END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            row.cancel.set()

    def generate(self, messages: list[dict], *, adapter: AdapterRef | None = None, max_new_tokens: int | None = None,
                 gen: GenerationConfig | None = None) -> str:
        return "".join(self.stream(messages, adapter=adapter, max_new_tokens=max_new_tokens, gen=gen))

    def generate_batch(self, conversations: list[list[dict]], *, adapters: list[AdapterRef | None] | None = None,
                       max_new_tokens: int | None = None, gen: GenerationConfig | None = None,
                       with_finish: bool = False, batch: int | None = None) -> list:
        """Answer several chats together, each with its own adapter (or none), in this thread.

        ``batch``: at most this many rows decode at once (None: all); with
        continuous batching a row that ends hands its slot to the next.
        With ``with_finish`` each item is ``(text, finished)``: finished is False
        when the answer hit the token limit before the model ended it.
        """
        adapters = adapters or [None] * len(conversations)
        if len(adapters) != len(conversations):
            raise ValueError("one adapter (or None) per conversation")
        if batch is not None and batch < 1:
            raise ValueError("batch must be at least 1")
        rows = [self._row(m, a, max_new_tokens, gen) for m, a in zip(conversations, adapters)]
        if self.continuous:
            decode_now(self, rows, capacity=batch or len(rows))
        else:
            # More distinct adapters than the cache holds would evict one the same batch needs: split.
            group: list[Row] = []
            for r in rows:
                keys = {x.adapter.key if x.adapter else None for x in group + [r]}
                if len(keys) > self.model_cfg.max_cached_adapters or len(group) == (batch or len(rows)):
                    self._run(group)
                    group = []
                group.append(r)
            if group:
                self._run(group)
        for r in rows:
            if r.error is not None:
                raise r.error
        texts = [r.text() for r in rows]
        return [(t, r.finished) for t, r in zip(texts, rows)] if with_finish else texts

    def wait_idle(self) -> None:
        """Block until no request is waiting or being generated."""
        while True:
            with self._lock, self._cv:
                if not self._pending and not self._decoding and not self._callers:
                    return
            time.sleep(0.01)

    def with_generation(self, **changes) -> GenerationConfig:
        return replace(self.gen_cfg, **changes)
