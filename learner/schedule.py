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

from .run import learn_all, sweep_leftovers

log = logging.getLogger(__name__)


def one_pass(config: HeedConfig, store: Store) -> list[dict]:
    results = learn_all(config, store, trigger="schedule")
    for r in results:
        detail = r.get("error") or r.get("reason") or "; ".join(r.get("reasons") or [])
        if r["status"] == "failed":
            log.error("learner: user %s failed: %s", r.get("user_id"), detail)
        print(f"learner: user {r.get('user_id')} {r['status']}" + (f" ({detail})" if detail else ""), flush=True)
    return results


def make_trigger(config: HeedConfig):
    """A cron trigger from ``learner.schedule_cron``, else an interval of ``schedule_minutes``."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if config.learner.schedule_cron.strip():
        return CronTrigger.from_crontab(config.learner.schedule_cron)
    return IntervalTrigger(minutes=config.learner.schedule_minutes)


def build_scheduler(config: HeedConfig, store: Store, *, blocking: bool = True, run_now: bool = True):
    import datetime

    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    scheduler = (BlockingScheduler if blocking else BackgroundScheduler)()
    extra = {"next_run_time": datetime.datetime.now().astimezone()} if run_now else {}
    scheduler.add_job(one_pass, make_trigger(config), args=[config, store], id="heed-learner",
                      max_instances=1, coalesce=True, misfire_grace_time=None, **extra)
    return scheduler


def describe_schedule(config: HeedConfig) -> str:
    cron = config.learner.schedule_cron.strip()
    return f"on cron '{cron}'" if cron else f"every {config.learner.schedule_minutes} min"


def run_schedule(config: HeedConfig, store: Store) -> None:
    removed = sweep_leftovers(config, store)
    if removed:
        log.warning("learner: removed leftovers of interrupted runs: %s", removed)
    print(f"learner: a pass now and {describe_schedule(config)} (Ctrl-C stops)", flush=True)
    scheduler = build_scheduler(config, store)
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        scheduler.shutdown(wait=False)
