"""`heed bench recipes`: two recipes trained on the very same collected feedback, on the tiny model."""
from __future__ import annotations

import json

import pytest


def _config(tmp_path, model_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"model: {{name_or_path: '{model_path}', torch_threads: 1}}\n"
                   "generation: {max_new_tokens: 12, max_context_tokens: 512}\n"
                   "learner: {min_new_feedback: 1, max_length: 96, epochs: 2}\n")
    return str(cfg)


def test_recipes_are_compared_on_one_collected_set_of_feedback(tmp_path, tiny_model_path):
    from bench.cli import main

    config, data, out = _config(tmp_path, tiny_model_path), tmp_path / "data", tmp_path / "recipes.jsonl"
    assert main(["recipes", "collect", "--config", config, "--data-dir", str(data), "--events", "3", "--personas", "says_thanks"]) == 0
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("slow: {}\nfast: {learning_rate: 0.01}\n")
    assert main(["recipes", "train", "--config", config, "--data-dir", str(data), "--recipes", str(recipes), "--events", "3",
                 "--heldout-prompts", "4", "--max-new-tokens", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["recipe"], r["persona"]) for r in rows] == [("slow", "says_thanks"), ("fast", "says_thanks")]
    assert all(r["events"] == 3 and r["dpo_rows"] > 0 and r["steps"] > 0 and 0.0 <= r["accept"] <= 1.0 for r in rows)
    assert rows[1]["overrides"] == {"learning_rate": 0.01}
    with pytest.raises(SystemExit, match="no collected events for brief"):
        main(["recipes", "train", "--config", config, "--data-dir", str(data), "--personas", "brief", "--out", str(out)])


def test_a_recipe_with_an_unknown_learner_key_is_refused_by_name(tmp_path, tiny_model_path):
    from bench.cli import main
    from heed.config import ConfigError

    config, data = _config(tmp_path, tiny_model_path), tmp_path / "data"
    assert main(["recipes", "collect", "--config", config, "--data-dir", str(data), "--events", "1", "--personas", "says_thanks"]) == 0
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("typo: {learning_rat: 0.01}\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        main(["recipes", "train", "--config", config, "--data-dir", str(data), "--recipes", str(recipes), "--out", str(tmp_path / "o.jsonl")])
