"""Hybrid serving (``model.adapter_serving: hybrid``): a user's reply right after someone else's is unmerged, the next ones merged."""
from __future__ import annotations

import pytest

from conftest import make_config
from test_engine import ASK, _logits, _make_adapter


@pytest.fixture(scope="module")
def hybrid(tiny_model_path, tmp_path_factory):
    from heed.engine import Engine

    root = tmp_path_factory.mktemp("hybrid")
    config = make_config(root, tiny_model_path, model={"max_cached_adapters": 3, "adapter_serving": "hybrid"})
    adapters = [_make_adapter(config, root / f"a{i}", i) for i in (0, 4)]
    return config, Engine.load(config), adapters


def test_hybrid_serving_is_what_the_engine_was_asked_for(hybrid):
    _, engine, _ = hybrid
    assert engine.serving == "hybrid"


def test_a_first_reply_is_unmerged_and_the_same_user_asking_again_is_merged(hybrid):
    _, engine, (a, b) = hybrid
    engine.activate(b)
    engine.activate(b)
    engine.activate(a)
    assert engine.adapters.how == "hooks", "switching users must not rewrite weights"
    engine.activate(a)
    assert engine.adapters.how == "merged"
    assert engine.adapters.merged_bytes > 0
    engine.activate(None)
    engine.activate(a)
    assert engine.adapters.how == "merged", "the bare model between two replies of one user: a's merge is kept"
    engine.activate(None)


def test_unmerged_and_merged_replies_compute_the_same(hybrid):
    import torch

    _, engine, (a, b) = hybrid
    ids = engine.prompt_ids(ASK)
    engine.activate(b)
    engine.activate(b)
    engine.activate(a)
    assert engine.adapters.how == "hooks"
    hooked = _logits(engine, ids)
    engine.activate(a)
    assert engine.adapters.how == "merged"
    merged = _logits(engine, ids)
    engine.activate(None)
    base = _logits(engine, ids)
    assert not torch.allclose(hooked, base, atol=1e-3), "the adapter should change the logits"
    assert torch.allclose(hooked, merged, atol=1e-4)
    engine.activate(b)
    engine.activate(b)  # b's merge replaces a's in the spare copies
    first = engine.generate(ASK, adapter=a)  # a first reply after b's: unmerged
    assert engine.adapters.how == "hooks"
    assert engine.generate(ASK, adapter=a) == first  # merged now
    assert engine.adapters.how == "merged"


def test_the_bare_model_comes_back_bit_identical_after_merged_replies(hybrid):
    import torch

    _, engine, (a, _) = hybrid
    engine.activate(None)
    params = {n: (p, p.detach().clone()) for n, p in engine.base.named_parameters() if "lora_" not in n}
    for _ in range(3):
        engine.activate(a)
    assert engine.adapters.how == "merged"
    engine.activate(None)
    now = dict(engine.base.named_parameters())
    assert all(now[n] is p and torch.equal(p, copy) for n, (p, copy) in params.items())


def test_new_weights_under_a_merged_key_are_merged_afresh(hybrid, tmp_path):
    import torch

    from heed.engine import AdapterRef

    config, engine, (a, b) = hybrid
    ids = engine.prompt_ids(ASK)
    engine.activate(a)
    engine.activate(a)
    assert engine.adapters.how == "merged"  # the spare copies hold a's W0 + s·BA
    engine.drop_adapter(a.key)
    other = _make_adapter(config, tmp_path / "other", 9)
    engine.activate(other)
    assert engine.adapters.how == "hooks"  # nothing merged since a's merge: the copies still hold it
    expected = _logits(engine, ids)
    engine.drop_adapter(other.key)
    same_key = AdapterRef(a.key, other.path)  # a's key, another adapter's weights (a new version in the same slot)
    engine.activate(same_key)
    assert torch.allclose(_logits(engine, ids), expected, atol=1e-5), "served a's old merge under the reused key"
    engine.activate(same_key)
    assert engine.adapters.how == "merged"
    assert torch.allclose(_logits(engine, ids), expected, atol=1e-4)
    engine.drop_adapter(a.key)
    engine.ensure_adapter(a)


def test_a_merge_that_fails_half_way_leaves_the_bare_model(hybrid, monkeypatch):
    import torch

    _, engine, (a, b) = hybrid
    ids = engine.prompt_ids(ASK)
    engine.activate(None)
    base = _logits(engine, ids)
    engine.activate(b)
    engine.activate(b)  # b merged: a's merge is no longer in the copies
    engine.activate(a)
    real_addmm, calls = torch.addmm, []

    def addmm_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("out of memory")
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", addmm_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.activate(a)  # a again: merged, and the merge fails after three layers
    monkeypatch.undo()
    engine.activate(None)
    assert torch.equal(_logits(engine, ids), base), "a's half-merged layers served the bare model"


def test_a_mixed_batch_after_a_merged_user_gives_every_row_its_own_adapter(hybrid):
    _, engine, (a, b) = hybrid
    alone = {None: engine.generate(ASK), a.key: engine.generate(ASK, adapter=a), b.key: engine.generate(ASK, adapter=b)}
    engine.generate(ASK, adapter=b)  # b merged
    assert engine.adapters.how == "merged"
    order = [a, None, b]
    assert engine.generate_batch([ASK] * 3, adapters=order) == [alone[r.key if r else None] for r in order]


def test_auto_serving_merges_on_cuda_and_keeps_a_cpu_on_hooks_and_hybrid_needs_fp32():
    import torch

    from heed.adapter_slots import serving_mode
    from heed.config import ModelConfig

    auto, hybrid = ModelConfig(), ModelConfig(adapter_serving="hybrid")
    assert serving_mode(auto, "cuda", torch.bfloat16) == "merged"
    # A CPU default that never lets another user's request decide how a reply is computed.
    assert serving_mode(auto, "cpu", torch.float32) == "unmerged"
    assert serving_mode(hybrid, "cpu", torch.float32) == "hybrid"
    # bf16 W0 + s·BA rounds away much of a small LoRA: a user's merged replies would drift from the first.
    assert serving_mode(hybrid, "cpu", torch.bfloat16) == "unmerged"
    assert serving_mode(ModelConfig(adapter_serving="merged"), "cpu", torch.bfloat16) == "merged"
