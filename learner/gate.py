"""The promotion gate: judge a candidate adapter by what it generates, against the active one.

Held-out implicit-reward accuracy saturated at 1.00 here even for adapters that
changed nothing (STACK.md), so it is reported but never decides. What decides,
on the user's held-out contexts plus a fixed set of probe prompts:
- degeneration: the share of empty, one-word, echoed or repetitive answers
  (``heed.quality``) may not rise by more than ``gate_max_degenerate_increase``;
- answers that never end (cut at ``gate_max_new_tokens``) may not rise by more
  than ``gate_max_cutoff_increase`` (a looser bound than for degeneration: a
  user who wants longer answers legitimately gets more of them cut at the
  gate's limit, which is shorter than the serving one);
- answers that answer nothing (degenerate, or sound but sharing no content
  word with the question: ``heed.quality.on_topic``) may not rise by more
  than ``gate_max_offtopic_increase``: an adapter can collapse to one generic
  reply (a question back instead of an answer) that no other check reads as broken;
- answers that are one template said to every question (``heed.quality.templated``:
  "To start with the right mindset you should focus on <the topic> before going to
  bed.") may not rise by more than ``gate_max_templated_increase``: the topic check
  passes them whenever the slot holds a word of the question;
- the bounds hold against the base model too (``gate_bounds_from_base``):
  runs that each rise a little against the adapter before them cannot add up
  past a bound;
- drift: per-token KL(candidate || base) on the candidate's probe answers;
- the likelihood of the user's held-out chosen answers, candidate vs active: a
  loose bound (``gate_min_logp_gain``), because DPO lowers held-out chosen
  likelihood a little even while answers improve (likelihood displacement), and a
  user's held-out set is a handful of pairs; it catches a candidate that forgot
  the user's preferences, not one that expresses them in its own words. Where
  held-out pairs give a chosen-vs-rejected margin, a candidate whose margin grew
  (``gate_min_margin_gain``) kept the preference and is not refused for it.

The gate answers a fixed number of contexts (``gate_answers``): the user's
held-out ones first, probe prompts for the rest, so it costs the same for a
user with 5 held-out answers or 500. What the active adapter and the base model
answered and scored in earlier runs is reused (``learner.gate_cache``): a run
generates and scores only what is new since.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from heed.config import HeedConfig, LearnerConfig
from heed.quality import degeneration, on_topic, templated

from . import gate_cache
from .probes import probe_prompts

log = logging.getLogger(__name__)

def judged_contexts(heldout: list[dict], *, max_heldout: int, total: int, probes: str = "factual") -> tuple[list[list[dict]], int]:
    """(contexts, how many of them are the user's): held-out contexts first, prompts of the ``probes`` set to ``total``."""
    own = _unique_prompts(heldout, min(max_heldout, total))
    probes = [[{"role": "user", "content": q}] for q in probe_prompts(probes)[:max(total - len(own), 0)]]
    return own + probes, len(own)


def sequence_ids(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    """Token ids of the chat plus ``answer`` as the assistant's turn, and where the answer starts."""
    from .rows import _ids

    prompt = _ids(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
    full = list(full["input_ids"] if isinstance(full, dict) else full)
    if full[:len(prompt)] != prompt:
        # Templates that rewrite earlier turns: fall back to plain concatenation.
        full = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return full, len(prompt)


def total_log_probs(engine, ref, sequences: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """(log-likelihood, token count) of each (ids, answer start) under adapter ``ref`` (None: the base model)."""
    from .packing import answer_log_probs

    engine.activate(ref)
    return [(float(lp.sum()), len(lp)) for lp in answer_log_probs(engine.base, sequences)]


def _scores(engine, ref, sequences: list, known: dict) -> tuple[dict, dict]:
    """({sequence key: (log-likelihood, tokens)} for ``sequences`` under ``ref``, those of them not in ``known``)."""
    by_key = dict(zip(map(gate_cache.sequence_key, sequences), sequences))
    todo = [k for k in by_key if k not in known]
    new = dict(zip(todo, total_log_probs(engine, ref, [by_key[k] for k in todo]))) if todo else {}
    return {k: tuple(new[k] if k in new else known[k]) for k in by_key}, new


def heldout_likelihood(engine, tokenizer, system: dict, heldout: list[dict], *, candidate, active, known: dict | None = None) -> dict:
    """The held-out examples' chosen answers under the candidate against the active adapter (None: the base).

    ``gains``: log-likelihood per token, candidate minus active, one per example
    with a good answer; ``margins``: the chosen-vs-rejected margin per token,
    candidate minus active, one per pair; ``correct``: pairs whose implicit reward
    (the candidate against the base) ranks the chosen answer first. ``known``:
    scores computed before, by role ('candidate', 'active', 'base'), reused;
    ``scored``: by role, those this call computed.
    """
    known = known or {}
    examples = []
    for p in heldout:
        chosen = p.get("chosen") or (p.get("completion") if p.get("label", 1) else None)
        if chosen:
            msgs = [system, *p["prompt"]]
            examples.append((sequence_ids(tokenizer, msgs, chosen), sequence_ids(tokenizer, msgs, p["rejected"]) if p.get("rejected") else None))
    seqs = [s for pair in examples for s in pair if s is not None]
    paired = [s for _, s in examples if s is not None] + [c for c, r in examples if r is not None]
    score, scored = {}, {}
    score["candidate"], scored["candidate"] = _scores(engine, candidate, seqs, known.get("candidate", {}))
    if active is None:
        # With the base model active, its scores are the active ones: one forward pass less per answer.
        score["active"], scored["active"] = _scores(engine, None, seqs, known.get("base", {}))
        score["base"], scored["base"] = score["active"], scored["active"]
    else:
        score["active"], scored["active"] = _scores(engine, active, seqs, known.get("active", {}))
        score["base"], scored["base"] = _scores(engine, None, paired, known.get("base", {}))
    engine.activate(None)
    key = gate_cache.sequence_key
    gains, margins, correct = [], [], 0
    for chosen, rejected in examples:
        (lc_c, n), (lc_a, _) = score["candidate"][key(chosen)], score["active"][key(chosen)]
        n = max(n, 1)
        gains.append((lc_c - lc_a) / n)
        if rejected is None:
            continue
        (lr_c, k), (lr_a, _) = score["candidate"][key(rejected)], score["active"][key(rejected)]
        k = max(k, 1)
        margins.append((lc_c / n - lr_c / k) - (lc_a / n - lr_a / k))
        (lb_c, _), (lb_r, _) = score["base"][key(chosen)], score["base"][key(rejected)]
        correct += (lc_c - lb_c) > (lr_c - lb_r)
    return {"gains": gains, "margins": margins, "correct": correct, "scores": score, "scored": scored}


def _chunks(sequences: list, *, max_tokens: int) -> list[list]:
    """Consecutive runs of ``sequences`` of at most ``max_tokens`` tokens (a longer one alone)."""
    out: list[list] = []
    size = 0
    for seq in sequences:
        if not out or size + len(seq[0]) > max_tokens:
            out.append([])
            size = 0
        out[-1].append(seq)
        size += len(seq[0])
    return out


def _unique_prompts(heldout: list[dict], limit: int) -> list[list[dict]]:
    seen, out = set(), []
    for p in heldout:
        key = repr(p["prompt"])
        if key not in seen and len(out) < limit:
            seen.add(key)
            out.append(p["prompt"])
    return out


def _judge(outs: list[tuple[str, bool]], contexts: list[list[dict]]) -> tuple[tuple[float, float, float, float], list[str]]:
    """((degenerate, cut-off, off-topic, templated shares), reasons) of a set of answers; each answer counts under one
    of the first three shares; templated counts sound answers only (a broken one is counted as broken already)."""
    reasons, cut, off, sound = [], 0, 0, []
    template = templated([text for text, _ in outs])
    for (text, finished), ctx, same in zip(outs, contexts, template):
        why = degeneration(text, prompt=ctx[-1]["content"], finished=True)
        if why:
            reasons.append(why)
            continue
        sound.append(same)
        if not finished:
            cut += 1
        elif not on_topic(text, ctx[-1]["content"]):
            off += 1
    n = max(len(outs), 1)
    return (len(reasons) / n, cut / n, off / n, sum(sound) / n), reasons


def share_refusals(*, candidate: tuple, active: tuple, base: tuple | None, n: int, why: list[str], config: LearnerConfig) -> list[str]:
    """Why the candidate's (degenerate, cut-off[, off-topic[, templated]]) answer shares refuse it: a rise from the active adapter's, else the base's.

    ``base`` None: the active adapter is the base model (or the bounds from the base are off).
    """
    olds = [(active, "")] + ([(base, " the base model's")] if base is not None else [])

    def share(v: tuple, i: int) -> float:
        # Index 2 bounds the answers that answer nothing: degenerate or off topic. A sound answer about something
        # else is no worse than a broken one (the tiny test model's blank lines turned into sentences).
        return v[0] + v[2] if i == 2 else v[i]

    def rose(i: int, old: tuple, bound: float) -> bool:
        # A share and a count: with a couple of dozen answers one odd answer is noise, a rising share is not.
        rise = share(candidate, i) - share(old, i)
        return rise > bound and round(rise * n) >= config.gate_min_degenerate_answers

    checks = [(0, config.gate_max_degenerate_increase, f"degenerate answers rose from{{}} {{:.0%}} to {candidate[0]:.0%} ({', '.join(sorted(set(why)))})"),
              (1, config.gate_max_cutoff_increase, f"answers that never end rose from{{}} {{:.0%}} to {candidate[1]:.0%}")]
    if len(candidate) > 2:
        checks.append((2, config.gate_max_offtopic_increase,
                       f"answers that answer nothing (degenerate or off the question's topic) rose from{{}} {{:.0%}} to {share(candidate, 2):.0%}"))
    if len(candidate) > 3:
        checks.append((3, config.gate_max_templated_increase,
                       f"answers that are one template said to every question rose from{{}} {{:.0%}} to {candidate[3]:.0%}"))
    reasons = []
    for i, bound, text in checks:
        for old, name in olds:
            if rose(i, old, bound):
                reasons.append(text.format(name, share(old, i)))
                break
    return reasons


def likelihood_refusal(gain: float | None, n_gain: int, margin: float | None, n_margin: int, *,
                       config: LearnerConfig) -> str | None:
    """Why the held-out likelihood refuses a candidate, or None.

    Lost chosen likelihood alone is displacement as often as forgetting: DPO
    shortening answers lowers the chosen answer's likelihood while the
    rejected one's falls further. Forgetting the user's preferences lowers the
    margin too, so when the held-out pairs give a margin, the bound refuses
    only if that margin did not grow either. Measured in the second benchmark
    draw: brief's candidates at -0.906 and -0.536 nats/token, margins +0.007
    and +0.064, were refused, and would have answered 66% and 62% accepted (0%
    degenerate) against the 44% of the adapter the user kept
    (bench/results/gate_audit_seed1.json).
    """
    if gain is None or n_gain < config.gate_min_heldout or gain >= config.gate_min_logp_gain:
        return None
    why = f"held-out chosen answers got less likely ({gain:+.3f} nats/token)"
    if margin is None or n_margin < config.gate_min_heldout:
        return why
    if margin > config.gate_min_margin_gain:
        return None
    return f"{why} and their margin over the rejected answers did not grow ({margin:+.3f})"


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

    from heed.adapter_slots import serving_mode
    from heed.engine import AdapterRef, Engine, load_base

    from .packing import answer_log_probs
    from .train import quiet_progress_bars

    lc = config.learner
    quiet_progress_bars()
    # In the serving dtype, not the learner's: the gate judges what users will be answered (on the embedded model,
    # bf16 answers ran past the token limit twice as often as fp32 ones: heed bench dtype).
    model, tokenizer = model_and_tokenizer or load_base(config)
    gen = replace(config.generation, do_sample=False, max_new_tokens=lc.gate_max_new_tokens)
    p = next(model.parameters())
    # The gate switches between candidate and active at every step: hybrid serving would only add spare
    # weight copies to the learner's memory.
    serving = "unmerged" if serving_mode(config.model, p.device.type, p.dtype) == "hybrid" else config.model.adapter_serving
    engine = Engine(model, tokenizer, model_cfg=replace(config.model, max_cached_adapters=4, adapter_serving=serving), gen_cfg=gen)
    cand = AdapterRef("candidate", candidate_dir)
    act = AdapterRef("active", active_dir) if active_dir else None
    system = {"role": "system", "content": config.generation.system_prompt}

    contexts, n_own = judged_contexts(heldout, max_heldout=lc.gate_max_contexts, total=lc.gate_answers, probes=lc.gate_probes)
    chats = [[system, *c] for c in contexts]
    keys = [gate_cache.context_key(c) for c in chats]
    settings = gate_cache.answers_key(config)
    act_file = Path(active_dir) / gate_cache.ANSWERS_FILE if active_dir else config.adapters_path / gate_cache.BASE_ANSWERS_FILE
    act_known = gate_cache.read(act_file, settings)
    act_missing = [i for i, k in enumerate(keys) if k not in act_known]
    # The base model's answers for the bounds from the base: the active adapter's when it is the base; else the
    # shared file's, generating only contexts no earlier run answered with the base (a user's newer held-out ones).
    base_file = config.adapters_path / gate_cache.BASE_ANSWERS_FILE
    from_base = lc.gate_bounds_from_base and active_dir is not None
    base_known = gate_cache.read(base_file, settings) if from_base else {}
    base_missing = [i for i, k in enumerate(keys) if k not in base_known] if from_base else []
    if progress:
        progress("gate", 0.05)
    # One generate call for the candidate's answers and the active adapter's missing ones (rows with different
    # adapters share a batch): on a CPU a small model's decode step for 48 rows costs about twice one for 8, not six
    # times (reading the weights dominates). Measured on the embedded model (no adapter, 48 tokens, one thread): 48 answers took
    # 84 s in batches of 8, 30 s in one.
    t0 = time.perf_counter()
    todo = [(cand, i) for i in range(len(chats))] + [(act, i) for i in act_missing] + [(None, i) for i in base_missing]
    got = engine.generate_batch([chats[i] for _, i in todo], adapters=[ref for ref, _ in todo], with_finish=True)
    cand_out = got[:len(chats)]
    act_new = dict(zip(act_missing, got[len(chats):len(chats) + len(act_missing)]))
    base_new = dict(zip(base_missing, got[len(chats) + len(act_missing):]))
    if progress:
        progress("gate", 0.9)
    act_out = [act_new[i] if i in act_new else tuple(act_known[keys[i]]) for i in range(len(chats))]
    gate_cache.write(Path(candidate_dir) / gate_cache.ANSWERS_FILE, settings, dict(zip(keys, map(list, cand_out))))
    if not active_dir:
        gate_cache.add_to_base(act_file, settings, act_known, {keys[i]: list(a) for i, a in act_new.items()})
    elif base_new:
        gate_cache.add_to_base(base_file, settings, base_known, {keys[i]: list(a) for i, a in base_new.items()})
    timings = {"generate_s": time.perf_counter() - t0}
    shares_c, why_c = _judge(cand_out, contexts)
    shares_a, _ = _judge(act_out, contexts)
    base_out = [base_new[i] if i in base_new else tuple(base_known[keys[i]]) for i in range(len(chats))] if from_base else act_out
    shares_b, _ = _judge(base_out, contexts)

    t1 = time.perf_counter()
    with torch.inference_mode():
        # Drift: KL(candidate || base) per token on the candidate's own probe answers.
        probes = [sequence_ids(tokenizer, chat, text) for chat, (text, _) in list(zip(chats, cand_out))[n_own:] if text.strip()]
        kls = []
        # In chunks: full log-softmax rows (answer tokens x vocabulary) under both models are kept until compared.
        for chunk in _chunks(probes, max_tokens=1024):
            engine.activate(cand)
            lp_c = answer_log_probs(engine.base, chunk, full=True)
            engine.activate(None)
            lp_b = answer_log_probs(engine.base, chunk, full=True)
            kls += [float((c.exp() * (c - b)).sum(-1).mean()) for c, b in zip(lp_c, lp_b) if len(c)]
        kl = sum(kls) / len(kls) if kls else 0.0
        timings["kl_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        # Held-out chosen answers: log-likelihood per token, candidate vs active; the chosen-vs-rejected margin
        # per token, candidate vs active; implicit reward vs the base.
        skey = gate_cache.scores_key(config)
        base_file = config.adapters_path / gate_cache.BASE_SCORES_FILE
        known = {"base": gate_cache.read(base_file, skey),
                 "active": gate_cache.read(Path(active_dir) / gate_cache.SCORES_FILE, skey) if active_dir else {}}
        held = heldout_likelihood(engine, tokenizer, system, heldout, candidate=cand, active=act, known=known)
        gains, margins, correct = held["gains"], held["margins"], held["correct"]
        gate_cache.write(Path(candidate_dir) / gate_cache.SCORES_FILE, skey, {k: list(v) for k, v in held["scores"]["candidate"].items()})
        gate_cache.add_to_base(base_file, skey, known["base"], {k: list(v) for k, v in held["scored"]["base"].items()})
        timings["likelihood_s"] = time.perf_counter() - t2
    gain = sum(gains) / len(gains) if gains else None
    margin = sum(margins) / len(margins) if margins else None

    reasons = share_refusals(candidate=shares_c, active=shares_a, base=shares_b if from_base else None,
                             n=len(contexts), why=why_c, config=lc)
    if kl > lc.gate_max_kl:
        reasons.append(f"drift from the base KL {kl:.2f} > {lc.gate_max_kl}")
    why = likelihood_refusal(gain, len(gains), margin, len(margins), config=lc)
    if why:
        reasons.append(why)
    if progress:
        progress("gate", 1.0)

    def words(outs):
        return sum(len(t.split()) for t, _ in outs) / max(len(outs), 1)

    return {
        "promote": not reasons,
        "reasons": reasons,
        "n_contexts": len(contexts),
        "n_heldout_contexts": n_own,
        "active_answers_generated": len(act_new),
        "base_answers_generated": len(base_new),
        "heldout_scored": {role: len(v) for role, v in held["scored"].items()},
        **{f"{share}_{who}": v[i] for share, i in (("degenerate", 0), ("cutoff", 1), ("offtopic", 2), ("templated", 3))
           for who, v in (("candidate", shares_c), ("active", shares_a), ("base", shares_b))},
        "mean_words_candidate": words(cand_out),
        "mean_words_active": words(act_out),
        "kl_from_base": kl,
        "heldout_logp_gain": gain,
        "heldout_n": len(gains),
        "heldout_margin_gain": margin,
        "heldout_margin_n": len(margins),
        "implicit_reward_accuracy": correct / len(margins) if margins else None,
        "timings": timings,
        "samples": [{"prompt": c[-1]["content"], "candidate": t, "active": a}
                    for c, (t, _), (a, _) in list(zip(contexts, cand_out, act_out))[-3:]],
    }
