"""Distributed: `trainer=ddp_cpu` runs 2 gloo processes from the Hydra CLI and reports one
set of metrics, synced across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faultsense.eval import evaluate
from tests.fixtures.data import compose_config
from tests.fixtures.model import train_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_cpu_runs_two_processes_and_reports_one_synced_set_of_metrics(
    tmp_path, synthetic_source, data_cache_dir
):
    run_dir = tmp_path / "ddp_run"
    overrides = [
        o
        for o in train_overrides(tmp_path, synthetic_source, data_cache_dir, epochs=2)
        if not o.startswith("paths.output_dir=")
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "faultsense.train",
            *overrides,
            "trainer=ddp_cpu",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # both ranks joined the group
    summaries = list(run_dir.rglob("metrics.json"))
    assert summaries == [run_dir / "metrics.json"]  # rank 0 reports, once
    summary = json.loads(summaries[0].read_text())
    # Each rank sees half of the 16 val clips; the synced confusion matrix counts all 16.
    assert sum(map(sum, summary["confusion"]["val"])) == 16
    best = Path(summary["best_ckpt_path"])
    assert best.is_file()

    # The synced metric is the whole val fold's: one process re-evaluating the best
    # checkpoint on all 16 clips gets the same F1 as the two ranks reported together.
    eval_overrides = [o for o in overrides if o.startswith(("data.", "paths."))]
    cfg = compose_config(
        "eval",
        [
            "data=synthetic",
            *eval_overrides,
            f"ckpt_path={best}",
            "trainer=cpu",
            f"paths.output_dir={tmp_path}/eval",
        ],
    )
    single = evaluate(cfg)
    assert single["val/f1_macro"] == pytest.approx(
        summary["metrics"]["val/f1_macro_best"], abs=1e-6
    )
    assert single["val/f1_macro"] == pytest.approx(single["stored/val/f1_macro"], abs=1e-6)
