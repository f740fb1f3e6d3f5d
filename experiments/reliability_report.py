"""Reliability figures: run the hostile-input, fault-injection and load-with-change tests
and print what they tried and what happened (the tables in experiments/reliability.md).

    uv run --frozen python experiments/reliability_report.py            # runs the tests
    uv run --frozen python experiments/reliability_report.py --log X    # only summarize X

The tests append one JSON line per figure to $FAULTSENSE_RELIABILITY_LOG
(`tests/hostile.py` `record`); this script sets it, runs pytest, and aggregates. It
asserts nothing; the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_hostile_inputs.py",
    "tests/test_fault_injection.py",
    "tests/test_load_with_change.py",
]


def run_tests(log: Path) -> int:
    env = {**os.environ, "FAULTSENSE_RELIABILITY_LOG": str(log)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    print("$", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def summarize(log: Path) -> None:
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    hostile = [e for e in events if e["event"] == "hostile"]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for e in hostile:
        by_kind[e["kind"]][e["outcome"]] += e["n"]
    total = Counter()
    print("\n## Hostile inputs (catalog twice + hypothesis-drawn /predict and /upload bodies)\n")
    print("| kind | requests | 4xx | 2xx (legal audio) | 5xx |")
    print("|---|---:|---:|---:|---:|")
    for kind in sorted(by_kind):
        c = by_kind[kind]
        total += c
        print(f"| {kind} | {sum(c.values())} | {c['4xx']} | {c['2xx']} | {c['5xx']} |")
    print(
        f"| **all** | **{sum(total.values())}** | **{total['4xx']}** | **{total['2xx']}** "
        f"| **{total['5xx']}** |"
    )
    by_route = Counter()
    for e in hostile:
        by_route[e["route"]] += e["n"]
    print("\nby route: " + ", ".join(f"/{r} {n}" for r, n in sorted(by_route.items())))
    for e in events:
        if e["event"] == "rss":
            delta = (e["after"] - e["before"]) / 2**20
            print(
                f"server process-tree RSS over the second catalog pass: "
                f"{e['before'] / 2**20:.0f} MiB -> {e['after'] / 2**20:.0f} MiB ({delta:+.0f} MiB)"
            )

    print("\n## Fault injection\n")
    print("| fault | state it left |")
    print("|---|---|")
    for e in events:
        if e["event"] == "fault":
            print(f"| {e['point']} | {e['state']} |")

    print("\n## Load with change\n")
    for e in events:
        if e["event"] == "load":
            print(
                f"{e['requests']} /predict requests at concurrency {e['concurrency']} over "
                f"{e['seconds']} s; failed: {e['failures']}; named a version not current "
                f"then: {e['wrong_version']}; versions served: {e['versions']}; promote at "
                f"+{e['promote_after_s']} s, rollback at +{e['rollback_after_s']} s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="summarize this log instead of running")
    args = parser.parse_args()
    if args.log:
        summarize(args.log)
        return
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "reliability.jsonl"
        log.touch()
        rc = run_tests(log)
        summarize(log)
    print(f"\npytest exit code: {rc}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
