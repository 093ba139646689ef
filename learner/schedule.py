"""`heed learn --schedule`: learner passes on a timer, in their own process.

APScheduler 3.x with ``max_instances=1`` and ``coalesce=True``: a pass that
overruns its interval is never started twice and missed passes collapse into
one. Across processes (a manual `heed learn --once`, the UI's "learn now"),
the per-user lease row in the store keeps one run per user at a time.
"""
from __future__ import annotations

import logging

from heed.config import HeedConfig
from heed.store import Store

from .run import learn_all

log = logging.getLogger(__name__)


def one_pass(config: HeedConfig, store: Store) -> list[dict]:
    results = learn_all(config, store, trigger="schedule")
    for r in results:
        log.warning("learner: user %s %s %s", r.get("user_id"), r["status"], r.get("error") or "; ".join(r.get("reasons") or []))
    return results


def build_scheduler(config: HeedConfig, store: Store, *, blocking: bool = True):
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    scheduler = (BlockingScheduler if blocking else BackgroundScheduler)()
    scheduler.add_job(one_pass, "interval", minutes=config.learner.schedule_minutes, args=[config, store],
                      id="heed-learner", max_instances=1, coalesce=True, next_run_time=_now())
    return scheduler


def _now():
    import datetime

    return datetime.datetime.now()


def run_schedule(config: HeedConfig, store: Store) -> None:
    print(f"learner: a pass every {config.learner.schedule_minutes} min (Ctrl-C stops)", flush=True)
    scheduler = build_scheduler(config, store)
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        scheduler.shutdown(wait=False)
