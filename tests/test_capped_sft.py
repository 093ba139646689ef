"""learner.capped_sft: the SFT term stops pushing a token the adapter already predicts well enough."""
from __future__ import annotations

import math

import pytest


def test_a_token_already_likely_enough_adds_no_loss_and_no_gradient():
    import torch

    from learner.capped_sft import capped_nll

    logps = torch.log(torch.tensor([[0.9, 0.2, 0.6, 0.05]])).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = capped_nll(logps, mask, until=0.5)
    loss.backward()
    assert loss.item() == pytest.approx((-math.log(0.2) + math.log(0.5)) / 3)
    assert logps.grad.tolist()[0] == pytest.approx([0.0, -1 / 3, 0.0, 0.0]), "only the unlikely, unmasked token is pushed"


def test_capped_near_certainty_trains_as_trls_own_sft_term(tmp_path, tiny_model_path):
    from dataclasses import replace

    from learner.train import train_adapter
    from learner_util import learner_config

    config = learner_config(tmp_path, tiny_model_path, epochs=3, batch_size=2, dtype="float32")
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"A good answer {i}.",
              "rejected": f"bad bad {i}", "weight": 1.0} for i in range(4)]
    runs = {}
    for until in (0.0, 1 - 1e-9, 0.5):
        c = replace(config, learner=replace(config.learner, sft_until=until))
        runs[until] = train_adapter(c, init_adapter=None, dpo_pairs=pairs, kto_examples=[], out_dir=tmp_path / str(until))
    assert runs[1 - 1e-9]["dpo_losses"] == pytest.approx(runs[0.0]["dpo_losses"], abs=1e-4)
    assert "dpo_sft_capped" in runs[0.5] and "dpo_sft_capped" not in runs[0.0]
    # Capped at 1/2, a token the tiny model gives ~1/vocab still counts all but log 2 of its loss.
    assert runs[0.5]["dpo_losses"][0] == pytest.approx(runs[0.0]["dpo_losses"][0] - math.log(2), abs=1e-3)
