"""The learner on the real embedded model (SmolLM2-135M): one DPO step on a LoRA, saved, loaded, served."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_one_dpo_step_on_the_embedded_model_saves_an_adapter_that_loads(tmp_path, embedded_model_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from heed.config import load_config
    from heed.engine import AdapterRef, Engine, load_base
    from learner.train import train_adapter

    config = load_config(overrides={"data_dir": str(tmp_path), "model": {"name_or_path": str(embedded_model_path), "torch_threads": 2},
                                    "generation": {"max_new_tokens": 12},
                                    "learner": {"epochs": 1, "batch_size": 2, "max_length": 128}})
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    pairs = [{"prompt": ask, "chosen": "Paris.", "rejected": "The capital of France is a city in Europe."},
             {"prompt": [{"role": "user", "content": "How many legs does a cat have?"}], "chosen": "Four.",
              "rejected": "Cats, like many mammals, have a number of legs."}]
    out = tmp_path / "adapter"
    metrics = train_adapter(config, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=out)
    assert metrics["dpo_steps"] == 1 and metrics["dpo_rows"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if "lora_B" in k)  # the step moved the adapter

    model, tok = load_base(config)
    PeftModel.from_pretrained(model, str(out))  # loads with plain peft
    engine = Engine.load(config)
    reply = engine.generate([{"role": "system", "content": config.generation.system_prompt}, *ask], adapter=AdapterRef("a", str(out)))
    assert reply.strip()
