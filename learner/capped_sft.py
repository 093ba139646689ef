"""An SFT term that stops pushing a token once the adapter already gives it enough probability.

trl's SFT term beside DPO is the mean negative log-likelihood of every chosen
token: it keeps pushing each one towards probability 1. On a user's handful of
answers, most of which are the model's own words (an edit that cuts an answer
keeps its first sentences; one that adds a sign-off keeps all of it), that
memorises their content, and it comes back in answers to other questions. Capped
at probability ``until``, a token the adapter already predicts that well adds no
gradient: what is left to learn is what the user changed (where to stop, the
sign-off, the summary line) and the tokens the model did not expect.

    loss_t = max(0, -log p_t + log until)     (mean over the chosen tokens, like trl's)
"""
from __future__ import annotations

import math


def capped_nll(log_probs, mask, *, until: float):
    """Mean over ``mask``'s tokens of the negative log-likelihood above ``-log until`` (0 once p >= until)."""
    import torch

    floor = -math.log(until)
    capped = torch.clamp(-log_probs - floor, min=0.0)
    keep = mask.bool()
    return capped[keep].mean() if keep.any() else log_probs.sum() * 0.0


def dpo_trainer(*, until: float, weight: float):
    """trl's DPOTrainer with the capped SFT term added to its loss (trl's own SFT term is then left out)."""
    from trl import DPOTrainer

    class CappedSFTDPOTrainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            seen: list = []

            def keep_policy_output(module, args, kwargs, output):
                # The policy's pass is the one with gradients; a reference pass (adapter off) runs under no_grad.
                if kwargs.get("fused_lm_head") and output.log_probs.requires_grad:
                    seen.append(output.log_probs)

            handle = model.register_forward_hook(keep_policy_output, with_kwargs=True)
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                handle.remove()
            mask = inputs["completion_mask"][..., 1:]
            chosen_mask, _ = mask.chunk(2, dim=0)
            chosen_logps, _ = seen[-1][:, -mask.size(1):].chunk(2, dim=0)
            extra = weight * capped_nll(chosen_logps, chosen_mask, until=until)
            self._metrics["train" if self.model.training else "eval"]["sft_capped"].append(float(extra.detach()))
            if return_outputs:
                loss, outputs = result
                return loss + extra, outputs
            return result + extra

    return CappedSFTDPOTrainer
