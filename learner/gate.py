"""The promotion gate: judge a candidate adapter by what it generates, against the active one.

Held-out implicit-reward accuracy saturated at 1.00 here even for adapters that
changed nothing (STACK.md), so it is reported but never decides. What decides:
- degeneration of generated answers on held-out contexts and fixed probes;
- drift from the base: per-token KL(candidate || base) on the probes' answers;
- likelihood of the user's held-out chosen answers, candidate vs active.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from heed.config import HeedConfig
from heed.quality import degeneration

log = logging.getLogger(__name__)

PROBES = [
    "What is the capital of Japan?",
    "Give me one tip for sleeping better.",
    "Explain what a rainbow is.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What should I pack for a day at the beach?",
    "How many days are there in a leap year?",
    "Suggest a name for a pet cat.",
]


def _sequence_ids(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
    prompt, full = list(prompt), list(full)
    if full[:len(prompt)] != prompt:
        # Templates that rewrite earlier turns: fall back to plain concatenation.
        full = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return full, len(prompt)


def _token_logprobs(engine, ids: list[int], start: int):
    import torch

    x = torch.tensor([ids], device=engine.device)
    logits = engine.base(input_ids=x).logits[0, start - 1:-1].float()
    return torch.log_softmax(logits, dim=-1), x[0, start:]


def evaluate(config: HeedConfig, *, candidate_dir: str, active_dir: str | None, heldout: list[dict]) -> dict:
    """Gate figures for the candidate and the verdict: {'promote': bool, 'reasons': [...], ...}."""
    import torch

    from heed.engine import AdapterRef, Engine, load_base

    lc = config.learner
    model, tokenizer = load_base(config)
    gen = replace(config.generation, do_sample=False, max_new_tokens=lc.gate_max_new_tokens)
    engine = Engine(model, tokenizer, model_cfg=replace(config.model, max_cached_adapters=4), gen_cfg=gen)
    cand = AdapterRef("candidate", candidate_dir)
    act = AdapterRef("active", active_dir) if active_dir else None
    system = {"role": "system", "content": config.generation.system_prompt}

    contexts = []
    seen = set()
    for p in heldout:
        key = repr(p["prompt"])
        if key not in seen:
            seen.add(key)
            contexts.append(p["prompt"])
    contexts = contexts[:16] + [[{"role": "user", "content": q}] for q in PROBES]
    chats = [[system, *c] for c in contexts]

    def answers(ref):
        out = []
        for i in range(0, len(chats), 8):
            out += engine.generate_batch(chats[i:i + 8], adapters=[ref] * len(chats[i:i + 8]), with_finish=True)
        return out

    def degenerate_share(outs):
        reasons = [degeneration(t, prompt=c[-1]["content"], finished=f) for (t, f), c in zip(outs, contexts)]
        return sum(r is not None for r in reasons) / len(reasons), [r for r in reasons if r]

    cand_out, act_out = answers(cand), answers(act)
    deg_c, why_c = degenerate_share(cand_out)
    deg_a, _ = degenerate_share(act_out)

    with torch.inference_mode():
        # Drift: KL(candidate || base) per token on the candidate's own probe answers.
        kls = []
        for chat, (text, _) in list(zip(chats, cand_out))[-len(PROBES):]:
            if not text.strip():
                continue
            ids, start = _sequence_ids(tokenizer, chat, text)
            engine.activate(cand)
            lp_c, _ = _token_logprobs(engine, ids, start)
            engine.activate(None)
            lp_b, _ = _token_logprobs(engine, ids, start)
            kls.append(float((lp_c.exp() * (lp_c - lp_b)).sum(-1).mean()))
        kl = sum(kls) / len(kls) if kls else 0.0

        # Held-out chosen answers: mean log-likelihood per token, candidate vs active; implicit reward vs base.
        def mean_logp(ref, messages, answer):
            ids, start = _sequence_ids(tokenizer, messages, answer)
            engine.activate(ref)
            lp, tgt = _token_logprobs(engine, ids, start)
            return float(lp.gather(-1, tgt[:, None]).sum()), len(tgt)

        gains, correct, n_pairs = [], 0, 0
        for p in heldout:
            chosen = p.get("chosen") or (p.get("completion") if p.get("label", 1) else None)
            if not chosen:
                continue
            msgs = [system, *p["prompt"]]
            lc_, n = mean_logp(cand, msgs, chosen)
            la_, _ = mean_logp(act, msgs, chosen)
            gains.append((lc_ - la_) / max(n, 1))
            if p.get("rejected"):
                lb_c, _ = mean_logp(None, msgs, chosen)
                lc_r, _ = mean_logp(cand, msgs, p["rejected"])
                lb_r, _ = mean_logp(None, msgs, p["rejected"])
                correct += (lc_ - lb_c) > (lc_r - lb_r)
                n_pairs += 1
    gain = sum(gains) / len(gains) if gains else None

    reasons = []
    if deg_c - deg_a > lc.gate_max_degenerate_increase:
        reasons.append(f"degenerate answers rose from {deg_a:.0%} to {deg_c:.0%} ({', '.join(sorted(set(why_c)))})")
    if kl > lc.gate_max_kl:
        reasons.append(f"drift from the base KL {kl:.2f} > {lc.gate_max_kl}")
    if gain is not None and gain < lc.gate_min_logp_gain:
        reasons.append(f"held-out chosen answers got less likely ({gain:+.3f} nats/token)")
    return {
        "promote": not reasons,
        "reasons": reasons,
        "degenerate_candidate": deg_c,
        "degenerate_active": deg_a,
        "kl_from_base": kl,
        "heldout_logp_gain": gain,
        "heldout_n": len(gains),
        "implicit_reward_accuracy": correct / n_pairs if n_pairs else None,
        "samples": [t for t, _ in cand_out[-3:]],
    }
