"""Which dtype the model runs in: bf16 only where the hardware computes it, serving and learner chosen apart."""
from __future__ import annotations

import pytest

from conftest import make_config

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni
"""
OLD_X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_cpu_flags_reads_x86_flags_and_arm_features():
    from heed.hardware import cpu_flags

    assert {"avx512_bf16", "avx2"} <= cpu_flags(X86_CPUINFO)
    assert "bf16" in cpu_flags(ARM_CPUINFO) and "i8mm" in cpu_flags(ARM_CPUINFO)
    assert not cpu_flags(OLD_X86_CPUINFO) & {"avx512_bf16", "amx_bf16", "bf16"}
    assert cpu_flags("vendor_id : none\n") == set()


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_on_a_cpu_only_where_it_computes_bf16_natively(monkeypatch, tmp_path, native):
    import torch

    from heed import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    auto = make_config(tmp_path, "tiny:0", model={"dtype": "auto"}).model
    assert hardware.pick_device_dtype(auto) == ("cpu", torch.bfloat16 if native else torch.float32)
    explicit = make_config(tmp_path, "tiny:0", model={"dtype": "float32"}).model
    assert hardware.pick_device_dtype(explicit)[1] == torch.float32, "an explicit dtype is never overridden"


def test_the_learner_dtype_replaces_only_the_models_dtype(tmp_path):
    from heed.hardware import learner_config

    config = make_config(tmp_path, "tiny:0", model={"dtype": "float32"}, learner={"dtype": "bfloat16"})
    trained = learner_config(config)
    assert trained.model.dtype == "bfloat16" and config.model.dtype == "float32", "serving keeps its own dtype"
    assert trained.model.name_or_path == config.model.name_or_path and trained.learner == config.learner
    same = make_config(tmp_path, "tiny:0", model={"dtype": "float32"}, learner={"dtype": "model"})
    assert learner_config(same).model.dtype == "float32"


def test_an_unknown_learner_dtype_is_a_config_error_that_names_it(tmp_path):
    from heed.config import ConfigError

    with pytest.raises(ConfigError, match="learner.dtype"):
        make_config(tmp_path, "tiny:0", learner={"dtype": "float16"})


def test_the_gates_answer_cache_is_per_serving_dtype_and_not_the_learners(tmp_path):
    from learner.gate_cache import answers_key

    def key(model_dtype, learner_dtype):
        return answers_key(make_config(tmp_path, "tiny:0", model={"dtype": model_dtype}, learner={"dtype": learner_dtype}))

    assert key("float32", "float32") != key("bfloat16", "float32"), "answers generated in one dtype are not the other's"
    assert key("float32", "float32") == key("float32", "bfloat16"), "the gate generates in the serving dtype"


def test_the_gates_kept_answers_go_stale_when_the_penalty_counts_otherwise(tmp_path):
    from learner.gate_cache import answers_key

    def key(**generation):
        return answers_key(make_config(tmp_path, "tiny:0", generation={"repetition_penalty": 1.15, **generation}))

    assert key() != key(penalty_counts_prompt=False) != key(penalize_end_of_turn=False)


def test_a_bf16_learner_trains_an_fp32_adapter_that_fp32_serving_answers_with(tmp_path, tiny_model_path):
    import math

    import torch
    from safetensors.torch import load_file

    from heed.engine import AdapterRef, Engine
    from learner.train import _args, train_adapter

    config = make_config(tmp_path / "data", tiny_model_path, model={"dtype": "float32"},
                         learner={"dtype": "bfloat16", "min_steps": 2})
    assert _args(config, str(tmp_path / "scratch"), 4, "dpo")["bf16"], "the trainer autocasts over the bf16 base"
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": "Short.", "rejected": "A long and winding answer.",
              "weight": 1.0} for i in range(4)]
    metrics = train_adapter(config, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=tmp_path / "adapter")
    assert metrics["dpo_steps"] >= 2 and all(math.isfinite(x) for x in metrics["dpo_losses"])
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}, "LoRA weights stay fp32"
    engine = Engine.load(config)
    assert next(engine.base.parameters()).dtype == torch.float32
    answer = engine.generate_batch([[{"role": "user", "content": "question 0"}]], adapters=[AdapterRef("u", str(tmp_path / "adapter"))])
    assert isinstance(answer[0], str)


def test_the_output_layer_always_gets_a_contiguous_input(tiny_config):
    """A sliced (non-contiguous) hidden state made torch's bf16 CPU matmul copy the head's weight once per row."""
    import torch

    from heed.engine import load_base

    model, _ = load_base(tiny_config)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    hidden = torch.randn(3, 5, model.config.hidden_size)[:, -1:, :]
    assert not hidden.is_contiguous()
    with torch.no_grad():
        model.get_output_embeddings()(hidden)
    assert seen == [True]
