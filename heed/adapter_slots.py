"""Users' LoRA adapters in one peft model: an LRU cache, and which one the base model computes with.

The engine owns one of these and calls it under its own lock (a batch that
mixes several adapters hooks peft's layers itself: ``heed.lora_batch``). The
base ``W0`` parameters are never written: *unmerged* serving repoints hooks,
*merged* serving swaps in spare weight copies holding ``W0 + s·BA``, and both
restore the bare base before anything else changes. *hybrid* (opt-in, fp32)
serves a user's batch unmerged when it follows someone else's, so switching
costs nothing, and merged when the same user is served again (or their merge
is still in the spare copies): a conversation's later replies run at the bare
model's speed, for one merge (``heed bench perf``: merge_ms) and spare copies
of the adapted weights. Not the default: merged and hooked sums round apart,
so whether another user asked in between could tip a near-tie in a reply.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .lora_batch import MergedAdapter, OneAdapter, vanilla

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """A user's adapter version on disk; ``key`` names it inside the engine."""

    key: str
    path: str


class AdapterLoadError(RuntimeError):
    """An adapter's files are missing or unreadable."""


def serving_mode(model_cfg: ModelConfig, device: str, dtype=None) -> str:
    """'merged', 'unmerged' or 'hybrid' for ``model.adapter_serving`` on ``device`` in ``dtype``."""
    if model_cfg.adapter_serving == "hybrid" and dtype is not None and str(dtype) != "torch.float32":
        # In half precision W0 + s·BA rounds away much of a small LoRA: a user's merged replies would drift
        # from their first one.
        return "unmerged"
    if model_cfg.adapter_serving != "auto":
        return model_cfg.adapter_serving
    # Not hybrid on a CPU by default: merged and hooked sums round differently, so a user's reply could
    # turn on whether another user asked in between.
    return "merged" if str(device).startswith("cuda") else "unmerged"


class AdapterSlots:
    def __init__(self, base, *, model_cfg: ModelConfig, serving: str, lock: threading.RLock) -> None:
        self.base = base
        self.model_cfg = model_cfg
        self.serving = serving
        self.peft = None  # the PeftModel, made when the first adapter loads
        self._lock = lock
        self._cache: OrderedDict[str, str] = OrderedDict()  # key -> path, LRU order
        self._serving_key: str | None = None  # the adapter the model computes with now
        self._how: str | None = None  # how it is computed: 'hooks', 'merged' or 'peft' (peft's own forward)
        self._last_alone: str | None = None  # the adapter served alone last (hybrid: served again, it is merged)
        self._one = OneAdapter()
        self._merged = MergedAdapter()
        self._plain: dict[str, bool] = {}  # adapter key -> every layer plain LoRA (else peft computes it)
        self._layers: dict[str, list] = {}  # adapter key -> the LoRA layers it has weights in

    @property
    def cached(self) -> list[str]:
        return list(self._cache)

    def ensure(self, ref: AdapterRef) -> None:
        """Load ``ref`` unless cached; evicts the least recently used beyond the cache size."""
        with self._lock:
            if ref.key in self._cache:
                self._cache.move_to_end(ref.key)
                return
            path = Path(ref.path)
            if not (path / "adapter_config.json").is_file() or not any(path.glob("adapter_model.*")):
                raise AdapterLoadError(f"adapter {ref.key} has no adapter files in {path}")
            from safetensors import SafetensorError

            from .validate import adapter_problem

            # Checked before peft touches the model: a first load that fails half-way would leave
            # LoRA layers injected into the base with no PeftModel to remove them.
            problem = adapter_problem(path) if (path / "adapter_model.safetensors").is_file() else None
            if problem:
                raise AdapterLoadError(f"adapter {ref.key} could not be loaded: {problem}")
            self.restore_base()
            try:
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=ref.key, is_trainable=False)
                    self.peft.eval()
                else:
                    self.peft.load_adapter(str(path), adapter_name=ref.key, is_trainable=False)
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
                # A half-loaded adapter would shadow a good copy loaded later under the same key.
                if self.peft is not None and ref.key in self.peft.peft_config:
                    try:
                        self.peft.delete_adapter(ref.key)
                    except (KeyError, ValueError, RuntimeError) as cleanup:
                        log.warning("could not drop the half-loaded adapter %s: %s", ref.key, cleanup)
                raise AdapterLoadError(f"adapter {ref.key} at {path} could not be loaded: {exc}") from exc
            self.peft.base_model.disable_adapter_layers()
            layers = self.lora_layers()
            self._merged.know(layers)
            mine = [m for m in layers if ref.key in m.lora_A]
            self._plain[ref.key] = all(vanilla(m, ref.key) for m in mine)
            self._layers[ref.key] = mine
            if self.serving in ("unmerged", "hybrid") and self._plain[ref.key]:
                self._one.add(ref.key, mine)
            self._cache[ref.key] = str(path)
            while len(self._cache) > self.model_cfg.max_cached_adapters:
                old, _ = self._cache.popitem(last=False)
                self._forget(old)

    def drop(self, key: str) -> None:
        with self._lock:
            if key in self._cache:
                self.restore_base()
                del self._cache[key]
                self._forget(key)

    def _forget(self, key: str) -> None:
        self._one.forget(key)
        self._merged.forget(key)
        if self._last_alone == key:
            self._last_alone = None
        self._plain.pop(key, None)
        self._layers.pop(key, None)
        self.peft.delete_adapter(key)

    def lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft.modules() if isinstance(m, LoraLayer)] if self.peft is not None else []

    def restore_base(self) -> None:
        """Make the model compute as the bare base model again."""
        if self._serving_key is None:
            return
        if self._how == "peft":
            self.peft.base_model.disable_adapter_layers()
        elif self._how == "hooks":
            self._one.use(None)
        else:
            self._merged.restore()
        self._serving_key = self._how = None

    def _merges(self, key: str) -> bool:
        if self.serving == "hybrid":
            # Served again (a conversation goes on), or still in the buffers: merged costs nothing per token.
            return key == self._last_alone or key == self._merged.held
        return self.serving == "merged"

    def serve_one(self, key: str) -> None:
        """Compute with adapter ``key``: unmerged hooks, or base weights become ``W0 + s·BA`` in reused buffers.

        Which of the two: ``serving`` (hybrid: merged when ``key`` was served alone last, or is still merged).
        """
        if self._serving_key == key and not (self._how == "hooks" and self._merges(key)):
            return
        self.restore_base()
        if not self._plain[key]:
            # DoRA, biases or other variants: let peft compute them, unmerged.
            self.peft.base_model.set_adapter(key)
            self.peft.base_model.enable_adapter_layers()
            self._how = "peft"
        elif self._merges(key):
            self._merged.merge(key, self._layers[key])
            self._how = "merged"
        else:
            self._one.use(key)
            self._how = "hooks"
        self._serving_key = self._last_alone = key

    @property
    def merged_bytes(self) -> int:
        """Memory of the spare weight copies merged serving keeps (0 until an adapter is first merged)."""
        return self._merged.buffer_bytes

    @property
    def serving_key(self) -> str | None:
        """The adapter the model computes with now (None: the bare base model)."""
        return self._serving_key

    @property
    def how(self) -> str | None:
        """How the adapter in use is computed now ('hooks', 'merged', 'peft'; None: the bare base model)."""
        return self._how

    def activate(self, ref: AdapterRef | None) -> None:
        """Make the model compute with ``ref`` (None: the bare base model)."""
        with self._lock:
            if ref is None:
                self.restore_base()
                return
            self.ensure(ref)
            self.serve_one(ref.key)
