"""The current model's training report for the app's Insights tab (`GET /insights`).

Everything is read from what training already leaves behind, found through the bundle's
own resolved config (trusted: it was written by the registry, never by a request):

- class distribution per split: the data manifest (`config.data.manifest_path`), split by
  `config.data.val_fold` / `test_fold` (uploads, fold 0, join train);
- training curves: the CSV log every run keeps beside its chosen logger, at the path the
  bundle records (`training_log.metrics_csv`; bundles from before that record: the last
  `<paths.output_dir>/csv/version_*/metrics.csv`);
- confusion matrices: the run's `metrics.json` (`confusion: {val, test}`).

Missing pieces (a run folder deleted or on another machine) are left out, not errors;
`missing` lists them with the reason so the UI can say so.
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


def curves_file(meta: Mapping[str, Any]) -> Path | None:
    """The bundle's recorded curves log, else the newest CSV log under its run folder."""
    recorded = _get(meta, "training_log.metrics_csv")
    if recorded:
        return Path(recorded)
    run_dir = _get(meta, "config.paths.output_dir")
    if not run_dir:
        return None
    logs = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def training_curves(metrics_csv: Path) -> dict[str, list[list[float]]]:
    """{metric: [[epoch, value], ...]} from a Lightning CSV log (metrics.csv)."""
    curves: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as f:
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
    # After fit, training re-validates (and tests) the best checkpoint at epoch = the
    # number of epochs: that is the kept model's score, not one more training epoch.
    last = max(curves.get("train/loss", {}), default=None)
    return {
        name: [[float(e), v] for e, v in sorted(points.items()) if last is None or e <= last][
            -MAX_CURVE_POINTS:
        ]
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

    run_dir = _get(meta, "training_log.run_dir") or _get(config, "paths.output_dir")
    run = Path(run_dir) if run_dir else None
    log_file = curves_file(meta)
    curves = training_curves(log_file) if log_file and log_file.is_file() else {}
    if curves:
        report["curves"] = curves
    else:
        missing["curves"] = f"no training log at {log_file or run_dir} (deleted or moved?)"

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
