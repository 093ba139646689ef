"""`heed bench batching` on the tiny model: both ways measured, and both give every request the same answer."""
from __future__ import annotations

import json


def test_batching_bench_times_both_ways_and_their_answers_agree(tmp_path):
    from bench.cli import main

    out = tmp_path / "batching.json"
    args = ["batching", "--config", "configs/tiny.yaml", "--out", str(out), "--runs", "2", "--users", "2", "--chats", "2",
            "--rows", "5", "--batch", "2", "--long-tokens", "40"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    for workload in ("chat", "eval", "first_token"):
        assert all(len(v) == 2 and min(v) > 0 for v in res["seconds"][workload].values())
        assert res["whole_over_continuous"][workload] > 0
    assert res["same_answers"] == {"chat": "4/4", "eval": "5/5"}
    assert res["workloads"]["eval"]["tokens"] > 0
