"""`heed learn --schedule`: one job at a time, every user with new feedback, failures isolated."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from learner_util import edit_answers, learner_config, service

from learner.run import learn_user
from learner.schedule import build_scheduler, one_pass

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def h(tmp_path, tiny_model_path, shared_tiny_engine):
    return service(learner_config(tmp_path, tiny_model_path), shared_tiny_engine)


def test_the_job_never_overlaps_and_missed_runs_coalesce(h):
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    job = build_scheduler(h.config, h.store, blocking=False).get_job("heed-learner")
    assert job.max_instances == 1 and job.coalesce is True
    assert isinstance(job.trigger, IntervalTrigger) and job.trigger.interval.total_seconds() == 60 * h.config.learner.schedule_minutes
    h.config.learner.schedule_cron = "15 3 * * *"
    job = build_scheduler(h.config, h.store, blocking=False).get_job("heed-learner")
    assert isinstance(job.trigger, CronTrigger) and "hour='3'" in str(job.trigger)


def test_one_users_failure_does_not_stop_the_others(h):
    alice, bob, carol = h.add_user("alice", "pw"), h.add_user("bob", "pw"), h.add_user("carol", "pw")
    edit_answers(h, bob, ["Bob likes this."] * 2)
    assert learn_user(h.config, h.store, user_id=bob)["status"] == "promoted"
    # Bob's adapter file is damaged on disk: his next run cannot continue from it.
    (Path(h.store.active_adapter(user_id=bob)["path"]) / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    for uid in (alice, bob, carol):
        edit_answers(h, uid, ["Brief answers are good."] * 2)
    results = {r["user_id"]: r for r in one_pass(h.config, h.store)}
    assert results[bob]["status"] == "failed"
    assert results[alice]["status"] == "promoted" and results[carol]["status"] == "promoted"
    assert h.store.count_unconsumed(user_id=bob) == 2  # kept for when the adapter is fixed or rolled back
    assert h.store.list_runs(user_id=bob)[0]["status"] == "failed"


def test_a_pass_skips_a_user_another_run_is_training(h):
    alice, bob = h.add_user("alice", "pw"), h.add_user("bob", "pw")
    for uid in (alice, bob):
        edit_answers(h, uid, ["Brief answers are good."] * 2)
    assert h.store.acquire_lease(user_id=alice, holder=h.store.new_lease_holder("ui"), seconds=600)
    results = {r["user_id"]: r["status"] for r in one_pass(h.config, h.store)}
    assert results == {alice: "busy", bob: "promoted"}
    assert h.store.count_unconsumed(user_id=alice) == 2


def test_the_background_scheduler_runs_a_pass_now(h):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 2)
    scheduler = build_scheduler(h.config, h.store, blocking=False, run_now=True)
    scheduler.start()
    try:
        deadline = time.monotonic() + 120
        while h.store.active_adapter(user_id=uid) is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        scheduler.shutdown(wait=True)
    assert h.store.active_adapter(user_id=uid) is not None
    assert h.store.list_runs(user_id=uid)[0]["trigger"] == "schedule"


def test_heed_learn_schedule_cleans_leftovers_and_trains_in_its_own_process(h, tmp_path):
    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 2)
    stale = h.config.adapters_path / str(uid) / ".tmp-v0001-crashed"
    stale.mkdir(parents=True)
    cfg = tmp_path / "heed.yaml"
    cfg.write_text(yaml.safe_dump(h.config.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "heed.cli", "--config", str(cfg), "learn", "--schedule"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if f"user {uid} promoted" in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    assert any(f"user {uid} promoted" in line for line in lines), "".join(lines)[-3000:]
    assert not stale.exists()
    assert h.store.active_adapter(user_id=uid)["version"] == 1


def test_heed_learn_once_draws_a_progress_bar(h, tmp_path, capsys):
    from heed.cli import main

    uid = h.add_user("alice", "pw")
    edit_answers(h, uid, ["Brief answers are good."] * 2)
    cfg = tmp_path / "heed.yaml"
    cfg.write_text(yaml.safe_dump(h.config.to_dict()))
    assert main(["--config", str(cfg), "learn", "--once", "--user", "alice"]) == 0
    out = capsys.readouterr()
    assert "alice: promoted v1" in out.out
    assert "alice train" in out.err and "100%" in out.err
    assert h.store.active_adapter(user_id=uid)["version"] == 1
