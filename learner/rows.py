"""Feedback examples as trl rows: prompts fitted to the token budget, DPO and KTO rows, which pairs are imitated.

Pure data shaping, no torch: ``learner.train`` builds its datasets from these,
and ``learner.run`` asks ``untrainable`` before it loads a model.
"""
from __future__ import annotations

from heed.config import HeedConfig

def _ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "input_ids") or isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)


def fit_prompt(tokenizer, messages: list[dict], *, budget: int) -> list[dict]:
    """The messages with the oldest turns dropped (the system message kept) so the prompt fits ``budget`` tokens.

    trl truncates a too-long example from the end, which would cut the very
    answer being learned; dropping old turns keeps the answer and the question.
    """
    msgs = [dict(m) for m in messages]
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    n = len(_ids(tokenizer, msgs))
    while n > budget and len(msgs) - start > 1:
        del msgs[start]
        while len(msgs) - start > 1 and msgs[start]["role"] != "user":
            del msgs[start]
        n = len(_ids(tokenizer, msgs))
    if n > budget:
        # One question longer than the budget: keep its end, where the ask usually is.
        ids = tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        keep = max(len(ids) - (n - budget), 1)
        msgs[-1]["content"] = tokenizer.decode(ids[-keep:])
    return msgs


def extends(chosen: str, rejected: str) -> bool:
    """Is the chosen answer the rejected one with something added after it (whitespace aside)?"""
    c, r = " ".join(chosen.split()), " ".join(rejected.split())
    # At a word boundary: "Yesterday it rained." does not extend "Yes".
    return len(c) > len(r) > 0 and c.startswith(r) and (c[len(r)] == " " or not r[-1].isalnum())


class _Rows:
    """Examples -> trl rows (conversational format) that fit ``max_length``."""

    def __init__(self, tokenizer, system: str, max_length: int, *, extension_pairs: str = "dpo") -> None:
        self.tokenizer, self.system, self.max_length = tokenizer, system, max_length
        self.extension_pairs = extension_pairs
        self.cut = 0  # examples whose longest answer trl will cut at max_length, even with the prompt trimmed

    def prompt(self, ex: dict, *answers: str) -> list[dict]:
        longest = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 4
        budget = max(self.max_length - longest, self.max_length // 2)
        msgs = fit_prompt(self.tokenizer, [{"role": "system", "content": self.system}, *ex["prompt"]], budget=budget)
        self.cut += len(_ids(self.tokenizer, msgs)) + longest > self.max_length
        return msgs

    @staticmethod
    def copies(ex: dict) -> int:
        # trl has no per-example weight: a conversation rating's weight becomes repetition (1.5x -> 2 copies).
        return max(1, round(float(ex.get("weight", 1.0))))

    def dpo(self, pairs: list[dict], *, imitated: bool = True) -> list[dict]:
        """DPO rows; ``imitated`` rows train beside the SFT term (an extension pair's rewrite needs it)."""
        rows = []
        for p in pairs:
            rejected = p["rejected"]
            if imitated and self.extension_pairs == "sft" and extends(p["chosen"], rejected):
                # The shared start cancels in DPO's margin, leaving "end here" against "go on": pushed without
                # bound, that lowers the end of every answer. With rejected = chosen the margin is 0 and has no
                # gradient (no LoRA dropout, no noise), so only the SFT term trains the row: add this, then stop.
                rejected = p["chosen"]
            row = {"prompt": self.prompt(p, p["chosen"], rejected),
                   "chosen": [{"role": "assistant", "content": p["chosen"]}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
            rows += [row] * self.copies(p)
        return rows

    def kto(self, examples: list[dict]) -> list[dict]:
        rows = []
        for e in examples:
            row = {"prompt": self.prompt(e, e["completion"]),
                   "completion": [{"role": "assistant", "content": e["completion"]}], "label": bool(e["label"])}
            rows += [row] * self.copies(e)
        return rows


def as_kto(pairs: list[dict]) -> list[dict]:
    """Each pair as two unpaired examples: chosen desirable, rejected undesirable."""
    out = []
    for p in pairs:
        base = {k: v for k, v in p.items() if k not in ("chosen", "rejected", "kind")}
        out.append({**base, "kind": "kto", "completion": p["chosen"], "label": 1})
        out.append({**base, "kind": "kto", "completion": p["rejected"], "label": 0})
    return out


def kto_weights(n_desirable: int, n_undesirable: int, *, balance: bool) -> dict:
    """KTOConfig's desirable/undesirable weights: KTO's guidance is weight x count equal for both labels.

    With one label absent trl still checks the balance, counting the absent label
    as one example; its weight then weighs no example, so it is set to pass the
    check instead of warning about a balance no weight could fix.
    """
    nd, nu = n_desirable, n_undesirable
    if not balance:
        return {}
    if nd and nu:
        return {"desirable_weight": max(1.0, nu / nd), "undesirable_weight": max(1.0, nd / nu)}
    if nd > 1:
        return {"desirable_weight": 1.0, "undesirable_weight": float(nd)}
    if nu > 1:
        return {"desirable_weight": float(nu), "undesirable_weight": 1.0}
    return {}


def split_imitated(pairs: list[dict], config: HeedConfig) -> tuple[list[dict], list[dict]]:
    """(pairs the SFT term imitates, pairs only preferred: DPO alone), by ``learner.imitate``.

    With no endorsed answer to anchor on, the preferred pairs are imitated after all: DPO alone
    on the small model's pairs reward-hacks into nonsense (``../shared/STACK.md``).
    """
    lc = config.learner
    if lc.imitate == "all" or lc.sft_weight == 0:
        return list(pairs), []
    imitated = [p for p in pairs if p.get("imitate", True)]
    preferred = [p for p in pairs if not p.get("imitate", True)]
    if not imitated:
        return preferred, []
    # The SFT term alone (dpo_loss 'none') has nothing to learn from a pair it does not imitate.
    return imitated, ([] if lc.dpo_loss == "none" else preferred)


def untrainable(config: HeedConfig, dpo_pairs: list[dict], kto_examples: list[dict]) -> str | None:
    """Why these examples cannot train a run (None when they can), by the same rules ``train_adapter`` applies."""
    if config.learner.paired_loss == "dpo" and dpo_pairs:
        return None
    if config.learner.unpaired == "none" and not dpo_pairs:
        return "no pair (learner.unpaired is 'none': thumbs and ratings with no partner do not train)"
    singles = (as_kto(dpo_pairs) if config.learner.paired_loss == "kto" else []) + list(kto_examples)
    if len(singles) < 2:
        return "a single unpaired example (KTO needs two)"
    if not any(e["label"] for e in singles):
        return "only thumbs-down examples (KTO needs a good answer too)"
    return None
