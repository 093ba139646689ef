"""`heed bench gate-bounds`: the gate's share rule replayed on a run's recorded shares with another bound."""
from __future__ import annotations

import json

import pytest


def _point(events, accept, *, status="promoted", off=None, off_active=0.0):
    p = {"events": events, "accept": {"brief": accept}}
    if off is not None:
        p["learn"] = {"status": status, "gate_degenerate": 0.0, "gate_cutoff": 0.0, "gate_offtopic": off,
                      "gate_degenerate_active": 0.0, "gate_cutoff_active": 0.0, "gate_offtopic_active": off_active,
                      "gate_degenerate_base": 0.0, "gate_cutoff_base": 0.0, "gate_offtopic_base": 0.0}
    return p


def _run(*points):
    return {"learner_config": {"gate_answers": 24}, "tracks": {"brief/all": {"persona": "brief", "points": list(points)}}}


def test_a_refusal_at_the_last_checkpoint_keeps_the_figure_measured_before():
    from bench.gate_bounds import replay

    run = _run(_point(0, 0.0), _point(4, 0.8, off=0.125), _point(8, 0.6, off=0.25, off_active=0.125))
    assert replay(run, 0.25)["brief/all"]["accept_last_with_bound"] == 0.6
    tight = replay(run, 0.2)["brief/all"]
    assert [d["refused"] for d in tight["decisions"]] == [False, True]  # 6 of 24 answers off topic over the base's none
    assert tight["accept_last_with_bound"] == 0.8


def test_an_earlier_refusal_leaves_the_rest_of_the_track_unknown():
    from bench.gate_bounds import replay

    row = replay(_run(_point(0, 0.0), _point(4, 0.8, off=0.125), _point(8, 0.6, off=0.125, off_active=0.125)), 0.1)["brief/all"]
    assert row["decisions"][0]["refused"] and row["accept_last_with_bound"] is None and row["unknown_after"] == 4
    assert row["curve_with_bound"] == {"0": 0.0, "4": 0.0}  # the user keeps the base model at 4 events


def test_a_rise_of_fewer_answers_than_the_gate_counts_as_noise_is_not_refused():
    from bench.gate_bounds import replay

    row = replay(_run(_point(0, 0.0), _point(4, 0.8, off=0.083)), 0.0)["brief/all"]  # 2 of 24 answers
    assert not row["decisions"][0]["refused"]


def test_a_run_without_recorded_shares_is_refused_with_a_reason(tmp_path):
    from bench.gate_bounds import main

    old = tmp_path / "old.json"
    run = _run(_point(0, 0.0), _point(4, 0.8, off=0.1))
    del run["tracks"]["brief/all"]["points"][1]["learn"]["gate_offtopic_active"]
    old.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="did not record the gate's shares"):
        main(["--run", str(old)])


def test_a_bound_looser_than_the_runs_own_is_refused(tmp_path):
    from bench.gate_bounds import main

    f = tmp_path / "run.json"
    run = _run(_point(0, 0.0), _point(4, 0.8, off=0.1))
    run["learner_config"]["gate_max_offtopic_increase"] = 0.25
    f.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="only bounds up to it replay"):
        main(["--run", str(f), "--bounds", "0.3"])
    assert main(["--run", str(f), "--bounds", "0.25", "0.1", "--out", str(tmp_path / "out.json")]) == 0
    assert set(json.loads((tmp_path / "out.json").read_text())["bounds"]) == {"0.25", "0.1"}
