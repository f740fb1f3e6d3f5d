"""A retrain job leaves metrics.json in its run folder in the shape training writes, with
the registered net's confusion matrices and validation confidence histogram: the new
bundle then has an Insights report and a drift reference like a trained one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faultsense.confidence import bin_counts, confidence_histogram
from faultsense.registry import Registry
from serving.insights import training_report
from serving.monitor import reference_for
from tests.fixtures.data import compose_config
from tests.fixtures.model import train_overrides


def test_bin_counts_puts_edges_in_the_end_bins():
    assert bin_counts([0.0, 0.05, 0.1, 0.55, 0.999, 1.0], bins=10) == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bin_counts([], bins=4) == [0, 0, 0, 0]


def test_confidence_histogram_counts_each_clips_top_probability():
    """Two-class logits equal to the input: [8, 0] is sure (top ~1.0), [0, 0] a coin flip
    (top 0.5), [0, ln 3] says 0.75."""
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    waves = torch.tensor([[8.0, 0.0], [0.0, 0.0], [0.0, float(torch.log(torch.tensor(3.0)))]])
    loader = [(waves[:2], torch.tensor([0, 1])), (waves[2:], torch.tensor([1]))]
    assert confidence_histogram(model, loader, bins=4) == [0, 0, 1, 2]
    assert confidence_histogram(model, [], bins=4) == [0, 0, 0, 0]


@pytest.mark.timeout(300)
def test_a_retrain_job_writes_metrics_json_like_training(
    trained_registry_copy, smoke_checkpoint, tmp_path, synthetic_source, data_cache_dir
):
    from faultsense.retrain import retrain

    root = tmp_path / "job"
    cfg = compose_config(
        "retrain",
        train_overrides(root, synthetic_source, data_cache_dir)
        + [f"paths.registry_dir={trained_registry_copy}", f"job_dir={root / 'job'}", "epochs=1",
           f"paths.uploads_dir={root / 'uploads'}", "force=true"],
    )  # fmt: skip
    result = retrain(cfg)
    summary = json.loads((root / "run" / "metrics.json").read_text())
    trained_cfg = smoke_checkpoint[2]
    trained = json.loads((Path(trained_cfg.paths.output_dir) / "metrics.json").read_text())
    assert set(trained) - {"confidence_histogram"} <= set(summary)  # training's shape
    assert summary["version"] == result["version"] and summary["labels"] == trained["labels"]
    assert summary["metrics"] == pytest.approx(result["metrics"])
    assert summary["timing"]["epochs"] == 1 and summary["timing"]["train_clips"] > 0

    labels = summary["labels"]
    val, test = summary["confusion"]["val"], summary["confusion"]["test"]
    assert len(val) == len(test) == len(labels) and all(len(r) == len(labels) for r in val)
    val_clips = sum(map(sum, val))
    # The matrices are the registered net's: its recorded accuracy is their diagonal.
    accuracy = sum(test[i][i] for i in range(len(labels))) / sum(map(sum, test))
    assert accuracy == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)
    histogram = summary["confidence_histogram"]["val"]
    assert len(histogram) == 10 and sum(histogram) == val_clips > 0

    meta = Registry(trained_registry_copy).get(result["version"]).meta
    reference = reference_for(meta)
    assert reference["source"].startswith("val predictions")
    assert reference["confidence"] == histogram
    report = training_report(meta)
    assert "confusion_matrix" not in (report.get("missing") or {}), report.get("missing")
    assert report["confusion_matrix"]["matrix"] == test
