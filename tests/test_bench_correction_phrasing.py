"""`heed bench correction-phrasing`: the service's own phrasing of a correction, measured beside two others."""
from __future__ import annotations

import json

import pytest


def _config(tmp_path, model_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"model: {{name_or_path: '{model_path}', torch_threads: 1}}\n"
                   "generation: {max_new_tokens: 8, max_context_tokens: 512}\n")
    return str(cfg)


def test_a_correction_rides_on_the_last_user_turn_and_leaves_the_chat_as_it_was():
    from heed.service import with_correction

    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Why is the sky blue?"}]
    got = with_correction(chat, "shorter please")
    assert got[0] == chat[0] and got[-1]["role"] == "user"
    assert got[-1]["content"].startswith("Why is the sky blue?") and "shorter please" in got[-1]["content"]
    assert chat[-1]["content"] == "Why is the sky blue?", "the caller's messages are not changed"


def test_every_phrasing_is_measured_for_every_persona_and_the_first_is_the_services(tmp_path, tiny_model_path):
    from bench.cli import main
    from bench.correction_phrasing import phrasings
    from heed.service import with_correction

    out = tmp_path / "phrasing.json"
    assert main(["correction-phrasing", "--config", _config(tmp_path, tiny_model_path), "--prompts", "2",
                 "--personas", "brief", "signs_off", "--guidance", "1.5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["followed"]) == {"appended", "system prompt", "before the question", "appended, guided 1.5"}
    for row in res["followed"].values():
        assert set(row) == {"brief", "signs_off"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert set(res["degenerate"]) == set(res["followed"]) and all(0.0 <= v <= 1.0 for v in res["degenerate"].values())
    assert res["n_prompts"] == 2 and res["samples"]
    from bench.report_cli import render

    out.rename(tmp_path / "correction_guidance.json")
    page = render(tmp_path)
    assert "## Corrections in the moment" in page and "| appended, guided 1.5 |" in page
    assert "--guidance 1.5" in page, "the page says how to regenerate the guided rows"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert phrasings("S")["appended"]("Q", "C") == with_correction(chat, "C")


def test_an_unknown_persona_or_no_prompts_is_refused_before_the_model_loads(tmp_path):
    from bench.cli import main

    with pytest.raises(SystemExit, match="unknown persona 'nobody'"):
        main(["correction-phrasing", "--personas", "nobody", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="at least 1"):
        main(["correction-phrasing", "--prompts", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="1 is no guidance"):
        main(["correction-phrasing", "--guidance", "1.0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_guidance_pushes_the_answer_away_from_the_plain_chats(tiny_model_path, tmp_path):
    """Guided decoding against the chat without the correction: the same answer as plain decoding at no
    difference between the two chats, a different one when the correction changes the prompt."""
    from dataclasses import replace

    from bench.correction_phrasing import guided
    from heed.config import load_config
    from heed.engine import Engine

    config = load_config(_config(tmp_path, tiny_model_path))
    engine = Engine.load(replace(config, generation=replace(config.generation, do_sample=False, max_new_tokens=12)))
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "Why is the sky blue?"}]
    asked = [*plain[:1], {"role": "user", "content": "Why is the sky blue? Answer in one word, in capitals."}]
    alike, _ = guided(engine, plain, plain, 50.0)
    assert alike == engine.generate(plain), "against itself, guidance changes nothing"
    # The tiny random model's next token barely depends on the prompt: only a large scale turns the difference around.
    assert guided(engine, asked, plain, 50.0)[0] != engine.generate(asked)
