"""The `heed` command line. Every command goes through the service facade (heed.service.Heed)."""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import secrets
import sys
import time

from .config import ConfigError, describe, load_config

DEFAULT_CONFIG = "configs/default.yaml"


def _open(args):
    from .service import Heed

    path = args.config if args.config else (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return Heed(load_config(path, overrides=overrides))


def _bar(label: str):
    """A one-line progress bar on stderr for a learner run."""
    def show(stage: str, frac: float) -> None:
        width = 30
        filled = int(width * max(0.0, min(1.0, frac)))
        sys.stderr.write(f"\r{label} {stage:<6} [{'#' * filled}{'.' * (width - filled)}] {frac:4.0%}")
        if stage == "done":
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def _read_password(args) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("passwords differ")
    return first


def cmd_user(args) -> int:
    heed = _open(args)
    if args.action == "add":
        uid = heed.add_user(args.name, _read_password(args))
        print(f"user {args.name} added (id {uid})")
    elif args.action == "list":
        for u in heed.store.list_users():
            state = heed.store.login_state(user_id=u["id"])
            locked = (f"  locked until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state['locked_until']))}"
                      if state["locked_until"] > time.time() else "")
            print(f"{u['id']:>4}  {u['name']}{locked}")
    elif args.action == "delete":
        heed.delete_user(heed.user_id(args.name))
        print(f"user {args.name} deleted with their conversations, feedback and adapters")
    elif args.action == "passwd":
        heed.store.set_password(user_id=heed.user_id(args.name), password=_read_password(args))
        print(f"password of {args.name} changed")
    elif args.action == "unlock":
        heed.store.unlock(user_id=heed.user_id(args.name))
        print(f"{args.name} can log in again")
    return 0


def cmd_serve(args) -> int:
    heed = _open(args)
    if args.demo_user and not heed.store.list_users():
        password = secrets.token_urlsafe(9)
        heed.add_user(args.demo_user, password)
        print(f"\n  First start: created user '{args.demo_user}' with password '{password}'\n"
              f"  (add more with: heed user add NAME)\n", flush=True)
    from chat_app.app import serve

    serve(heed, host=args.host or heed.config.app.host, port=args.port or heed.config.app.port)
    return 0


def cmd_learn(args) -> int:
    heed = _open(args)
    if args.schedule:
        from learner.schedule import run_schedule

        run_schedule(heed.config, heed.store)
        return 0
    if args.user:
        users = [heed.user_id(args.user)]
    else:
        users = heed.store.users_with_unconsumed(at_least=heed.config.learner.min_new_feedback)
        if not users:
            print("no user has enough new feedback to learn from")
            return 0
    failed = 0
    for uid in users:
        name = heed.store.user_name(uid)
        result = heed.learn(uid, trigger="cli", progress=_bar(name))
        failed += result["status"] == "failed"
        detail = result.get("reason") or result.get("error") or "; ".join(result.get("reasons") or [])
        from learner.shrink import describe_attempts  # no heavy imports: the steps a refused run judged (gate_retries)

        retried = describe_attempts(result.get("attempts") or [], result["status"])
        detail = "; ".join([*retried, *([detail] if detail else [])])
        version = f" v{result['version']}" if result.get("version") else ""
        print(f"{name}: {result['status']}{version}" + (f" ({detail})" if detail else "") +
              (f" in {result['seconds']:.1f}s" if result.get("seconds") else ""))
    return 1 if failed else 0


def cmd_adapters(args) -> int:
    heed = _open(args)
    uid = heed.user_id(args.user)
    if args.action == "list":
        status = heed.adapter_status(uid)
        if not status["versions"]:
            print(f"{args.user} has no adapter yet (serving the base model)")
        for a in status["versions"]:
            gate = (a["metrics"] or {}).get("gate", {})
            why = "; ".join(gate.get("reasons") or [])
            print(f"v{a['version']:<4} {a['status']:<8} {time.strftime('%Y-%m-%d %H:%M', time.localtime(a['created_at']))}  "
                  f"{a['n_feedback']:>3} feedback  {why}")
    elif args.action == "rollback":
        versions = [a for a in heed.store.list_adapters(user_id=uid) if a["status"] in ("retired", "active")]
        if args.version is not None:
            target = args.version
        else:
            # The newest version older than the active one (a second rollback goes further back, not forward).
            active = next((a["version"] for a in versions if a["status"] == "active"), None)
            older = [a["version"] for a in versions if a["status"] == "retired" and (active is None or a["version"] < active)]
            target = max(older) if older else None
        heed.rollback(uid, target)
        print(f"{args.user} now uses " + (f"adapter v{target}" if target else "the base model") + " from their next conversation")
    return 0


def cmd_export(args) -> int:
    heed = _open(args)
    from learner.export import export_jsonl

    n = export_jsonl(heed.config, heed.store, user_id=heed.user_id(args.user), fmt=args.format, out=args.out)
    print(f"wrote {n} rows to {args.out}")
    return 0


def cmd_backup(args) -> int:
    heed = _open(args)
    from .backup import backup

    print(json.dumps(backup(heed, args.dest), indent=2))
    return 0


def cmd_restore(args) -> int:
    from .backup import restore

    path = args.config if args.config else (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    config = load_config(path, overrides={"data_dir": args.data_dir} if args.data_dir else None)
    print(json.dumps(restore(args.src, config, force=args.force), indent=2))
    return 0


def cmd_model(args) -> int:
    config = load_config(args.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None))
    from .models import resolve_model

    print(resolve_model(config))
    return 0


def cmd_config(args) -> int:
    for key, default, help in describe():
        print(f"{key:<38} {default!r:<28} {help}")
    return 0


def cmd_bench(args) -> int:
    from bench.cli import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heed", description="Heed: a local chat assistant that learns from your feedback.")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--data-dir", help="override data_dir from the config")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the web chat on 127.0.0.1")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--demo-user", metavar="NAME", help="create this user with a random password when there are no users")
    s.set_defaults(fn=cmd_serve)

    u = sub.add_parser("user", help="manage users: add, list, delete (with all their data), passwd, unlock")
    u.add_argument("action", choices=["add", "list", "delete", "passwd", "unlock"])
    u.add_argument("name", nargs="?")
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u.set_defaults(fn=cmd_user)

    learn = sub.add_parser("learn", help="train users' adapters from their new feedback")
    mode = learn.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="one pass now")
    mode.add_argument("--schedule", action="store_true", help="keep running on the configured interval")
    learn.add_argument("--user", help="only this user")
    learn.set_defaults(fn=cmd_learn)

    a = sub.add_parser("adapters", help="list or roll back a user's adapter versions")
    a.add_argument("action", choices=["list", "rollback"])
    a.add_argument("--user", required=True)
    a.add_argument("--version", type=int, help="version to roll back to (default: the previous one)")
    a.set_defaults(fn=cmd_adapters)

    e = sub.add_parser("export", help="write a user's training data as TRL-ready JSONL")
    e.add_argument("--user", required=True)
    e.add_argument("--format", choices=["dpo", "kto", "sft"], required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_export)

    b = sub.add_parser("backup", help="consistent copy of the database and the adapters it serves (safe while the app runs)")
    b.add_argument("dest", help="a new or empty folder; it can later serve as a data_dir")
    b.set_defaults(fn=cmd_backup)

    r = sub.add_parser("restore", help="put a backup in place as the configured database and adapters (stop the app first)")
    r.add_argument("src", help="a folder written by `heed backup`")
    r.add_argument("--force", action="store_true", help="replace a database that already has users")
    r.set_defaults(fn=cmd_restore)

    m = sub.add_parser("model", help="prepare the configured base model (converts the embedded GGUF once)")
    m.set_defaults(fn=cmd_model)

    c = sub.add_parser("config", help="list every configuration key with its default and help")
    c.set_defaults(fn=cmd_config)

    bench = sub.add_parser("bench", help="benchmarks: personalize, perf, load, gate-audit, report", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "bench":
        # argparse leaves a leading option (`heed bench --help`) out of REMAINDER: the bench CLI gets it.
        args.rest = extra + args.rest
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .models import ModelNotFound
    from .service import InputError
    from .store import StoreError

    if args.command == "user" and args.action != "list" and not args.name:
        print("heed: error: user NAME is required", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (ConfigError, ModelNotFound, StoreError, InputError) as exc:
        print(f"heed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
