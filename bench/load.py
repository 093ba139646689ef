"""`heed bench load`: N simulated users over HTTP against a real `heed serve`.

Each user logs in through the login form, opens a session, sends messages (each
answer streamed back) and then sends feedback events the way the browser does:
thumbs on the answers, then edits of them, every one a raw Gradio event
(``/gradio_api/queue/join`` + the SSE stream ``/gradio_api/queue/data``) with
event data. Every feedback event makes one new row, so the events sent must
equal the rows stored.

The figures go to ``--out`` (default bench/results/load.json): users, events_sent,
rows_stored, errors, p50/p95 of a feedback write and of a reply (ms, measured at
the client from the POST to the completed event), plus the server's "database
is locked" count and the database's integrity check after the run.

``GradioClient`` and ``start_server`` are also what the HTTP tests use.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "load.json"


# -- a raw Gradio client ------------------------------------------------------------------------------
@dataclass
class Result:
    status: int  # HTTP status of the join request
    success: bool = False
    output: list | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    text: str = ""  # every message of the event's stream, as text (for scanning)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.success and not self.warnings


class GradioClient:
    """One browser session: a login cookie, a session hash, and raw event calls by fn_index."""

    def __init__(self, base_url: str, *, timeout: float = 300.0, session_hash: str | None = None) -> None:
        import httpx

        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=timeout, follow_redirects=False)
        self.session_hash = session_hash or uuid.uuid4().hex[:11]
        self._config: dict | None = None

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, **kw):
        import httpx

        try:
            return self.http.post(path, **kw)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # The server closes a kept-alive connection after an internal error; one retry on a fresh one.
            return self.http.post(path, **kw)

    def login(self, name: str, password: str) -> bool:
        r = self.http.post("/login", data={"username": name, "password": password})
        return r.status_code == 200 and r.json().get("success") is True

    def logout(self) -> int:
        return self.http.get("/logout").status_code

    def config(self, *, refresh: bool = False) -> dict:
        if self._config is None or refresh:
            r = self.http.get("/config")
            r.raise_for_status()
            self._config = r.json()
        return self._config

    def fn_index(self, api_name: str) -> int:
        for dep in self.config()["dependencies"]:
            if dep.get("api_name") == api_name:
                return dep["id"]
        raise KeyError(f"no event named {api_name!r}")

    def blank_inputs(self, fn_index: int) -> list:
        dep = next(d for d in self.config()["dependencies"] if d["id"] == fn_index)
        return [None] * len(dep["inputs"])

    def call(self, fn: int | str, data: list | None = None, *, event_data=None, trigger_id: int | None = None,
             session_hash: str | None = None, raw_body: dict | None = None) -> Result:
        """Join the queue with one event and read its stream until it completes."""
        fn_index = self.fn_index(fn) if isinstance(fn, str) else fn
        sh = session_hash or self.session_hash
        body = raw_body if raw_body is not None else {
            "data": data if data is not None else self.blank_inputs(fn_index), "fn_index": fn_index,
            "session_hash": sh, "event_data": event_data, "trigger_id": trigger_id}
        t0 = time.perf_counter()
        # Serialized here, not by httpx: a raw client may send NaN/Infinity or escaped lone surrogates.
        r = self._post("/gradio_api/queue/join", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        if r.status_code != 200:
            return Result(status=r.status_code, error=r.text[:500], text=r.text, seconds=time.perf_counter() - t0)
        event_id = r.json().get("event_id")
        res = Result(status=200)
        texts = []
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": sh}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                texts.append(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                kind = msg.get("msg")
                if kind == "log" and msg.get("level") in ("warning", "error"):
                    res.warnings.append(str(msg.get("log")))
                if kind == "process_completed":
                    res.success = bool(msg.get("success"))
                    out = msg.get("output") or {}
                    res.output = out.get("data")
                    if not res.success:
                        res.error = str(out.get("error"))
                    break
                if kind in ("close_stream", "unexpected_error"):
                    res.error = res.error or str(msg.get("message") or kind)
                    break
        res.text = "\n".join(texts)
        res.seconds = time.perf_counter() - t0
        return res


# -- the server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config_file: Path, *, log_path: Path, timeout: float = 180.0, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`heed serve` in a child process; returns (process, base URL) once it answers."""
    import httpx

    from heed.config import load_config

    config = load_config(config_file)
    url = f"http://{config.app.host}:{config.app.port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "heed.cli", "--config", str(config_file), "serve", *(extra or [])],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"heed serve exited with {proc.returncode}: {Path(log_path).read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"heed serve did not answer at {url} within {timeout:.0f}s")


def stop_server(proc: subprocess.Popen, *, kill: bool = False) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(20)


# -- the simulated users -------------------------------------------------------------------------------------
@dataclass
class UserStats:
    reply_s: list[float] = field(default_factory=list)
    feedback_s: list[float] = field(default_factory=list)
    events_sent: int = 0
    messages_sent: int = 0
    errors: list[str] = field(default_factory=list)


def simulate_user(url: str, name: str, password: str, *, messages: int, events: int, start: threading.Barrier) -> UserStats:
    stats = UserStats()
    client = GradioClient(url)
    try:
        if not client.login(name, password):
            stats.errors.append(f"{name}: login refused")
            return stats
        client.call("page_load")
        start.wait()
        for i in range(messages):
            r = client.call("chat_send", [None, f"{name} asks question {i}: what is a good way to learn?"])
            stats.messages_sent += 1
            if not r.ok:
                stats.errors.append(f"{name}: reply {i}: {r.error or r.warnings}")
                continue
            stats.reply_s.append(r.seconds)
        answers = [2 * i + 1 for i in range(messages)]  # chat positions of the answers (user, answer, user, ...)
        for j in range(events):
            if j < len(answers):
                r = client.call("chat_like", [None], event_data={"index": answers[j], "value": None, "liked": j % 2 == 0})
            else:
                target = answers[j % len(answers)]
                r = client.call("chat_edit", [None], event_data={"index": target, "value": f"{name}'s rewrite number {j}.",
                                                                 "previous_value": None})
            stats.events_sent += 1
            if not r.ok:
                stats.errors.append(f"{name}: event {j}: {r.error or r.warnings}")
                continue
            stats.feedback_s.append(r.seconds)
    except Exception as exc:  # a broken connection is a load-test error to count, not a crash of the bench
        stats.errors.append(f"{name}: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    return stats


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def run_load(config_path: str | None, *, users: int, events: int, messages: int, data_dir: Path) -> dict:
    import yaml

    from heed.config import load_config
    from heed.service import Heed

    if messages < 1 or events < 0 or users < 1:
        raise ValueError("need at least one user and one message, and zero or more events")
    port = free_port()
    config = load_config(config_path, overrides={"data_dir": str(data_dir), "app": {"host": "127.0.0.1", "port": port}})
    config_file = data_dir / "load-config.yaml"
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    heed = Heed(config)
    accounts = {}
    for i in range(users):
        name, password = f"load{i:03d}", secrets.token_urlsafe(12)
        heed.add_user(name, password)
        accounts[name] = password

    log_path = data_dir / "serve.log"
    proc, url = start_server(config_file, log_path=log_path)
    start = threading.Barrier(users)
    results: dict[str, UserStats] = {}
    try:
        threads = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(
            n, simulate_user(url, n, p, messages=messages, events=events, start=start))) for n, p in accounts.items()]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        stop_server(proc)
    server_log = log_path.read_text(errors="replace")
    with heed.store.db.connect() as db:
        rows = db.execute("SELECT COUNT(*) FROM feedback f JOIN users u ON u.id = f.user_id WHERE u.name LIKE 'load%'").fetchone()[0]
        answers = db.execute("SELECT COUNT(*) FROM messages WHERE role = 'assistant'").fetchone()[0]
    stats = list(results.values())
    errors = [e for s in stats for e in s.errors]
    feedback = [x for s in stats for x in s.feedback_s]
    replies = [x for s in stats for x in s.reply_s]
    return {
        "users": users,
        "events_sent": sum(s.events_sent for s in stats),
        "rows_stored": rows,
        "errors": len(errors),
        "p50_feedback_ms": ms(percentile(feedback, 50)),
        "p95_feedback_ms": ms(percentile(feedback, 95)),
        "p50_reply_ms": ms(percentile(replies, 50)),
        "p95_reply_ms": ms(percentile(replies, 95)),
        "messages_sent": sum(s.messages_sent for s in stats),
        "answers_stored": answers,
        "database_locked": server_log.count("database is locked"),
        "integrity_check": heed.store.integrity_check(),
        "wall_seconds": round(wall, 2),
        "feedback_events_per_second": round(len(feedback) / wall, 1) if wall else None,
        "error_samples": errors[:10],
        "config": {"model": config.model.name_or_path, "max_new_tokens": config.generation.max_new_tokens,
                   "messages_per_user": messages, "events_per_user": events},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heed bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20, help="concurrent simulated users (default 20)")
    p.add_argument("--events", type=int, default=50, help="feedback events per user (default 50)")
    p.add_argument("--messages", type=int, default=3, help="messages each user sends before the feedback (default 3)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"), help="config for the server (default configs/tiny.yaml)")
    p.add_argument("--data-dir", help="keep the run's database here (default: a temporary folder, removed afterwards)")
    args = p.parse_args(argv)
    if args.data_dir:
        data_dir = Path(args.data_dir)
        if data_dir.exists() and any(data_dir.iterdir()):
            p.error(f"--data-dir {data_dir} is not empty")
        result = run_load(args.config, users=args.users, events=args.events, messages=args.messages, data_dir=data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="heed-load-") as tmp:
            result = run_load(args.config, users=args.users, events=args.events, messages=args.messages, data_dir=Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("users", "events_sent", "rows_stored", "errors", "p50_feedback_ms", "p95_feedback_ms",
                                             "p50_reply_ms", "p95_reply_ms", "database_locked")}, indent=2))
    good = result["errors"] == 0 and result["events_sent"] == result["rows_stored"] and result["database_locked"] == 0
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
