"""`make loadtest` against the real server writes Locust's CSV and HTML report and the
throughput / latency plots (serving/loadtest_report.py)."""

from __future__ import annotations

import csv
import os
import subprocess

import pytest

from faultsense.errors import DataError
from serving.loadtest_report import plot_history, read_history
from tests.fixtures.server import REPO


def test_make_loadtest_writes_the_report_and_plots(live_server):
    # Not the outer make's variables: `make test ARGS="-k ..."` would hand its pytest ARGS
    # to `make loadtest` (MAKEFLAGS), whose ARGS go to Locust.
    outer = ("MAKEFLAGS", "MAKEOVERRIDES", "MFLAGS", "MAKELEVEL", "ARGS")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    env["FAULTSENSE_LOADTEST_SECONDS"] = "1"
    run = subprocess.run(
        ["make", "-C", str(REPO), "loadtest", f"LOADTEST_HOST={live_server.url}",
         "LOADTEST_USERS=4", "LOADTEST_TIME=6s"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    prefix = REPO / "logs" / "loadtest" / "faultsense"
    for suffix in ("_stats.csv", "_stats_history.csv", ".html", "_throughput.png", "_latency.png"):
        path = prefix.parent / (prefix.name + suffix)
        assert path.is_file() and path.stat().st_size > 0, path
    with open(f"{prefix}_stats.csv", newline="") as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    history = read_history(f"{prefix}_stats_history.csv")
    assert max(history["rps"]) > 0 and history["t"][0] == 0.0


def test_the_report_refuses_a_missing_or_empty_history_by_name(tmp_path):
    with pytest.raises(DataError, match="run Locust with --csv"):
        plot_history(tmp_path / "none")
    (tmp_path / "x_stats_history.csv").write_text(
        "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,95%,99%\n"
    )
    with pytest.raises(DataError, match="no 'Aggregated' rows"):
        plot_history(tmp_path / "x")
