"""PNG plots of a Locust run: `python -m serving.loadtest_report logs/loadtest/faultsense`.

Reads Locust's `<prefix>_stats_history.csv` (written with `--csv <prefix>`; one row per
second for the `Aggregated` entry, per endpoint too with `--csv-full-history`) and
draws, over the run's time:

- `<prefix>_throughput.png`: requests/s and failures/s, with the user count;
- `<prefix>_latency.png`: p50, p95 and p99 response time (ms).

`make loadtest` runs it after Locust, next to Locust's own HTML report.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from faultsense.errors import DataError

PERCENTILES = ("50%", "95%", "99%")


def read_history(path: str | Path) -> dict[str, list[float]]:
    """The `Aggregated` rows of a stats-history CSV as columns: seconds since the first
    row, users, rps, fails, and each of PERCENTILES (NaN where Locust wrote N/A)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run Locust with --csv first (make loadtest).")
    columns: dict[str, list[float]] = {k: [] for k in ("t", "users", "rps", "fails", *PERCENTILES)}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") != "Aggregated":
                continue
            columns["t"].append(float(row["Timestamp"]))
            columns["users"].append(float(row["User Count"]))
            columns["rps"].append(float(row["Requests/s"]))
            columns["fails"].append(float(row["Failures/s"]))
            for p in PERCENTILES:
                value = row.get(p, "")
                # N/A before the first answer; 0 while the current window has none yet.
                number = float(value) if value not in ("", "N/A") else 0.0
                columns[p].append(number if number > 0 else float("nan"))
    if not columns["t"]:
        raise DataError(f"{path} has no 'Aggregated' rows: did the load test send requests?")
    start = columns["t"][0]
    columns["t"] = [t - start for t in columns["t"]]
    return columns


def plot_history(prefix: str | Path) -> list[Path]:
    """Write the throughput and latency PNGs for Locust's CSV files at `prefix`."""
    from matplotlib.figure import Figure

    prefix = Path(prefix)
    h = read_history(f"{prefix}_stats_history.csv")
    out = []

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(h["t"], h["rps"], label="requests/s")
    ax.plot(h["t"], h["fails"], label="failures/s", color="#d62728")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("per second")
    users = ax.twinx()
    users.plot(h["t"], h["users"], color="grey", ls=":", label="users")
    users.set_ylabel("users")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("throughput and failures", fontsize=10)
    out.append(Path(f"{prefix}_throughput.png"))
    fig.savefig(out[-1], dpi=110)

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    for p in PERCENTILES:
        ax.plot(h["t"], h[p], label=f"p{p.rstrip('%')}")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("response time (ms)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("latency percentiles", fontsize=10)
    out.append(Path(f"{prefix}_latency.png"))
    fig.savefig(out[-1], dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    from faultsense.config import run_cli

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.loadtest_report LOCUST_CSV_PREFIX", file=sys.stderr)
        return 2
    for path in run_cli("loadtest-report", plot_history, args[0]):
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
