"""`heed bench correction-phrasing`: which wording of an in-session correction does the model follow?

A correction ("shorter please") regenerates the answer at once with the
instruction added to the chat (``heed.service.with_correction``). This asks
each shipped persona's held-out prompts again with the persona's own
correction, phrased three ways, on the base model (greedy, the served
generation settings), and counts the answers the persona accepts by its full
check (style, sensible, on topic):

- ``appended``: what the service does (the instruction after the question);
- ``system prompt``: the instruction added to the system prompt;
- ``before the question``: the instruction, then the question.

``--guidance G`` adds the service's phrasing decoded with classifier-free
guidance (Sanchez et al. 2023): each next-token distribution is pushed away
from the one for the chat without the correction, ``G`` times as far as the
correction moves it (transformers' ``guidance_scale`` with the plain chat as
``negative_prompt_ids``; one row at a time, twice the forward passes). It
counts degenerate answers per phrasing too, since guidance that overshoots
makes the model loop, echo the instruction or never end.

    heed bench correction-phrasing [--config FILE] [--prompts 6] [--guidance 1.25 1.5] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PERSONAS = ["brief", "bullets", "asks_back", "in_short", "signs_off"]


def phrasings(system: str) -> dict:
    """name -> (question, instruction) -> chat."""
    from heed.service import with_correction

    def plain(q: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": q}]

    return {
        "appended": lambda q, c: with_correction(plain(q), c),
        "system prompt": lambda q, c: [{"role": "system", "content": f"{system} {c}"}, {"role": "user", "content": q}],
        "before the question": lambda q, c: [{"role": "system", "content": system}, {"role": "user", "content": f"{c}\n\n{q}"}],
    }


def guided(engine, chat: list[dict], plain: list[dict], scale: float) -> tuple[str, bool]:
    """(answer, finished) to ``chat``, decoded with classifier-free guidance against ``plain`` (batch of one)."""
    import torch

    gen = engine.gen_cfg
    ids = torch.tensor([engine.prompt_ids(chat)], device=engine.device)
    negative = torch.tensor([engine.prompt_ids(plain)], device=engine.device)
    with torch.inference_mode():
        out = engine.base.generate(ids, attention_mask=torch.ones_like(ids), guidance_scale=scale, negative_prompt_ids=negative,
                                   **engine._gen_kwargs(gen, gen.max_new_tokens, prompt_width=ids.shape[1]))
    new = out[0, ids.shape[1]:].tolist()
    finished = engine.tokenizer.eos_token_id in new
    return engine.tokenizer.decode(new, skip_special_tokens=True), finished


def measure(config_path: str, *, n_prompts: int, personas: list[str], guidance: tuple[float, ...] = (), batch: int = 40,
            say=print) -> dict:
    from bench.personas import get
    from bench.prompts import split
    from heed.config import load_config
    from heed.engine import Engine, load_base, set_threads
    from heed.models import resolve_model
    from heed.quality import degeneration

    config = load_config(config_path)
    config = load_config(config_path, overrides={"model": {"name_or_path": str(resolve_model(config))}})
    set_threads(config.model.torch_threads or 1)
    model, tokenizer = load_base(config)
    engine = Engine(model, tokenizer, model_cfg=config.model, gen_cfg=replace(config.generation, do_sample=False))
    _, heldout = split(heldout_every=3)
    questions = heldout[:n_prompts]
    ways = phrasings(config.generation.system_prompt)
    jobs = [(way, name, q) for way in ways for name in personas for q in questions]
    chats = [ways[way](q, get(name).correction) for way, name, q in jobs]
    t = time.perf_counter()
    outs: list = []
    for i in range(0, len(chats), batch):
        outs += engine.generate_batch(chats[i:i + batch], with_finish=True)
        say(f"{len(outs)}/{len(chats)} answers ({time.perf_counter() - t:.0f} s)")
    for scale in guidance:
        way = f"appended, guided {scale:g}"
        for name in personas:
            for q in questions:
                plain = [{"role": "system", "content": config.generation.system_prompt}, {"role": "user", "content": q}]
                jobs.append((way, name, q))
                outs.append(guided(engine, ways["appended"](q, get(name).correction), plain, scale))
        say(f"{way}: {len(personas) * len(questions)} answers ({time.perf_counter() - t:.0f} s)")
    names = list(dict.fromkeys(w for w, _, _ in jobs))
    followed: dict = {way: {name: 0 for name in personas} for way in names}
    degenerate: dict = {way: 0 for way in names}
    for (way, name, q), (text, finished) in zip(jobs, outs):
        followed[way][name] += get(name).accepts(text, prompt=q, finished=finished)
        degenerate[way] += degeneration(text, prompt=q, finished=finished) is not None
    table = {way: {name: n / len(questions) for name, n in row.items()} for way, row in followed.items()}
    return {"model": Path(str(config.model.name_or_path)).name, "config_file": config_path, "n_prompts": len(questions),
            "torch_threads": config.model.torch_threads, "followed": table,
            "mean": {way: sum(row.values()) / len(row) for way, row in table.items()},
            "degenerate": {way: n / (len(personas) * len(questions)) for way, n in degenerate.items()},
            "guidance": list(guidance),
            "seconds": round(time.perf_counter() - t, 1),
            "samples": [{"phrasing": w, "persona": n, "prompt": q, "answer": o[0][:300]}
                        for (w, n, q), o in list(zip(jobs, outs))[::max(len(questions), 1)]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench correction-phrasing", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml", help="Heed YAML config (model and generation settings)")
    p.add_argument("--prompts", type=int, default=6, help="held-out prompts per persona")
    p.add_argument("--personas", nargs="+", default=PERSONAS, help="whose corrections and judges (bench/personas.py)")
    p.add_argument("--guidance", type=float, nargs="*", default=[], metavar="G",
                   help="also decode the service's phrasing with classifier-free guidance at these scales (> 1)")
    p.add_argument("--out", default=str(RESULTS / "correction_phrasing.json"))
    args = p.parse_args(argv)
    if args.prompts < 1:
        raise SystemExit("--prompts must be at least 1")
    if any(not 1.0 < g <= 10.0 for g in args.guidance):
        raise SystemExit("--guidance scales must be in (1, 10]: 1 is no guidance")
    from bench.personas import get

    try:
        for name in args.personas:
            get(name)
    except KeyError as exc:
        raise SystemExit(exc.args[0]) from None
    res = measure(args.config, n_prompts=args.prompts, personas=args.personas, guidance=tuple(args.guidance))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1), encoding="utf-8")
    for way, share in res["mean"].items():
        print(f"{way:>24}: followed {share:.0%}, degenerate {res['degenerate'][way]:.0%} ("
              + ", ".join(f"{n} {v:.0%}" for n, v in res["followed"][way].items()) + ")")
    print(f"wrote {out}")
    return 0
