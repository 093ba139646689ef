"""A thread that waits on the engine's worker gives its OpenMP pool back (heed.openmp)."""
from __future__ import annotations

import os
import threading

import pytest

from conftest import make_config

ASK = [{"role": "user", "content": "Say hello."}]


def _thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.fixture
def two_torch_threads():
    import torch

    from heed.openmp import _loaded_libgomp

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts threads through /proc (Linux)")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(1).add_(1)  # torch's OpenMP runtime is loaded from here on
    if not _loaded_libgomp():
        pytest.skip("torch here does not use libgomp")
    yield
    torch.set_num_threads(before)


def _parallel_work():
    import torch

    a = torch.randn(256, 256)
    for _ in range(5):
        a = torch.cat([a, a]).sum(dim=0, keepdim=True).expand(256, 256) @ torch.randn(256, 256)


def test_giving_the_pool_back_ends_this_threads_openmp_helpers(two_torch_threads):
    from heed.openmp import give_back_pool

    give_back_pool()  # start without a pool, so the helpers the work below starts are this thread's
    before = _thread_ids()
    _parallel_work()
    helpers = _thread_ids() - before
    assert helpers, "two torch threads should have started an OpenMP helper thread"
    assert give_back_pool()
    assert not helpers & _thread_ids(), "the helper thread of this thread's OpenMP team is still there"
    _parallel_work()  # the next parallel op makes a new pool: nothing was broken for later work
    assert _thread_ids() - before


def test_giving_the_pool_back_twice_or_without_a_pool_is_harmless(two_torch_threads):
    from heed.openmp import give_back_pool

    _parallel_work()
    assert give_back_pool() and give_back_pool()

    def fresh():
        assert give_back_pool()  # a thread that never ran torch has no pool

    t = threading.Thread(target=fresh)
    t.start()
    t.join()


def test_a_thread_that_asks_the_engine_gives_its_pool_back_first(tiny_model_path, tmp_path, monkeypatch):
    from heed import engine as engine_mod

    eng = engine_mod.Engine.load(make_config(tmp_path, tiny_model_path))
    callers = []
    monkeypatch.setattr(engine_mod, "give_back_pool", lambda: callers.append(threading.get_ident()) or True)
    eng.generate(ASK, max_new_tokens=4)
    assert callers == [threading.get_ident()], "the asking thread kept its pool while the worker generated"


def test_the_engine_gives_the_loading_threads_pool_back(tiny_model_path, tmp_path, monkeypatch):
    from heed import engine as engine_mod

    callers = []
    monkeypatch.setattr(engine_mod, "give_back_pool", lambda: callers.append(threading.get_ident()) or True)
    engine_mod.Engine.load(make_config(tmp_path, tiny_model_path))
    assert callers == [threading.get_ident()]
