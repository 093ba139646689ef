"""The engine: adapter cache, per-request adapters, the single-adapter paths (unmerged hooks, merged
weights, hybrid), mixed batches, the request queue. Every test runs in every serving mode."""
from __future__ import annotations

import threading

import pytest

from conftest import make_config

ASK = [{"role": "system", "content": "You are Heed."}, {"role": "user", "content": "What is the capital of France?"}]


def _make_adapter(config, out, seed: int, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """A LoRA with random (nonzero) A and B, made with peft directly: no training needed to change answers."""
    import torch
    from peft import LoraConfig, get_peft_model

    from heed.engine import AdapterRef, load_base

    model, _ = load_base(config)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    return AdapterRef(f"user{seed}", str(out))


@pytest.fixture(scope="module", params=["unmerged", "merged", "hybrid", "bf16"])
def world(request, tiny_model_path, tmp_path_factory):
    from heed.engine import Engine

    root = tmp_path_factory.mktemp("engine")
    # bf16: half-precision serving, batch-invariant (heed.invariant): every adapter by the batched LoRA path.
    mode = {"dtype": "bfloat16"} if request.param == "bf16" else {"adapter_serving": request.param}
    config = make_config(root, tiny_model_path, model={"max_cached_adapters": 3, "batch_window_ms": 50, **mode})
    adapters = [_make_adapter(config, root / f"a{i}", i) for i in (0, 4, 5)]  # seeds whose answers differ
    return config, Engine.load(config), adapters


def _logits(engine, ids):
    import torch

    with torch.inference_mode():
        return engine.base(input_ids=torch.tensor([ids])).logits


def test_an_adapter_changes_the_answer_and_the_base_comes_back_bit_identical(world):
    import torch

    config, engine, (a, b, _) = world
    ids = engine.prompt_ids(ASK)
    engine.activate(None)
    base_logits = _logits(engine, ids)
    base_text = engine.generate(ASK)
    assert engine.generate(ASK, adapter=a) != base_text
    engine.activate(a)
    assert not torch.equal(_logits(engine, ids), base_logits)
    engine.activate(None)
    assert torch.equal(_logits(engine, ids), base_logits)
    assert engine.generate(ASK) == base_text


def test_the_single_adapter_path_computes_what_peft_computes(world):
    import torch
    from peft import PeftModel

    from heed.engine import load_base

    config, engine, (a, _, _) = world
    ids = engine.prompt_ids(ASK)
    engine.activate(a)
    served = _logits(engine, ids)
    engine.activate(None)
    model, _ = load_base(config)
    reference = PeftModel.from_pretrained(model, a.path)
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([ids])).logits
    if served.dtype == torch.float32:
        assert torch.allclose(served, expected, atol=1e-5)
    else:
        # bf16 rounds the LoRA sum at another point than peft: judged against what the adapter changes at all.
        base = _logits(engine, ids)  # the engine serves no adapter now
        error = (served.float() - expected.float()).abs().max()
        assert error < 0.1 * (expected.float() - base.float()).abs().max()


def test_switching_users_never_writes_a_base_weight(world):
    import torch

    config, engine, (a, b, _) = world
    engine.activate(None)
    params = {n: (p, p.detach().clone()) for n, p in engine.base.named_parameters() if "lora_" not in n}
    for ref in (a, b, a, None, b):
        engine.activate(ref)
    engine.activate(None)
    now = dict(engine.base.named_parameters())
    assert all(now[n] is p and torch.equal(p, copy) for n, (p, copy) in params.items())
    if engine.serving == "unmerged":
        # Unmerged, a switch only repoints the hooks: the base weights stay in place while adapted too.
        engine.activate(a)
        assert all(dict(engine.base.named_parameters())[n] is p for n, (p, _) in params.items())
        engine.activate(None)


def test_a_mixed_batch_gives_every_row_its_own_adapter(world):
    config, engine, (a, b, c) = world
    alone = {None: engine.generate(ASK), **{r.key: engine.generate(ASK, adapter=r) for r in (a, b, c)}}
    order = [b, None, a, c, b]
    batch = engine.generate_batch([ASK] * len(order), adapters=order)
    assert batch == [alone[r.key if r else None] for r in order]
    assert len(set(alone.values())) == 4, "the random adapters should answer differently"


def test_padding_a_short_prompt_beside_a_long_one_changes_no_answer(world):
    # Runs of the benchmark reproduce only if an answer does not depend on who else shares its batch.
    config, engine, (a, b, _) = world
    asks = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Tell me, in some detail, why the sky looks blue at noon " * 3}],
            ASK, [{"role": "user", "content": "And the sea?"}]]
    order = [a, None, b, a]
    alone = [engine.generate(m, adapter=r) for m, r in zip(asks, order)]
    assert len({len(engine.prompt_ids(m)) for m in asks}) == len(asks)  # every row is padded differently
    assert engine.generate_batch(asks, adapters=order) == alone
    assert engine.generate_batch(asks[::-1], adapters=order[::-1]) == alone[::-1]


def test_users_asking_at_once_share_a_batch_and_never_get_each_others_adapter(world):
    config, engine, (a, b, c) = world
    users = [a, None, b, c, a, None]
    alone = {r.key if r else None: engine.generate(ASK, adapter=r) for r in (a, b, c, None)}
    got: dict[int, str] = {}
    start = threading.Barrier(len(users))

    def chat(i, ref):
        start.wait()
        got[i] = "".join(engine.stream(ASK, adapter=ref))

    before = engine.batches_run
    threads = [threading.Thread(target=chat, args=(i, r)) for i, r in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(users))] == [alone[r.key if r else None] for r in users]
    assert engine.batches_run - before < len(users), "concurrent requests were not batched"


def test_closing_a_stream_stops_its_generation_early(world):
    config, engine, _ = world
    long = engine.with_generation(max_new_tokens=1500)
    engine.wait_idle()
    before = engine.tokens_generated
    stream = engine.stream(ASK, gen=long)
    next(stream)
    stream.close()
    engine.wait_idle()
    assert engine.tokens_generated - before < 100
    assert engine.generate(ASK)  # the engine still serves


def test_the_adapter_cache_evicts_the_least_recently_used(world, tmp_path):
    config, engine, (a, b, c) = world
    d = _make_adapter(config, tmp_path / "d", 7)
    for ref in (a, b, c):
        engine.ensure_adapter(ref)
    engine.ensure_adapter(a)  # a is now the most recent
    engine.ensure_adapter(d)
    assert engine.cached_adapters == [c.key, a.key, d.key]
    assert engine.generate(ASK, adapter=b)  # reloads from disk on demand
    assert b.key in engine.cached_adapters and len(engine.cached_adapters) == 3


def test_a_lora_on_a_tied_weight_leaves_the_embeddings_alone(world, tmp_path):
    import torch

    from heed.engine import Engine

    config, _, _ = world
    engine = Engine.load(config)
    tied = _make_adapter(config, tmp_path / "tied", 3, targets=("lm_head",))
    emb = engine.base.get_input_embeddings().weight
    before = emb.detach().clone()
    ids = engine.prompt_ids(ASK)
    base_logits = _logits(engine, ids)
    engine.activate(tied)
    assert torch.equal(engine.base.get_input_embeddings().weight, before)
    assert not torch.equal(_logits(engine, ids), base_logits)
    if engine.serving == "merged":
        assert not torch.equal(engine.base.get_output_embeddings().weight, before)
    engine.activate(None)
    assert engine.base.get_output_embeddings().weight is emb
    assert torch.equal(_logits(engine, ids), base_logits)


def test_a_missing_adapter_is_a_clear_error_and_the_engine_keeps_serving(world, tmp_path):
    from heed.engine import AdapterLoadError, AdapterRef

    config, engine, (a, _, _) = world
    with pytest.raises(AdapterLoadError, match="no adapter files"):
        engine.generate(ASK, adapter=AdapterRef("ghost", str(tmp_path / "nothing")))
    with pytest.raises(AdapterLoadError):
        engine.generate_batch([ASK, ASK], adapters=[a, AdapterRef("ghost", str(tmp_path / "nothing"))])
    assert engine.generate(ASK, adapter=a)


def test_a_corrupt_adapter_file_is_an_adapter_load_error_and_a_good_copy_loads_after(world, tmp_path):
    import shutil

    from heed.engine import AdapterLoadError, AdapterRef

    config, engine, (a, _, _) = world
    bad = tmp_path / "bad"
    shutil.copytree(a.path, bad)
    good_bytes = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(AdapterLoadError, match="could not be loaded"):
        engine.ensure_adapter(AdapterRef("damaged", str(bad)))
    (bad / "adapter_model.safetensors").write_bytes(good_bytes)
    assert engine.generate(ASK, adapter=AdapterRef("damaged", str(bad))) == engine.generate(ASK, adapter=a)


def test_a_batch_with_more_adapters_than_the_cache_holds_still_gives_each_its_own(world, tmp_path):
    config, engine, (a, b, c) = world
    d = _make_adapter(config, tmp_path / "d2", 9)
    order = [a, b, c, d, None]  # the cache holds 3
    alone = [engine.generate(ASK, adapter=r) for r in order]
    assert engine.generate_batch([ASK] * len(order), adapters=order) == alone


def test_the_repetition_penalty_spares_the_end_of_turn_token():
    import torch

    from heed.lora_batch import sparing_penalty

    eos, word = 2, 7
    input_ids = torch.tensor([[1, eos, word, 5]])  # a prompt whose turns end with eos, and a word already said
    scores = torch.tensor([[0.0, 1.0, 3.0, 0.5, 0.5, 0.5, 0.5, 3.0]])
    out = sparing_penalty(1.5, [eos])(input_ids, scores.clone())
    assert out[0, eos] == 3.0, "the end of turn keeps its score"
    assert out[0, word] == 2.0 and out[0, 1] == 1.0 / 1.5, "repeated words are still penalized"
    pad = 0  # a row's left padding is not something it said: its score may not depend on batch-mates
    padded = torch.tensor([[pad, pad, 1, word], [pad, 1, eos, word]])
    two = scores.repeat(2, 1)
    two[:, pad] = 1.0
    out = sparing_penalty(1.5, [eos], padding=torch.tensor([2, 0]))(padded, two)
    assert out[0, pad] == 1.0 and out[1, pad] == 1.0 / 1.5, "padding counted only where it is a real token"
    assert out[0, word] == out[1, word] == 2.0


def test_the_answer_penalty_counts_what_the_answer_said_not_the_question():
    import torch

    from heed.lora_batch import answer_penalty

    eos, asked, said = 2, 7, 6
    input_ids = torch.tensor([[1, eos, asked, 5, said]])  # a 4-token prompt (its turn ends with eos), then the answer so far
    scores = torch.tensor([[0.0, 1.0, 3.0, 0.5, 0.5, 0.5, 3.0, 3.0]])
    out = answer_penalty(1.5, 4)(input_ids, scores.clone())
    assert out[0, asked] == 3.0, "the question's own words are free to use"
    assert out[0, said] == 2.0, "what the answer already said is penalized"
    assert out[0, eos] == 3.0 and out[0, 5] == 0.5
    out = answer_penalty(1.5, 4, [eos])(input_ids, scores.clone())
    assert out[0, eos] == 2.0 and out[0, asked] == 3.0, "the end of a turn is penalized as if said, when asked to"
    again = torch.tensor([[1, eos, asked, 5, eos]])  # said in the answer too: penalized once, not twice
    assert answer_penalty(1.5, 4, [eos])(again, scores.clone())[0, eos] == 2.0


def test_an_answer_penalized_on_its_own_words_does_not_depend_on_its_batch_mates(world):
    config, engine, (a, b, _) = world
    gen = engine.with_generation(repetition_penalty=1.3, penalty_counts_prompt=False)
    kw = engine._gen_kwargs(gen, 8, prompt_width=5)
    assert kw["repetition_penalty"] == 1.0 and len(kw["logits_processor"]) == 1
    with pytest.raises(ValueError, match="where the answer starts"):
        engine._gen_kwargs(gen, 8)
    from heed.engine import _gen_key

    assert _gen_key(gen) != _gen_key(engine.with_generation(repetition_penalty=1.3)), "they never share a batch"
    long_ask = [ASK[0], {"role": "user", "content": "What is the capital of France, and of Spain, and of Italy, and why?"}]
    alone = [engine.generate(m, adapter=r, gen=gen) for m, r in ((ASK, a), (long_ask, b))]
    assert engine.generate_batch([ASK, long_ask], adapters=[a, b], gen=gen) == alone
    # Adapter a answers " and" over and over; the long question says " and" three times.
    counted = engine.generate(long_ask, adapter=a, gen=engine.with_generation(repetition_penalty=3.0))
    spared = engine.generate(long_ask, adapter=a, gen=engine.with_generation(repetition_penalty=3.0, penalty_counts_prompt=False))
    assert spared.startswith(" and") and not counted.startswith(" and"), "only the answer's own words are penalized"


def test_the_engine_penalizes_the_end_of_an_answer_unless_told_to_spare_it(world):
    config, engine, _ = world
    default = engine._gen_kwargs(engine.with_generation(repetition_penalty=1.15), 8)
    assert default["repetition_penalty"] == 1.15 and "logits_processor" not in default
    gen = engine.with_generation(repetition_penalty=1.15, penalize_end_of_turn=False)
    kw = engine._gen_kwargs(gen, 8)
    assert kw["repetition_penalty"] == 1.0 and len(kw["logits_processor"]) == 1
    assert isinstance(engine.generate(ASK, gen=gen), str)
