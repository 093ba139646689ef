"""`python -m bench.hardening`: run the hardening tests and write their figures to bench/results/hardening.json.

The figures come from the tests themselves (``record_property`` in tests/test_isolation*,
test_auth*, test_bad_input*, test_faults*, test_backup*): how many calls bob made with
alice's ids, which kill points a learner run survived, how many odd inputs were tried, and
so on; plus every test's outcome and the load figures from bench/results/load.json
(``heed bench load``). Nothing here is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ["tests/test_isolation_world.py", "tests/test_isolation.py", "tests/test_isolation_http.py", "tests/test_auth.py",
         "tests/test_auth_http.py", "tests/test_bad_input.py", "tests/test_bad_input_http.py", "tests/test_faults.py",
         "tests/test_backup.py", "tests/test_cli.py"]


class Collector:
    """A pytest plugin that keeps each test's outcome, duration and recorded properties."""

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "properties": []})
        entry["seconds"] += report.duration
        if report.failed:
            entry["outcome"] = "failed"
        elif report.skipped and report.when != "teardown":
            entry["outcome"] = "skipped"
        if report.when == "call":
            entry["properties"] = list(report.user_properties)


def summarize(tests: dict[str, dict], load: dict | None) -> dict:
    props: dict[str, list] = defaultdict(list)
    inputs: Counter = Counter()
    for nodeid, t in tests.items():
        for key, value in t["properties"]:
            if key == "inputs_tried":
                inputs[nodeid.split("[")[0]] += value
            else:
                props[key].append(value)
    outcomes = Counter(t["outcome"] for t in tests.values())
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tests": {"passed": outcomes["passed"], "failed": outcomes["failed"], "skipped": outcomes["skipped"],
                  "seconds": round(sum(t["seconds"] for t in tests.values()), 1),
                  "failed_tests": sorted(n for n, t in tests.items() if t["outcome"] == "failed")},
        "isolation": {
            "service_calls_with_other_users_ids": sum(props["service_isolation_calls"]),
            "service_methods_checked": sum(props["service_methods_checked"]),
            "http_event_calls_with_other_users_ids": sum(props["http_isolation_calls"]),
            "cli_commands_checked": sum(props["cli_isolation_commands"]),
        },
        "faults": {
            "learner_kill_points_survived": [p for group in props["learner_kill_points_survived"] for p in group],
            "adapter_damage_survived": props["adapter_damage_survived"],
            "writer_process_kills": sum(props["writer_kills"]),
            "acknowledged_writes_checked_after_kill": sum(props["acknowledged_writes_checked"]),
            "web_server_kill_acknowledged_events_checked": sum(props["server_kill_acknowledged_events_checked"]),
        },
        "bad_input": {"inputs_tried": sum(inputs.values()), "by_test": dict(inputs),
                      "http_outcomes": dict(Counter(props["http_outcome"]))},
        "backup": {"backups_taken_during_writes": sum(props["backups_during_writes"])},
        "load": load,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    import pytest

    p = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "hardening.json"))
    p.add_argument("--load", default=str(REPO / "bench" / "results" / "load.json"), help="load figures to include")
    args = p.parse_args(argv)
    collector = Collector()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *[str(REPO / f) for f in FILES]], plugins=[collector])
    load_path = Path(args.load)
    load = json.loads(load_path.read_text()) if load_path.is_file() else None
    result = summarize(collector.tests, load)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tests", "isolation", "faults", "backup")}, indent=2))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
