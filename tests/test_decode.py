"""Continuous batching (heed.decode): requests join a running batch between tokens, rows that end leave it,
and every row gets the answer it gets alone, the same as whole-batch generation gives."""
from __future__ import annotations

import threading

import pytest

from conftest import make_config
from test_engine import ASK, _make_adapter

LONG_ASK = [ASK[0], {"role": "user", "content": "What is the capital of France, and of Spain, and of Italy, and why?"}]
ASKS = [ASK, LONG_ASK, [ASK[0], {"role": "user", "content": "Name a colour."}]]


@pytest.fixture(scope="module")
def world(tiny_model_path, tmp_path_factory):
    from heed.engine import Engine

    root = tmp_path_factory.mktemp("decode")
    config = make_config(root, tiny_model_path, model={"max_cached_adapters": 3, "batch_window_ms": 0, "max_batch": 2},
                         generation={"max_new_tokens": 24})
    adapters = [_make_adapter(config, root / f"a{i}", i) for i in (0, 4, 5)]
    engine = Engine.load(config)
    assert engine.continuous
    return engine, adapters


def _whole_batches(engine, fn):
    """``fn()`` with continuous batching off (transformers' generate on whole batches)."""
    engine.wait_idle()
    engine.continuous = False
    try:
        return fn()
    finally:
        engine.continuous = True


@pytest.mark.parametrize("penalty", [{}, {"penalize_end_of_turn": False}, {"penalty_counts_prompt": False}, {"repetition_penalty": 1.0}])
def test_rows_come_and_go_and_each_gets_what_whole_batch_generation_gives(world, penalty):
    engine, (a, b, c) = world
    gen = engine.with_generation(repetition_penalty=1.3, **penalty) if "repetition_penalty" not in penalty \
        else engine.with_generation(**penalty)
    chats = [ASKS[i % 3] for i in range(7)]
    refs = [a, None, b, c, a, b, None]
    limits = [24, 5, 17, 24, 9, 3, 12]
    expected = _whole_batches(engine, lambda: [engine.generate(m, adapter=r, gen=gen, max_new_tokens=n)
                                               for m, r, n in zip(chats, refs, limits)])
    # The worker holds two rows (model.max_batch): the others wait and take the slot of a row that ends.
    got: dict[int, str] = {}
    start = threading.Barrier(len(chats))

    def chat(i):
        start.wait()
        got[i] = engine.generate(chats[i], adapter=refs[i], gen=gen, max_new_tokens=limits[i])

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(len(chats))] == expected
    together = engine.generate_batch(chats[:4], adapters=refs[:4], gen=gen, batch=2)
    assert together == [engine.generate(m, adapter=r, gen=gen) for m, r in zip(chats[:4], refs[:4])]
    assert len(set(together)) > 1, "the adapters and prompts should change the answers"


def test_a_request_joins_a_running_answer_instead_of_waiting_for_it(world):
    engine, (a, b, _) = world
    long = engine.with_generation(max_new_tokens=400)
    engine.fixed_length = True  # the first answer runs to its limit: the second one must not wait for it
    try:
        alone = engine.generate(ASK, adapter=b, max_new_tokens=6)
        first_done = threading.Event()
        pieces = []

        def first():
            for piece in engine.stream(LONG_ASK, adapter=a, gen=long):
                pieces.append(piece)
            first_done.set()

        before = engine.batches_run
        t = threading.Thread(target=first)
        t.start()
        while not pieces:
            threading.Event().wait(0.01)
        second = engine.generate(ASK, adapter=b, max_new_tokens=6)
        joined_while_running = not first_done.is_set()
        t.join(120)
    finally:
        engine.fixed_length = False
    assert second == alone
    assert joined_while_running, "the short request waited for the long answer to end"
    assert engine.batches_run - before == 1, "the second request should have joined the running batch"


def test_a_sampled_answer_draws_the_same_tokens_alone_and_beside_greedy_chats(world):
    engine, (a, b, _) = world
    sampled = engine.with_generation(do_sample=True, temperature=1.0, top_p=0.95, seed=7)
    alone = engine.generate(LONG_ASK, adapter=a, gen=sampled)
    assert engine.generate(LONG_ASK, adapter=a, gen=sampled) == alone, "a seed gives one answer"
    assert _whole_batches(engine, lambda: engine.generate(LONG_ASK, adapter=a, gen=sampled)) == alone, "transformers' sampler"
    other_seed = engine.generate(LONG_ASK, adapter=a, gen=engine.with_generation(do_sample=True, temperature=1.0, top_p=0.95, seed=8))
    assert other_seed != alone
    got: dict[int, str] = {}
    start = threading.Barrier(3)

    def chat(i, messages, ref, gen):
        start.wait()
        got[i] = engine.generate(messages, adapter=ref, gen=gen)

    threads = [threading.Thread(target=chat, args=args) for args in
               ((0, ASK, b, None), (1, LONG_ASK, a, sampled), (2, ASKS[2], None, None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got[1] == alone


def test_a_reader_that_leaves_frees_its_row_and_the_others_go_on(world):
    engine, (a, b, _) = world
    long = engine.with_generation(max_new_tokens=300)
    expected = engine.generate(ASK, adapter=b)
    engine.fixed_length = True
    try:
        before = engine.tokens_generated
        stream = engine.stream(LONG_ASK, adapter=a, gen=long)
        next(stream)
        engine.fixed_length = False
        other = engine.generate(ASK, adapter=b)
        stream.close()
        engine.wait_idle()
    finally:
        engine.fixed_length = False
    assert other == expected
    assert engine.tokens_generated - before < 150, "the abandoned answer went on after its reader left"


def test_a_failed_step_reaches_every_reader_and_the_engine_serves_on(world, monkeypatch):
    engine, (a, _, _) = world
    from heed.decode import Decoder

    real = Decoder.step
    calls = {"n": 0}

    def broken(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(self)

    monkeypatch.setattr(Decoder, "step", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate(ASK, adapter=a)
    calls["n"] = 1
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate_batch([ASK, LONG_ASK])
    monkeypatch.setattr(Decoder, "step", real)
    assert engine.generate(ASK, adapter=a) == _whole_batches(engine, lambda: engine.generate(ASK, adapter=a))


def test_sliding_window_models_and_invariant_half_precision_keep_whole_batches(tiny_model_path, tmp_path):
    from types import SimpleNamespace

    from heed.decode import supports_continuous
    from heed.engine import Engine

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert supports_continuous(model(layer_types=["full_attention"] * 2))
    assert not supports_continuous(model(layer_types=["full_attention", "sliding_attention"]))
    assert not supports_continuous(model(sliding_window=4096))
    assert supports_continuous(model(sliding_window=None))
    bf16 = Engine.load(make_config(tmp_path, tiny_model_path, model={"dtype": "bfloat16"}))
    assert bf16.invariant and not bf16.continuous
    off = Engine.load(make_config(tmp_path, tiny_model_path, model={"continuous_batching": False}))
    assert not off.continuous


def test_wait_idle_waits_for_a_batch_decoding_in_another_thread(world):
    engine, (a, _, _) = world
    done = threading.Event()
    began = threading.Event()
    from heed.decode import Decoder

    real_join = Decoder.join

    def join(self, row):
        began.set()
        return real_join(self, row)

    Decoder.join = join
    try:
        t = threading.Thread(target=lambda: (engine.generate_batch([LONG_ASK] * 3, adapters=[a, None, a], max_new_tokens=200),
                                             done.set()))
        engine.fixed_length = True
        t.start()
        began.wait(30)
        engine.wait_idle()
        finished_first = done.is_set()
        t.join(120)
    finally:
        Decoder.join = real_join
        engine.fixed_length = False
    assert finished_first, "wait_idle returned while another thread's batch was still decoding"
