"""Shared fixtures: a tiny model built offline once per session, a fresh store per test,
and (for tests marked slow) the real embedded model converted once into data/models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from heed.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    """The embedded SmolLM2 as an HF folder, converted once and cached in data/models."""
    from heed.models import convert_embedded

    return convert_embedded(REPO / "data" / "models")


def make_config(data_dir: Path, model_path: Path | str, **sections):
    from heed.config import load_config

    overrides = {
        "data_dir": str(data_dir),
        "model": {"name_or_path": str(model_path), "torch_threads": 1, **sections.pop("model", {})},
        "generation": {"max_new_tokens": 16, "max_context_tokens": 512, **sections.pop("generation", {})},
        "learner": {"min_new_feedback": 1, "max_length": 128, "gate_max_new_tokens": 12, **sections.pop("learner", {})},
        **sections,
    }
    return load_config(REPO / "configs" / "tiny.yaml", overrides=overrides)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_path):
    return make_config(tmp_path / "data", tiny_model_path)


@pytest.fixture(scope="session")
def shared_tiny_engine(tiny_model_path, tmp_path_factory):
    """One loaded tiny engine for the session: loading is the slow part of small tests."""
    from heed.engine import Engine

    return Engine.load(make_config(tmp_path_factory.mktemp("engine"), tiny_model_path))


@pytest.fixture
def heed(tiny_config):
    """A service on a fresh SQLite file with its own tiny engine."""
    from heed.service import Heed

    return Heed(tiny_config)


@pytest.fixture
def alice(heed) -> int:
    return heed.add_user("alice", "alice-password")


@pytest.fixture
def bob(heed) -> int:
    return heed.add_user("bob", "bob-password")
