"""The current model's training report for the app's Insights tab (`GET /insights`).

Everything is read from what training already leaves behind, found through the bundle's
own resolved config (trusted: it was written by the registry, never by a request):

- class distribution per split: the data manifest (`config.data.manifest_path`), split by
  `config.data.val_fold` / `test_fold` (uploads, fold 0, join train);
- training curves: the run's CSV log (`<paths.output_dir>/csv/version_*/metrics.csv`);
- confusion matrices: the run's `metrics.json` (`confusion: {val, test}`).

Missing pieces (e.g. a run trained with `logger=wandb` has no CSV log) are left out, not
errors; `missing` lists them with the reason so the UI can say so.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CURVE_PREFIXES = ("train/loss", "val/loss", "val/acc", "val/f1_macro")
MAX_CURVE_POINTS = 1000


def _get(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def class_distribution(manifest: Path, val_fold: Any, test_fold: Any) -> dict[str, dict[str, int]]:
    """{split: {label: clips}} from a manifest CSV (columns include `label`, `fold`)."""
    splits: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            try:
                fold = int(row.get("fold") or 0)
            except ValueError:
                continue
            split = "val" if fold == val_fold else "test" if fold == test_fold else "train"
            label = row.get("label")
            if not label:  # kept by `unmapped: aux` for the category head: no fault label
                continue
            splits[split][label] = splits[split].get(label, 0) + 1
    return {k: v for k, v in splits.items() if v}


def training_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """{metric: [[epoch, value], ...]} from the run's Lightning CSV log (last version)."""
    logs = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return {}
    curves: dict[str, dict[int, float]] = {}
    with open(logs[-1], newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if not epoch:
                continue
            for name in CURVE_PREFIXES:
                value = row.get(name)
                if value not in (None, ""):
                    number = float(value)
                    if math.isfinite(number):
                        curves.setdefault(name, {})[int(float(epoch))] = number
    return {
        name: [[float(e), v] for e, v in sorted(points.items())][-MAX_CURVE_POINTS:]
        for name, points in curves.items()
    }


def per_label_metrics(matrix: list[list[float]], labels: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label from a confusion matrix (rows = true)."""
    out = {}
    for i, label in enumerate(labels):
        tp = float(matrix[i][i])
        support = float(sum(matrix[i]))
        predicted = float(sum(row[i] for row in matrix))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return out


def training_report(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The Insights payload for one bundle's metadata (`bundle.json`)."""
    config = meta.get("config") or {}
    labels = list(meta.get("labels") or [])
    report: dict[str, Any] = {"version": meta.get("version"), "metrics": meta.get("metrics") or {}}
    missing: dict[str, str] = {}

    manifest = _get(config, "data.manifest_path")
    if manifest and Path(manifest).is_file():
        report["dataset"] = class_distribution(
            Path(manifest), _get(config, "data.val_fold"), _get(config, "data.test_fold")
        )
    else:
        missing["dataset"] = f"no data manifest at {manifest}"

    run_dir = _get(config, "paths.output_dir")
    run = Path(run_dir) if run_dir else None
    curves = training_curves(run) if run and run.is_dir() else {}
    if curves:
        report["curves"] = curves
    else:
        missing["curves"] = f"no CSV training log under {run_dir} (train with logger=csv)"

    summary: dict[str, Any] = {}
    if run and (run / "metrics.json").is_file():
        summary = json.loads((run / "metrics.json").read_text())
    confusion = summary.get("confusion") or {}
    split = "test" if confusion.get("test") else "val"
    if confusion.get(split):
        labels = list(summary.get("labels") or labels)
        report["confusion_matrix"] = {"split": split, "labels": labels, "matrix": confusion[split]}
        report["per_label"] = per_label_metrics(confusion[split], labels)
    else:
        missing["confusion_matrix"] = f"no confusion matrix in {run_dir}/metrics.json"
    report["missing"] = missing
    return report
