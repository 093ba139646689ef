"""Learner runs started from the web app, each in a child process.

Training loads its own copy of the model and keeps both cores busy for a
while; in a child process it never blocks or shares memory with the server's
generation. The child is the ordinary CLI (``heed learn --once --user NAME``),
so a run from the web app is exactly a run from the command line: it takes the
user's lease in the store (two runs never train one user at once) and records
itself in ``learner_runs``. Its progress bar and closing line go to a log file
that ``progress`` reads.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import HeedConfig

log = logging.getLogger(__name__)

_BAR = re.compile(r"(\w+)\s+\[[#.]+\]\s+(\d+)%")


class LearnJobs:
    def __init__(self, config: HeedConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._jobs: dict[int, dict] = {}  # user_id -> {"proc", "log", "started_at"}

    def _config_file(self) -> Path:
        """The server's effective config as YAML, so the child trains on exactly the same settings."""
        import yaml

        data = self.config.to_dict()
        data["data_dir"] = str(self.config.data_path.resolve())
        folder = self.config.data_path / "run"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "learner-config.yaml"
        tmp = folder / f".learner-config-{os.getpid()}.yaml"
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def start(self, store, *, user_id: int) -> dict:
        name = store.user_name(user_id)
        with self._lock:
            job = self._jobs.get(user_id)
            if job is not None and job["proc"].poll() is None:
                return {"started": False, "reason": "a learning run for you is already going"}
            lease = store.lease_of(user_id=user_id)
            if lease is not None:
                return {"started": False, "reason": f"a learning run for you is already going ({lease['holder'].split('-')[0]})"}
            logs = self.config.data_path / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"learn-user{user_id}.log"
            cmd = [sys.executable, "-m", "heed.cli", "--config", str(self._config_file()), "learn", "--once", "--user", name]
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            self._jobs[user_id] = {"proc": proc, "log": log_path, "started_at": time.time(), "name": name}
            log.info("learner run for user %s started (pid %s)", user_id, proc.pid)
            return {"started": True, "reason": "learning started", "pid": proc.pid}

    def progress(self, store, *, user_id: int) -> dict:
        """``running``, ``stage``, ``fraction``, ``started_at``; when finished also ``status`` and ``summary``.

        Without a job started by this process (say, after a restart, or a
        scheduled run) the store's lease and newest run row tell what is going on.
        """
        with self._lock:
            job = self._jobs.get(user_id)
        runs = store.list_runs(user_id=user_id, limit=1)
        latest = runs[0] if runs else None
        if job is None:
            running = store.lease_of(user_id=user_id) is not None
            return {"running": running, "stage": "training" if running else None, "fraction": None,
                    "started_at": latest["started_at"] if latest else None, "status": None, "summary": None, "run": latest}
        code = job["proc"].poll()
        text = _tail(job["log"])
        bars = _BAR.findall(text)
        stage, fraction = (bars[-1][0], int(bars[-1][1]) / 100) if bars else ("starting", 0.0)
        out = {"running": code is None, "stage": stage, "fraction": fraction, "started_at": job["started_at"],
               "status": None, "summary": None, "run": latest if latest and latest["started_at"] >= job["started_at"] - 1 else None}
        if code is not None:
            line = next((ln for ln in reversed(text.replace("\r", "\n").splitlines()) if ln.startswith(f"{job['name']}: ")), "")
            m = re.match(rf"{re.escape(job['name'])}: (\w+)", line)
            out["status"] = m.group(1) if m else ("failed" if code else "finished")
            out["summary"] = line[len(job["name"]) + 2:] if line else (_last_error(text) if code else "finished")
        return out


def _tail(path: Path, size: int = 16_384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "the learner process ended without a result"
