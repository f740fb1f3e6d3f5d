"""Multiruns: separate runs per job, the CV aggregator's table, an Optuna sweep, faultsense-cv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faultsense.cv import aggregate, to_markdown
from faultsense.errors import DataError
from tests.fixtures.model import train_overrides

ROOT = Path(__file__).resolve().parents[1]


def cli_overrides(tmp_path, synthetic_source, data_cache_dir, epochs):
    """Smoke-training overrides for a CLI run (Hydra owns the output dirs)."""
    return [
        o
        for o in train_overrides(tmp_path, synthetic_source, data_cache_dir, epochs=epochs)
        if not o.startswith("paths.output_dir=")
    ]


def run(args, timeout=600):
    out = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def test_two_job_multirun_gives_two_runs_and_the_aggregated_table(
    tmp_path, synthetic_source, data_cache_dir
):
    sweep = tmp_path / "multirun"
    overrides = cli_overrides(tmp_path, synthetic_source, data_cache_dir, epochs=2)
    run(["faultsense.train", "-m", *overrides, "data.val_fold=2,3", f"hydra.sweep.dir={sweep}"])
    summaries = sorted(sweep.glob("*/metrics.json"))
    assert len(summaries) == 2
    jobs = [json.loads(p.read_text()) for p in summaries]
    assert sorted(j["val_fold"] for j in jobs) == [2, 3]
    assert jobs[0]["best_ckpt_path"] != jobs[1]["best_ckpt_path"]  # separate runs
    assert all(Path(j["best_ckpt_path"]).is_file() for j in jobs)

    report = aggregate(sweep)
    (entry,) = report["models"].values()
    assert entry["n"] == 2 and entry["folds"] == [2, 3]
    f1 = [j["metrics"]["val/f1_macro"] for j in sorted(jobs, key=lambda j: j["val_fold"])]
    assert entry["metrics"]["val/f1_macro"]["values"] == f1
    assert entry["metrics"]["val/f1_macro"]["mean"] == pytest.approx(sum(f1) / 2)
    table = (sweep / "cv.md").read_text()
    assert f"{sum(f1) / 2:.3f} ± " in table
    assert json.loads((sweep / "cv.json").read_text())["models"].keys() == report["models"].keys()


def write_job(path: Path, overrides: list[str], fold: int, f1: float) -> None:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(
        json.dumps(
            {
                "metrics": {"val/f1_macro": f1, "val/acc": f1 - 0.01},
                "val_fold": fold,
                "overrides": [*overrides, f"data.val_fold={fold}"],
                "choices": {"model": "cnn"},
                "timing": {"fit_seconds": 10.0, "train_clips_per_s": 50.0},
            }
        )
    )


def test_aggregator_groups_jobs_by_model_with_mean_and_sample_std(tmp_path):
    for i, (fold, f1) in enumerate([(1, 0.8), (2, 0.9), (3, 0.7)]):
        write_job(tmp_path / str(i), ["experiment=cnn_logmel", "seed=1"], fold, f1)
    for i, (fold, f1) in enumerate([(1, 0.6), (2, 0.6)]):
        write_job(tmp_path / str(10 + i), ["experiment=cnn_mfcc"], fold, f1)
    report = aggregate(tmp_path)
    logmel = report["models"]["experiment=cnn_logmel"]["metrics"]["val/f1_macro"]
    assert logmel["mean"] == pytest.approx(0.8) and logmel["std"] == pytest.approx(0.1)
    mfcc = report["models"]["experiment=cnn_mfcc"]
    assert mfcc["n"] == 2 and mfcc["metrics"]["val/f1_macro"]["std"] == pytest.approx(0.0)
    table = to_markdown(report)
    assert "| experiment=cnn_logmel | 1,2,3 | 0.800 ± 0.100 |" in table
    with pytest.raises(DataError, match="No metrics.json"):
        aggregate(tmp_path / "empty")


def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path, synthetic_source, data_cache_dir):
    sweep = tmp_path / "optuna"
    overrides = cli_overrides(tmp_path, synthetic_source, data_cache_dir, epochs=1)
    run(
        [
            "faultsense.train",
            "-m",
            "hparams_search=cnn_optuna",
            *overrides,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(trials) == 2
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # The reported best is the best trial: its metric, and the parameters it ran with
    # (with a tie, the parameters of one of the tied trials).
    best_value = max(t["metrics"]["val/f1_macro_best"] for t in trials)
    assert results["best_value"] == pytest.approx(best_value)
    assert set(results["best_params"]) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.label_smoothing",
        "model.augment.mixup_alpha",
        "model.augment.mixup_p",
        "model.net.backbone.dropout",
        "model.net.head.dropout",
    }
    tied = [t for t in trials if t["metrics"]["val/f1_macro_best"] == pytest.approx(best_value)]
    ran_with = [dict(o.split("=", 1) for o in t["overrides"]) for t in tied]
    assert any(
        all(float(r[k]) == pytest.approx(float(v)) for k, v in results["best_params"].items())
        for r in ran_with
    ), (results["best_params"], ran_with)


def test_faultsense_cv_rotates_every_fold_present_except_the_test_fold(
    tmp_path, synthetic_source, data_cache_dir
):
    out_dir = tmp_path / "cv"
    overrides = cli_overrides(tmp_path, synthetic_source, data_cache_dir, epochs=1)
    out = run(["faultsense.cv", *overrides, f"hydra.sweep.dir={out_dir}"])
    report = json.loads((out_dir / "cv.json").read_text())
    (entry,) = report["models"].values()
    assert entry["folds"] == [1, 2, 3, 4]  # fold 5 is the test fold: held out
    assert "val/f1_macro" in entry["metrics"] and "test/f1_macro" in entry["metrics"]
    assert "± " in out.stdout and (out_dir / "cv.md").is_file()
