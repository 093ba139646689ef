"""`heed bench personalize --quick`: the benchmark's machinery on the tiny model, end to end.

The tiny model's trivially learnable persona (answers exactly "Thanks for
asking.") must go from never accepted to accepted: if the feedback -> pairs ->
training -> gate -> promotion -> serving loop breaks anywhere, this fails.
"""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench.cli import main

    root = tmp_path_factory.mktemp("bench")
    out = root / "results" / "personalize.json"
    assert main(["personalize", "--quick", "--data-dir", str(root / "data"), "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_quick_run_writes_the_result_keys_other_tools_read(quick):
    res, out = quick
    assert isinstance(res["model"], str) and res["seconds"] > 0
    assert res["finished"] and not (out.parent / "personalize.partial.json").exists()
    for name, p in res["personas"].items():
        assert set(p) >= {"base", "curve", "degenerate", "others_max_delta"}
        assert set(p["curve"]) == {"0", "4", "8", "16", "32"}
        for v in [p["base"], p["degenerate"], p["others_max_delta"], *p["curve"].values()]:
            assert 0.0 <= v <= 1.0
    for suffix in ("_curve.png", "_alignment.png", "_isolation.png", "_kinds.png"):
        assert (out.parent / f"personalize{suffix}").stat().st_size > 1000
    md = (out.parent / "personalize.md").read_text()
    assert "Isolation" in md and "heed.quality.degeneration" in md and "| 95% interval @" in md and "| one template @" in md
    assert res["command"] == f"heed bench personalize --quick --out {out}" and f"`{res['command']}`" in md


def test_every_judged_answer_is_kept_with_its_verdict(quick):
    res, out = quick
    records = [json.loads(line) for line in (out.parent / "personalize_answers.jsonl").read_text().splitlines()]
    n = res["n_heldout_prompts"]
    assert sum(r["track"] == "base" for r in records) == n
    for key, track in res["tracks"].items():
        for point in track["points"][1:]:
            mine = [r for r in records if r["track"] == key and r["checkpoint"] == point["checkpoint"]]
            assert len(mine) == n and {r["events"] for r in mine} == {point["events"]}
            assert sum(r["accepted"] for r in mine) / n == pytest.approx(point["accept"][track["persona"]])
            assert sum(r["degenerate"] is not None for r in mine) / n == pytest.approx(point["degenerate"])
            assert 0.0 <= point["templated"] <= 1.0
            if point["learn"]["status"] in ("promoted", "rejected"):
                assert {"gate_templated", "gate_templated_active", "gate_templated_base"} <= set(point["learn"])


def test_each_refused_answer_counts_once_under_the_first_check_it_fails():
    from bench.refusals import first_failure, refusals_md

    def rec(**kw):
        return {"track": "brief/all", "checkpoint": 16, "prompt": "How do I organise my wardrobe?", "answer": "Sort your closet.",
                "degenerate": None, "style": True, "on_topic": True, "accepted": False, **kw}

    assert first_failure(rec(accepted=True)) is None
    assert first_failure(rec(degenerate="cut_off", style=False, on_topic=False)) == "cut off"
    assert first_failure(rec(degenerate="repetitive", style=False)) == "other degenerate"
    assert first_failure(rec(style=False, on_topic=False)) == "not in the persona's style"
    assert first_failure(rec(on_topic=False)) == "off topic"
    with pytest.raises(ValueError, match="passed every check"):
        first_failure(rec())
    page = refusals_md([rec(accepted=True), rec(on_topic=False), rec(checkpoint=8, accepted=True)], checkpoint=16, title="Draw 0")
    assert "| brief/all | 2 | 1 | 0 | 0 | 0 | 1 |" in page and "“How do I organise my wardrobe?” → “Sort your closet.”" in page


def test_the_report_says_why_answers_were_refused_from_the_answer_log(quick):
    from bench.report_cli import render

    res, out = quick
    page = render(out.parent)
    assert "### Why answers were not accepted" in page
    target = res["bench"]["target_events"]
    at_target = [(key, p, t["persona"]) for key, t in res["tracks"].items() for p in t["points"][1:] if p["checkpoint"] == target]
    assert at_target
    for key, point, persona in at_target:
        accepted = round(point["accept"][persona] * res["n_heldout_prompts"])
        assert f"| {key} | {res['n_heldout_prompts']} | {accepted} |" in page


def test_a_trivially_learnable_persona_learns_through_the_service(quick):
    res, _ = quick
    p = res["personas"]["says_thanks"]
    assert p["base"] == 0.0
    assert p["final"]["accept"] >= 0.5, f"acceptance never rose: {p['curve']} (learner: {p['learner_status']})"
    assert max(p["curve"].values()) > p["base"]
    # Every event went through the service: edits, thumbs and picks were recorded as feedback.
    assert sum(p["events_by_kind"].values()) == 32


def test_learning_stays_with_its_user(quick):
    res, _ = quick
    for name, p in res["personas"].items():
        assert p["others_max_delta"] <= 0.05, f"{name}'s adapter moved other judges: {p['others_delta']}"
    assert res["observer"]["all_identical"], "a user without feedback got different answers after others learned"


def test_single_kind_tracks_ran_for_each_kind(quick):
    res, _ = quick
    assert set(res["kinds"]["says_thanks"]) == {"all", "edit", "correction", "thumbs"}
    edits = res["tracks"]["says_thanks/edit"]["points"][-1]
    assert edits["events_by_kind"]["edit"] == edits["events"] > 0


def test_the_report_puts_a_separate_by_kind_run_beside_the_full_one(quick, tmp_path):
    from bench.report_cli import render

    res, _ = quick
    full = {**res, "kinds": {}, "skipped": {f"{n}/{k}": "stopped: time budget" for n in res["kinds"] for k in res["kinds"][n]}}
    (tmp_path / "personalize.json").write_text(json.dumps(full))
    (tmp_path / "personalize_kinds.json").write_text(json.dumps({"kinds": res["kinds"]}))
    page = render(tmp_path)
    assert "By feedback kind" in page and "bench/kinds.yaml" in page
    assert "Not measured in this run" not in page, "the by-kind run fills the skipped tracks"
    assert (tmp_path / "personalize_kinds.png").stat().st_size > 1000
    assert "another learner recipe" not in page, "no recipe recorded: nothing to warn about"


def test_the_report_says_when_the_by_kind_run_used_another_recipe(quick, tmp_path):
    from bench.report_cli import render

    res, _ = quick
    ours = res["learner_config"]
    older = {**ours, "learning_rate": ours["learning_rate"] * 10, "epochs": ours["epochs"] + 5}
    (tmp_path / "personalize.json").write_text(json.dumps({**res, "kinds": {}}))
    (tmp_path / "personalize_kinds.json").write_text(json.dumps({"kinds": res["kinds"], "learner_config": older}))
    page = render(tmp_path)
    assert "another learner recipe" in page
    assert f"learning_rate {older['learning_rate']!r} (above: {ours['learning_rate']!r})" in page
    assert f"epochs {older['epochs']!r} (above: {ours['epochs']!r})" in page


def test_the_gate_audit_replays_every_adapter_version_of_a_kept_run(quick):
    from bench.gate_audit import audit

    res, out = quick
    data = out.parent.parent / "data" / "run"
    report = audit("configs/tiny.yaml", data, quick=True, everything=True, say=lambda _: None)
    versions = {(r["user"], r["version"]) for r in report["rows"]}
    trained = {t for t, rec in res["tracks"].items() if any((p.get("learn") or {}).get("version") for p in rec["points"])}
    assert {u.replace("-", "/") for u, _ in versions} == trained
    for r in report["rows"]:
        assert 0.0 <= r["accept"] <= 1.0 and 0.0 <= r["degenerate"] <= 1.0
        assert r["status"] in ("active", "retired", "rejected", "deleted")


def test_the_gate_shares_a_run_records_replay_to_the_gates_own_decisions(quick):
    from bench.gate_bounds import replay

    res, _ = quick
    bound = res["learner_config"]["gate_max_offtopic_increase"]
    decisions = [d for row in replay(res, bound).values() for d in row["decisions"]]
    promoted = sum((p.get("learn") or {}).get("status") == "promoted" for t in res["tracks"].values() for p in t["points"])
    assert promoted and len(decisions) == promoted
    assert not any(d["refused"] for d in decisions)  # what the gate promoted, its rule on the recorded shares promotes


def test_a_rejudged_run_reproduces_its_own_figures_and_judges_another_decoding(quick, tmp_path):
    from bench.rejudge import compare_md, rejudge, run_mismatches, served_at_checkpoints

    res, out = quick
    other = tmp_path / "spared.yaml"
    # The tiny model's base repeats one token with a wide margin: only a strong penalty moves it.
    other.write_text("generation:\n  max_new_tokens: 16\n  repetition_penalty: 3.0\n  penalty_counts_prompt: false\n")
    report = rejudge(out.parent.parent / "data", [None, str(other)], quick=True, say=lambda _: None)
    served = served_at_checkpoints(res)
    assert served, "the quick run promoted adapters to replay"
    replayed = {(r["user"], r["version"]) for r in report["rows"] if r["config"] == "preset"}
    assert set(served) <= replayed and ("base", 0) in replayed
    assert run_mismatches(report, res) == []
    assert {r["config"] for r in report["rows"]} == {"preset", str(other)}
    assert report["generation"][str(other)]["penalty_counts_prompt"] is False
    said = {(r["config"], r["user"], r["version"]): [a["answer"] for a in r["answers"]] for r in report["rows"]}
    assert any(said[("preset", u, v)] != said[(str(other), u, v)] for _, u, v in said), "the variant decoded otherwise"
    wrong = {**report, "rows": [{**r, "accept": 1.0 - r["accept"]} if r["persona"] else r for r in report["rows"]]}
    assert run_mismatches(wrong, res), "a replay that differs from the run is reported"
    assert "base (best judge)" in compare_md(report, res)


def test_a_persona_run_alone_takes_the_path_it_took_beside_the_others(quick, tmp_path):
    """Runs reproduce: users chat at once, regenerate samples, yet every shared point is identical, and a
    persona run alone gets the user id it had in the full run (ids seed regenerated answers and the split)."""
    from bench.cli import main

    first, _ = quick
    cfg = tmp_path / "short.yaml"
    cfg.write_text("personas: [says_hello]\ncheckpoints: [4, 8]\nkind_personas: []\n")  # the second user alone
    out = tmp_path / "personalize.json"
    assert main(["personalize", "--quick", "--bench-config", str(cfg), "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    second = json.loads(out.read_text())

    def shared(res, key):
        return [{**{k: v for k, v in p.items() if not k.endswith("seconds") and k not in ("learn", "accept", "style_only")},
                 "learn": {k: v for k, v in (p.get("learn") or {}).items() if k != "seconds"},
                 "accept": p["accept"]["says_hello"], "style_only": p["style_only"]["says_hello"]}
                for p in res["tracks"][key]["points"] if p["events"] <= 8]

    assert list(second["tracks"]) == ["says_hello/all"]
    assert len(shared(second, "says_hello/all")) == 3
    assert shared(second, "says_hello/all") == shared(first, "says_hello/all")
    assert second["tracks"]["says_hello/all"]["points"][-1]["events_by_kind"]["comparison"], \
        "the user never picked between two sampled answers: the check would not cover regenerate"


def test_a_run_that_dies_midway_leaves_the_last_finished_result_in_place(tmp_path, monkeypatch):
    from bench import personalize
    from bench.cli import main

    out = tmp_path / "results" / "personalize.json"
    out.parent.mkdir(parents=True)
    out.write_text('{"finished": true, "from": "the last full run"}')
    answers = out.parent / "personalize_answers.jsonl"
    answers.write_text('{"track": "base", "from": "the last full run"}\n')

    def dies(self):
        raise RuntimeError("killed after the base measurement")

    monkeypatch.setattr(personalize.Run, "learn_all", dies)
    with pytest.raises(RuntimeError, match="killed"):
        main(["personalize", "--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert json.loads(out.read_text())["from"] == "the last full run"
    assert json.loads(answers.read_text())["from"] == "the last full run"
    partial = json.loads((out.parent / "personalize.partial.json").read_text())
    assert partial["finished"] is False and partial["base"]["accept"]
    assert len((out.parent / "personalize_answers.partial.jsonl").read_text().splitlines()) == partial["n_heldout_prompts"]


def test_the_report_sets_another_draw_of_the_users_beside_the_main_run(quick, tmp_path):
    from bench.report_cli import render

    res, _ = quick
    other = json.loads(json.dumps(res))
    other["bench"]["seed"] = res["bench"]["seed"] + 1
    (tmp_path / "personalize.json").write_text(json.dumps(res))
    (tmp_path / f"personalize_seed{other['bench']['seed']}.json").write_text(json.dumps(other))
    page = render(tmp_path)
    assert "Other draws of the simulated users" in page
    for name in res["personas"]:
        for seed in (res["bench"]["seed"], other["bench"]["seed"]):
            assert f"| {name} | {seed} |" in page
    assert "ran another learner recipe" not in page


def test_a_rate_comes_with_its_95_percent_wilson_interval():
    from bench.report import wilson

    lo, hi = wilson(0.5, 32)
    assert round(lo, 3) == 0.336 and round(hi, 3) == 0.664
    assert wilson(0.0, 32)[0] == 0.0 and 0.10 < wilson(0.0, 32)[1] < 0.11, "no answer accepted still leaves room above 0"
    assert wilson(1.0, 32)[1] == 1.0 and 0.89 < wilson(1.0, 32)[0] < 0.90
    assert wilson(0.78125, 32)[1] - wilson(0.78125, 32)[0] > wilson(0.78125, 320)[1] - wilson(0.78125, 320)[0]
    assert wilson(0.5, 0) == (0.0, 1.0)


def test_a_gate_audit_lines_up_with_a_run_only_when_their_refusals_match():
    from bench.report_cli import _audits_this_run

    pers = {"tracks": {"brief/all": {"points": [{"events": 0}, {"learn": {"status": "promoted", "version": 1}},
                                                {"learn": {"status": "rejected", "version": 2}}]}}}
    assert _audits_this_run([{"user": "brief-all", "version": 2}], pers)
    assert not _audits_this_run([{"user": "brief-all", "version": 1}], pers), "v1 was promoted in this run"
    assert not _audits_this_run([{"user": "brief-all", "version": 2}, {"user": "bullets-all", "version": 1}], pers)
    assert not _audits_this_run([{"user": "brief-all", "version": 2}], None)


def test_a_draw_with_another_recipe_is_named_as_such():
    from bench.report_cli import draws_md

    curve = {"0": 0.0, "4": 0.5}
    main = {"bench": {"seed": 0, "checkpoints": [4]}, "learner_config": {"learning_rate": 0.002},
            "personas": {"brief": {"curve": curve, "degenerate": 0.0, "learner_status": {"4": "promoted"}}}}
    other = {**main, "bench": {"seed": 1, "checkpoints": [4]}, "learner_config": {"learning_rate": 0.001, "epochs": 3}}
    page = draws_md(main, [other])
    assert "Draw 1 ran another learner recipe: epochs 3 (main: (no such setting)), learning_rate 0.001 (main: 0.002)." in page
    assert "| brief | 0 | 50% |" in page and "| brief | 1 | 50% |" in page
    assert "ran another learner recipe" not in draws_md(main, [{**other, "learner_config": main["learner_config"]}])


def test_a_changed_setting_is_set_beside_the_run_of_its_own_draw():
    from bench.report_cli import variants_md

    def run(seed: int, accept: float, *, gate: int = 160, dtype: str = "float32") -> dict:
        return {"bench": {"seed": seed, "checkpoints": [4]}, "learner_config": {"gate_max_new_tokens": gate},
                "dtypes": {"learner": dtype}, "seconds": 600.0,
                "personas": {"brief": {"curve": {"0": 0.0, "4": accept}, "degenerate": 0.0, "others_max_delta": 0.0}}}

    main, draw2 = run(0, 0.72), run(2, 0.41)
    page = variants_md(main, [("v2.json", run(2, 0.97, gate=256)), ("v0.json", run(0, 0.75, gate=256, dtype="bfloat16")),
                              ("v5.json", run(5, 0.5, gate=256))], [draw2])
    v2, v0, v5 = (page.split(f"`{n}`", 1)[1].split("\n\n`", 1)[0] for n in ("v2.json", "v0.json", "v5.json"))
    assert "beside draw 2: gate_max_new_tokens 256 (draw 2: 160)." in v2 and "| brief | 41% / 97% |" in v2, "not beside draw 0"
    assert "beside main: gate_max_new_tokens 256 (main: 160), training dtype 'bfloat16' (main: 'float32')." in v0
    assert "| brief | 72% / 75% |" in v0
    assert "no run of that draw with the main settings (`personalize_seed5.json`)" in v5 and "| brief |" not in v5


def test_a_draws_own_gate_audit_is_joined_with_that_draw(tmp_path):
    from bench.report_cli import render

    def draw(seed: int, refused: int) -> dict:
        points = [{"events": 0, "accept": {"brief": 0.0}},
                  {"events": 4, "accept": {"brief": 0.44}, "learn": {"status": "promoted", "version": 1}},
                  {"events": 8, "accept": {"brief": 0.44}, "learn": {"status": "rejected", "version": refused}}]
        return {"bench": {"seed": seed, "checkpoints": [4, 8]}, "tracks": {"brief/all": {"persona": "brief", "points": points}},
                "personas": {"brief": {"base": 0.0, "curve": {"0": 0.0, "4": 0.44, "8": 0.44}, "degenerate": 0.0,
                                       "others_max_delta": 0.0}}}

    (tmp_path / "personalize_seed1.json").write_text(json.dumps(draw(1, 2)))
    row = {"user": "brief-all", "version": 2, "status": "rejected", "gate_reasons": ["held-out chosen answers got less likely"],
           "accept": 0.66, "degenerate": 0.0, "chosen_gain": -0.906, "margin_gain": 0.007}
    (tmp_path / "gate_audit_seed1.json").write_text(json.dumps({"n_heldout_prompts": 32, "rows": [row]}))
    page = render(tmp_path)
    audit = page.split("## Gate audit of draw 1", 1)[1]
    assert "| brief-all | 2 | held-out chosen answers got less likely | 66% | 44% | 0% | -0.906 | 0.007 |" in audit
    assert "earlier run" not in audit


def test_the_report_says_when_the_penalty_spared_the_question():
    from bench.report import _settings

    chat = {"system_prompt": "Be brief.", "repetition_penalty": 1.15, "max_new_tokens": 256}
    assert "question" not in _settings({"generation": {"chat": chat}})[0]
    assert "the answer's own words, not the question's" in _settings({"generation": {"chat": {**chat, "penalty_counts_prompt": False}}})[0]


def test_gate_probes_answers_every_adapter_of_a_kept_run_as_the_gate_did(quick):
    from bench.gate_probes import replay
    from heed.config import load_config
    from learner import gate_cache
    from learner.probes import probe_prompts

    res, out = quick
    data = out.parent.parent / "data" / "run"
    report = replay("configs/tiny.yaml", data, sets=["factual", "everyday"], say=lambda _: None)
    trained = {t for t, rec in res["tracks"].items() if any((p.get("learn") or {}).get("version") for p in rec["points"])}
    assert report["rows"][0]["user"] == "base"
    assert {r["user"].replace("-", "/") for r in report["rows"][1:]} == trained
    for row in report["rows"]:
        for kind in ("factual", "everyday"):
            c = row[kind]
            assert c["n"] == len(c["answers"]) == len(probe_prompts(kind))
            assert c["degenerate"] + c["cut_off"] + c["off_topic"] <= c["n"] and 0 <= c["templated"] <= c["n"]
    # The base's answers to the probes the run's gate asked it are the ones the gate kept: generated the same way.
    cached = json.loads((data / "adapters" / gate_cache.BASE_ANSWERS_FILE).read_text())["answers"]
    system = {"role": "system", "content": load_config("configs/tiny.yaml").generation.system_prompt}
    asked = 0
    for kind in ("factual", "everyday"):
        for q, answer in zip(probe_prompts(kind), report["rows"][0][kind]["answers"]):
            key = gate_cache.context_key([system, {"role": "user", "content": q}])
            if key in cached:
                asked += 1
                assert cached[key][0] == answer
    assert asked


def test_best_of_k_serves_the_runs_own_greedy_answers_and_chooses_by_the_adapters_reward(quick):
    from bench.rerank import CHOOSERS, rerank, retally, summary_md

    res, out = quick
    report = rerank(out.parent.parent / "data", k=3, quick=True, say=lambda _: None)
    rows = {r["user"]: r for r in report["rows"]}
    assert "base" in rows and len(rows) > 1
    for user, row in rows.items():
        assert set(row["accept"]) == set(CHOOSERS)
        for chooser in CHOOSERS[:-1]:
            for name, rate in row["accept"][chooser].items():
                assert rate <= row["accept"]["oracle"][name], "no chooser beats accepting any of the k answers"
        for a in row["answers"]:
            assert len(a["candidates"]) == len(a["reward"]) == 3
            assert a["picks"]["reward"] == max(range(3), key=lambda i: a["reward"][i])
        if user == "base":
            # Without an adapter the implicit reward is zero for every answer: the first (greedy) one is kept.
            assert all(r == 0.0 for a in row["answers"] for r in a["reward"])
            assert all(a["picks"]["reward"] == 0 for a in row["answers"])
            continue
        # The greedy answers are the ones the run judged last: the user's active adapter, decoded the same way.
        last = res["tracks"][user.replace("-", "/", 1)]["points"][-1]
        assert row["accept"]["greedy"][row["persona"]] == last["accept"][row["persona"]]
        assert any(r != 0.0 for a in row["answers"] for r in a["reward"]), "a trained adapter's reward is not flat"
    assert "| says_" in summary_md(report)
    # Judging the saved answers again gives the same figures: a chooser added later can be judged without a model.
    again = retally(json.loads(json.dumps(report)))
    assert [r["accept"] for r in again["rows"]] == [r["accept"] for r in report["rows"]]
    # Answers saved without their scores (the tool's first version) keep their saved score-based picks.
    unscored = json.loads(json.dumps(report))
    for row in unscored["rows"]:
        for a in row["answers"]:
            del a["tokens"], a["logp"]
    assert [r["accept"] for r in retally(unscored)["rows"]] == [r["accept"] for r in report["rows"]]
    for row in unscored["rows"]:
        for a in row["answers"]:
            del a["picks"]
    with pytest.raises(SystemExit, match="neither scores nor picks"):
        retally(unscored)


def test_best_of_k_scores_answers_with_the_adapters_own_log_probabilities(quick):
    import torch
    from peft import PeftModel

    from bench.personalize import heed_config
    from bench.rerank import answer_scores
    from bench.settings import load_bench_config
    from heed.engine import AdapterRef, Engine, load_base
    from heed.store import Store

    _, out = quick
    config = heed_config(None, quick=True, bench=load_bench_config(None, quick=True), data_dir=str(out.parent.parent / "data"))[0]
    store = Store(config.db_path)
    with store.db.connect() as db:
        uids = [uid for uid, name in db.execute("SELECT id, name FROM users ORDER BY id") if "-" in name]
    path = next(a["path"] for uid in uids for a in store.list_adapters(user_id=uid) if a["status"] == "active")
    engine = Engine(*load_base(config), model_cfg=config.model, gen_cfg=config.generation)
    tok = engine.tokenizer
    prompts = [engine.prompt_ids([{"role": "user", "content": q}]) for q in ("How do I boil an egg?", "Why is the sky blue?")]
    answers = [tok("Thanks for asking.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
               tok("Blue light scatters more.", add_special_tokens=False)["input_ids"]]
    seqs = [(p + a, len(p)) for p, a in zip(prompts, answers)]
    # A fresh engine has not loaded the adapter: scoring must load it, not score the base model twice.
    got = {ref is None: answer_scores(engine, ref, seqs) for ref in (AdapterRef("scored", path), None)}
    plain = PeftModel.from_pretrained(load_base(config)[0], path)
    for adapted in (True, False):
        for p, a, (total, n) in zip(prompts, answers, got[not adapted]):
            with torch.inference_mode(), (plain.disable_adapter() if not adapted else torch.no_grad()):
                logp = torch.log_softmax(plain(input_ids=torch.tensor([p + a])).logits.float(), dim=-1)[0]
            assert n == len(a)
            assert total == pytest.approx(sum(logp[len(p) - 1 + t, a[t]].item() for t in range(len(a))), abs=1e-3)
    assert got[False] != got[True], "the adapter changes the scores"


def test_adapter_strength_one_replays_the_runs_answers_and_a_scaled_copy_is_what_gets_served(quick, tmp_path):
    from bench.strength import scaled_copy, strength, summary_md

    res, out = quick
    report = strength(out.parent.parent / "data", scales=[1.0, 3.0], quick=True, say=lambda _: None)
    rows = {(r["user"], r["scale"]): r for r in report["rows"]}
    users = {u for u, _ in rows if u != "base"}
    assert users
    for user in users:
        last = res["tracks"][user.replace("-", "/", 1)]["points"][-1]
        persona = rows[user, 1.0]["persona"]
        assert rows[user, 1.0]["accept"] == last["accept"][persona], "γ = 1 serves the run's own adapter as the run did"
    assert any(rows[u, 1.0]["answers"] != rows[u, 3.0]["answers"] for u in users), "the scaled copy is the one answering"
    assert "γ = 3" in summary_md(report)
    src = next(p for p in (out.parent.parent / "data" / "run" / "adapters").glob("*/v*") if (p / "adapter_config.json").is_file())
    copy = scaled_copy(src, tmp_path / "x", 2.5)
    was, now = (json.loads((d / "adapter_config.json").read_text()) for d in (src, copy))
    assert now["lora_alpha"] == 2.5 * was["lora_alpha"] and now["r"] == was["r"]
    assert (copy / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    # A per-module alpha scales too; a DoRA adapter, whose delta alpha does not scale, is refused.
    pattern = scaled_copy(src, tmp_path / "p", 1.0)
    (pattern / "adapter_config.json").write_text(json.dumps({**was, "alpha_pattern": {"q_proj": 8}}))
    assert json.loads((scaled_copy(pattern, tmp_path / "p2", 2.0) / "adapter_config.json").read_text())["alpha_pattern"] == {"q_proj": 16}
    (pattern / "adapter_config.json").write_text(json.dumps({**was, "use_dora": True}))
    with pytest.raises(SystemExit, match="DoRA"):
        scaled_copy(pattern, tmp_path / "d", 2.0)


@pytest.mark.parametrize("tool", ["rerank", "strength", "rejudge"])
def test_a_replay_of_a_folder_without_a_kept_run_fails_before_building_a_model_there(tool, tmp_path, capsys):
    from bench.cli import main

    nothing = tmp_path / "typo"
    with pytest.raises(SystemExit, match="no kept run in"):
        main([tool, "--data-dir", str(nothing), "--config", "configs/default.yaml", "--out", str(tmp_path / "x.json")])
    assert not nothing.exists(), "nothing was converted into a folder the user did not mean"


def test_a_kept_run_is_found_under_a_folder_given_with_a_tilde(tmp_path, monkeypatch):
    from bench.personalize import heed_config
    from bench.settings import load_bench_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "runs" / "x" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "run" / "heed.db").write_bytes(b"")
    config = heed_config(None, quick=True, bench=load_bench_config(None, quick=True), data_dir="~/runs/x", kept=True)[0]
    assert config.db_path == tmp_path / "runs" / "x" / "run" / "heed.db"


def test_the_consensus_chooser_passes_over_the_odd_answer_out():
    from bench.rerank import choose

    texts = ["Use a lasso to grab the tool!", "Soak the skin, then pull the splinter out with tweezers.",
             "Pull the splinter out with clean tweezers.", "Wash the area and pull the splinter out with tweezers."]
    picks = choose([{"text": t, "sound": True} for t in texts])
    assert picks["consensus"] != 0 and picks["greedy"] == 0
    assert "reward" not in picks, "answers saved without scores get no score-based picks"
    assert choose([{"text": t, "sound": True} for t in ["Same words.", "Same words."]])["consensus"] == 0, "a tie keeps the greedy answer"
