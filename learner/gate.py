"""The promotion gate: judge a candidate adapter by what it generates, against the active one.

Held-out implicit-reward accuracy saturated at 1.00 here even for adapters that
changed nothing (STACK.md), so it is reported but never decides. What decides,
on the user's held-out contexts plus a fixed set of probe prompts:
- degeneration: the share of empty, one-word, echoed or repetitive answers
  (``heed.quality``) may not rise by more than ``gate_max_degenerate_increase``;
- answers that never end (cut at ``gate_max_new_tokens``) may not rise by more
  than ``gate_max_cutoff_increase`` (a looser bound: a user who wants longer
  answers legitimately gets more of them cut at the gate's short limit);
- drift: per-token KL(candidate || base) on the candidate's probe answers;
- the likelihood of the user's held-out chosen answers, candidate vs active: a
  loose bound (``gate_min_logp_gain``), because DPO lowers held-out chosen
  likelihood a little even while answers improve (likelihood displacement), and a
  user's held-out set is a handful of pairs; it catches a candidate that forgot
  the user's preferences, not one that expresses them in its own words.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

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
    "What is photosynthesis?",
    "How can I make my tea less bitter?",
    "Why do we have seasons?",
    "What is a good way to remember a shopping list?",
    "How long should I rest between workouts?",
    "What does a librarian do?",
    "How do I say thank you to a neighbour who helped me?",
    "Why does the moon change shape?",
]


def sequence_ids(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    """Token ids of the chat plus ``answer`` as the assistant's turn, and where the answer starts."""
    from .train import _ids

    prompt = _ids(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
    full = list(full["input_ids"] if isinstance(full, dict) else full)
    if full[:len(prompt)] != prompt:
        # Templates that rewrite earlier turns: fall back to plain concatenation.
        full = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return full, len(prompt)


def _token_logprobs(model, device, ids: list[int], start: int):
    import torch

    x = torch.tensor([ids], device=device)
    logits = model(input_ids=x).logits[0, start - 1:-1].float()
    return torch.log_softmax(logits, dim=-1), x[0, start:]


def _unique_prompts(heldout: list[dict], limit: int) -> list[list[dict]]:
    seen, out = set(), []
    for p in heldout:
        key = repr(p["prompt"])
        if key not in seen and len(out) < limit:
            seen.add(key)
            out.append(p["prompt"])
    return out


def _judge(outs: list[tuple[str, bool]], contexts: list[list[dict]]) -> tuple[float, float, list[str]]:
    """(degenerate share, cut-off share, reasons) of a set of answers."""
    reasons, cut = [], 0
    for (text, finished), ctx in zip(outs, contexts):
        why = degeneration(text, prompt=ctx[-1]["content"], finished=True)
        if why:
            reasons.append(why)
        elif not finished:
            cut += 1
    n = max(len(outs), 1)
    return len(reasons) / n, cut / n, reasons


def evaluate(config: HeedConfig, **kw) -> dict:
    """Gate figures for the candidate and the verdict: {'promote': bool, 'reasons': [...], ...}.

    Keywords: ``candidate_dir``, ``active_dir`` (None: the base model),
    ``heldout`` (the user's held-out examples), optionally ``progress``.
    """
    from .train import library_noise_muted

    with library_noise_muted():
        return _evaluate(config, **kw)


def _evaluate(config: HeedConfig, *, candidate_dir: str, active_dir: str | None, heldout: list[dict],
              progress: Callable[[str, float], None] | None = None, model_and_tokenizer=None) -> dict:
    import torch

    from heed.engine import AdapterRef, Engine, load_base

    from .train import quiet_progress_bars

    lc = config.learner
    quiet_progress_bars()
    model, tokenizer = model_and_tokenizer or load_base(config)
    gen = replace(config.generation, do_sample=False, max_new_tokens=lc.gate_max_new_tokens)
    engine = Engine(model, tokenizer, model_cfg=replace(config.model, max_cached_adapters=4), gen_cfg=gen)
    cand = AdapterRef("candidate", candidate_dir)
    act = AdapterRef("active", active_dir) if active_dir else None
    system = {"role": "system", "content": config.generation.system_prompt}

    contexts = _unique_prompts(heldout, lc.gate_max_contexts) + [[{"role": "user", "content": q}] for q in PROBES]
    chats = [[system, *c] for c in contexts]
    batches = [chats[i:i + 8] for i in range(0, len(chats), 8)]
    done = [0]

    def answers(ref):
        out = []
        for b in batches:
            out += engine.generate_batch(b, adapters=[ref] * len(b), with_finish=True)
            done[0] += 1
            if progress:
                progress("gate", 0.9 * done[0] / (2 * len(batches)))
        return out

    cand_out, act_out = answers(cand), answers(act)
    deg_c, cut_c, why_c = _judge(cand_out, contexts)
    deg_a, cut_a, _ = _judge(act_out, contexts)

    with torch.inference_mode():
        # Drift: KL(candidate || base) per token on the candidate's own probe answers.
        kls = []
        for chat, (text, _) in list(zip(chats, cand_out))[-len(PROBES):]:
            if not text.strip():
                continue
            ids, start = sequence_ids(tokenizer, chat, text)
            engine.activate(cand)
            lp_c, _ = _token_logprobs(engine.base, engine.device, ids, start)
            engine.activate(None)
            lp_b, _ = _token_logprobs(engine.base, engine.device, ids, start)
            kls.append(float((lp_c.exp() * (lp_c - lp_b)).sum(-1).mean()))
        kl = sum(kls) / len(kls) if kls else 0.0

        def logp(ref, messages, answer):
            ids, start = sequence_ids(tokenizer, messages, answer)
            engine.activate(ref)
            lp, tgt = _token_logprobs(engine.base, engine.device, ids, start)
            return float(lp.gather(-1, tgt[:, None]).sum()), len(tgt)

        # Held-out chosen answers: log-likelihood per token, candidate vs active; implicit reward vs the base.
        gains, correct, n_pairs = [], 0, 0
        for p in heldout:
            chosen = p.get("chosen") or (p.get("completion") if p.get("label", 1) else None)
            if not chosen:
                continue
            msgs = [system, *p["prompt"]]
            lc_c, n = logp(cand, msgs, chosen)
            lc_a, _ = logp(act, msgs, chosen)
            gains.append((lc_c - lc_a) / max(n, 1))
            if p.get("rejected"):
                lb_c, _ = logp(None, msgs, chosen)
                lr_c, _ = logp(cand, msgs, p["rejected"])
                lr_b, _ = logp(None, msgs, p["rejected"])
                correct += (lc_c - lb_c) > (lr_c - lr_b)
                n_pairs += 1
        engine.activate(None)
    gain = sum(gains) / len(gains) if gains else None

    reasons = []
    n = len(contexts)
    # A share and a count: with a couple of dozen answers one odd answer is noise, a rising share is not.
    if deg_c - deg_a > lc.gate_max_degenerate_increase and round((deg_c - deg_a) * n) >= lc.gate_min_degenerate_answers:
        reasons.append(f"degenerate answers rose from {deg_a:.0%} to {deg_c:.0%} ({', '.join(sorted(set(why_c)))})")
    if cut_c - cut_a > lc.gate_max_cutoff_increase:
        reasons.append(f"answers that never end rose from {cut_a:.0%} to {cut_c:.0%}")
    if kl > lc.gate_max_kl:
        reasons.append(f"drift from the base KL {kl:.2f} > {lc.gate_max_kl}")
    if gain is not None and len(gains) >= lc.gate_min_heldout and gain < lc.gate_min_logp_gain:
        reasons.append(f"held-out chosen answers got less likely ({gain:+.3f} nats/token)")
    if progress:
        progress("gate", 1.0)

    def words(outs):
        return sum(len(t.split()) for t, _ in outs) / max(len(outs), 1)

    return {
        "promote": not reasons,
        "reasons": reasons,
        "n_contexts": len(contexts),
        "degenerate_candidate": deg_c,
        "degenerate_active": deg_a,
        "cutoff_candidate": cut_c,
        "cutoff_active": cut_a,
        "mean_words_candidate": words(cand_out),
        "mean_words_active": words(act_out),
        "kl_from_base": kl,
        "heldout_logp_gain": gain,
        "heldout_n": len(gains),
        "implicit_reward_accuracy": correct / n_pairs if n_pairs else None,
        "samples": [{"prompt": c[-1]["content"], "candidate": t, "active": a}
                    for c, (t, _), (a, _) in list(zip(contexts, cand_out, act_out))[-3:]],
    }
