"""The engine: one frozen base model, users' LoRA adapters on top, streamed generation.

Adapters are loaded once into a peft multi-adapter model and kept in an LRU
cache. Serving one stream merges the user's LoRA delta into fresh copies of the
base weights (``W0 + BA``) and swaps them in, so an adapted reply runs at the
base model's speed; the untouched ``W0`` tensors are kept and swapped back, so a
user without an adapter gets bit-identical base weights. Requests are
serialized by one lock: the swapped weights and peft's active adapter are
global state, and two users must never see each other's adapter. A batch of
requests with different adapters goes through peft's per-row ``adapter_names``.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .config import GenerationConfig, HeedConfig, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """A user's adapter version on disk; ``key`` names it inside the engine."""

    key: str
    path: str


class AdapterLoadError(RuntimeError):
    """An adapter's files are missing or unreadable."""


def pick_device_dtype(model_cfg: ModelConfig):
    import torch

    device = model_cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {device!r} but CUDA is not available on this machine")
    dtype_name = model_cfg.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, getattr(torch, dtype_name)


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


class _Cancel:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    def __init__(self, model, tokenizer, *, model_cfg: ModelConfig, gen_cfg: GenerationConfig) -> None:
        self.base = model
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.gen_cfg = gen_cfg
        self.peft = None  # the PeftModel, made when the first adapter loads
        self._cache: OrderedDict[str, str] = OrderedDict()  # key -> path, LRU order
        self._lock = threading.RLock()
        self._originals: dict = {}  # LoRA-wrapped module -> untouched base weight tensor
        self._merged_key: str | None = None
        self._merged: dict = {}
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, config: HeedConfig) -> "Engine":
        model, tokenizer = load_base(config)
        return cls(model, tokenizer, model_cfg=config.model, gen_cfg=config.generation)

    # -- adapters -----------------------------------------------------------
    @property
    def cached_adapters(self) -> list[str]:
        return list(self._cache)

    def ensure_adapter(self, ref: AdapterRef) -> None:
        """Load ``ref`` unless cached; evicts the least recently used beyond the cache size."""
        with self._lock:
            if ref.key in self._cache:
                self._cache.move_to_end(ref.key)
                return
            path = Path(ref.path)
            if not (path / "adapter_config.json").is_file() or not any(path.glob("adapter_model.*")):
                raise AdapterLoadError(f"adapter {ref.key} has no adapter files in {path}")
            self._restore_base()
            try:
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=ref.key, is_trainable=False)
                    self.peft.eval()
                    self._record_originals()
                else:
                    self.peft.load_adapter(str(path), adapter_name=ref.key, is_trainable=False)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise AdapterLoadError(f"adapter {ref.key} at {path} could not be loaded: {exc}") from exc
            self.peft.base_model.disable_adapter_layers()
            self._cache[ref.key] = str(path)
            while len(self._cache) > self.model_cfg.max_cached_adapters:
                old, _ = self._cache.popitem(last=False)
                self.peft.delete_adapter(old)

    def drop_adapter(self, key: str) -> None:
        with self._lock:
            if key in self._cache:
                self._restore_base()
                del self._cache[key]
                self.peft.delete_adapter(key)

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft.modules() if isinstance(m, LoraLayer)]

    def _record_originals(self) -> None:
        for layer in self._lora_layers():
            self._originals[layer] = layer.get_base_layer().weight.data

    def _restore_base(self) -> None:
        if self._merged_key is None:
            return
        for layer, weight in self._originals.items():
            layer.get_base_layer().weight.data = weight
        self._merged_key = None
        self._merged = {}

    def _merge_in(self, key: str) -> None:
        """Serve ``key`` at base speed: base weights become fresh ``W0 + delta`` tensors."""
        import torch

        if self._merged_key == key:
            return
        self._restore_base()
        with torch.no_grad():
            for layer in self._lora_layers():
                if key not in layer.lora_A:
                    continue
                if layer not in self._originals:
                    self._originals[layer] = layer.get_base_layer().weight.data
                w0 = self._originals[layer]
                merged = w0 + layer.get_delta_weight(key).to(w0.dtype)
                layer.get_base_layer().weight.data = merged
        self._merged_key = key

    def activate(self, ref: AdapterRef | None) -> None:
        """Make the model compute with ``ref`` (None: the bare base model)."""
        with self._lock:
            if ref is None:
                self._restore_base()
                return
            self.ensure_adapter(ref)
            self._merge_in(ref.key)

    # -- generation ---------------------------------------------------------
    def _gen_kwargs(self, gen: GenerationConfig, max_new_tokens: int | None) -> dict:
        kw = dict(
            max_new_tokens=max_new_tokens or gen.max_new_tokens,
            do_sample=gen.do_sample,
            repetition_penalty=gen.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if gen.do_sample:
            kw.update(temperature=gen.temperature, top_p=gen.top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    def prompt_ids(self, messages: list[dict], *, max_new_tokens: int | None = None) -> list[int]:
        budget = self.gen_cfg.max_context_tokens - (max_new_tokens or self.gen_cfg.max_new_tokens)
        return render(self.tokenizer, messages, max_tokens=max(budget, 8))

    def stream(self, messages: list[dict], *, adapter: AdapterRef | None = None, max_new_tokens: int | None = None,
               gen: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the reply's text as it grows, piece by piece.

        Closing the iterator early stops generation at the next token.
        """
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        gen = gen or self.gen_cfg
        ids = self.prompt_ids(messages, max_new_tokens=max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        cancel = _Cancel()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.activate(adapter)
                    if gen.do_sample:
                        torch.manual_seed(gen.seed)
                    input_ids = torch.tensor([ids], device=self.device)
                    self.base.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([cancel]), **self._gen_kwargs(gen, max_new_tokens),
                    )
            except BaseException as exc:  # re-raised in the consumer's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name="heed-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancel.event.set()
            thread.join()
        if errors:
            raise errors[0]

    def generate(self, messages: list[dict], *, adapter: AdapterRef | None = None, max_new_tokens: int | None = None,
                 gen: GenerationConfig | None = None) -> str:
        return "".join(self.stream(messages, adapter=adapter, max_new_tokens=max_new_tokens, gen=gen))

    def generate_batch(self, conversations: list[list[dict]], *, adapters: list[AdapterRef | None] | None = None,
                       max_new_tokens: int | None = None, gen: GenerationConfig | None = None,
                       with_finish: bool = False) -> list:
        """Answer several chats in one forward pass, each with its own adapter (or none).

        With ``with_finish`` each item is ``(text, finished)``: finished is False
        when the answer hit the token limit before the model ended it.
        """
        import torch

        gen = gen or self.gen_cfg
        adapters = adapters or [None] * len(conversations)
        if len(adapters) != len(conversations):
            raise ValueError("one adapter (or None) per conversation")
        prompts = [self.prompt_ids(m, max_new_tokens=max_new_tokens) for m in conversations]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with self._lock, torch.inference_mode():
            if gen.do_sample:
                torch.manual_seed(gen.seed)
            kinds = {a.key if a else None for a in adapters}
            if len(kinds) == 1:
                self.activate(adapters[0])
                out = self.base.generate(input_ids=input_ids, attention_mask=mask, **self._gen_kwargs(gen, max_new_tokens))
            else:
                for a in adapters:
                    if a is not None:
                        self.ensure_adapter(a)
                self._restore_base()
                self.peft.base_model.enable_adapter_layers()
                try:
                    names = [a.key if a else "__base__" for a in adapters]
                    out = self.peft.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, **self._gen_kwargs(gen, max_new_tokens))
                finally:
                    self.peft.base_model.disable_adapter_layers()
        eos = self.tokenizer.eos_token_id
        texts = [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
        if not with_finish:
            return texts
        return [(t, bool((row[width:] == eos).any())) for t, row in zip(texts, out)]

    def with_generation(self, **changes) -> GenerationConfig:
        return replace(self.gen_cfg, **changes)
