from pathlib import Path

import pytest

from heed.config import ConfigError, HeedConfig, describe, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default", "tiny", "gpu"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(config, HeedConfig)


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_pth: x\n")
    with pytest.raises(ConfigError, match=r"model\.name_or_pth"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(path)


@pytest.mark.parametrize("yaml_text, key", [
    ("learner:\n  learning_rate: -1\n", "learner.learning_rate"),
    ("learner:\n  epochs: two\n", "learner.epochs"),
    ("model:\n  device: tpu\n", "model.device"),
    ("app:\n  port: 70000\n", "app.port"),
    ("generation:\n  do_sample: 'yes'\n", "generation.do_sample"),
    ("generation:\n  max_message_chars: 0\n", "generation.max_message_chars"),
    ("learner:\n  extension_pairs: skip\n", "learner.extension_pairs"),
    ("learner:\n  extension_pairs: sft\n  lora_dropout: 0.1\n", "learner.extension_pairs"),
    ("learner:\n  extension_pairs: sft\n  sft_weight: 0\n", "learner.extension_pairs"),
    ("learner:\n  gate_retry_step: 1.0\n", "learner.gate_retry_step"),
    ("learner:\n  unpaired: thumbs\n", "learner.unpaired"),
    ("learner:\n  kto_max_per_pair: -1\n", "learner.kto_max_per_pair"),
    ("learner:\n  gate_retries: -1\n", "learner.gate_retries"),
])
def test_bad_value_is_an_error_that_names_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_broken_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_merge_over_the_file(tmp_path):
    config = load_config(REPO / "configs" / "tiny.yaml", overrides={"data_dir": str(tmp_path), "model": {"torch_threads": 2}})
    assert config.data_path == tmp_path
    assert config.model.torch_threads == 2
    assert config.model.name_or_path == "tiny:0"


def test_every_knob_has_help():
    rows = describe()
    assert len(rows) > 30
    assert all(help for _, _, help in rows)
