"""Scoring long recordings as the Predictor does: the whole recording, windowed, averaged.

With `data.train_hop_seconds`, a recording longer than `data.clip_seconds` becomes several
windows (rows `<id>#<k>`, data/datamodule.py `windows`), and val/test metrics count each
window as a clip. A user of the served model sends the whole recording instead: the
Predictor cuts it into windows every half clip and averages their probabilities
(faultsense/inference.py). `recording_metrics` reads each windowed recording of a split
back from its file and puts it through a Predictor over the trained net, so
`val/recording_f1_macro` and `val/recording_acc` are what serving would score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data.manifest import ManifestRow


def split_rows(caches: Sequence[Any], dataset: Any) -> list[ManifestRow]:
    """The manifest rows of a CachedWaves split over the WaveCache parts `caches`, in order."""
    return [caches[int(p)].rows[int(i)] for p, i in dataset.items]


def recordings(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """One row per source recording of windowed `rows` (id `<id>#<k>`), spanning its windows;
    [] when no row is a window (every clip is already scored whole)."""
    spans: dict[str, list[ManifestRow]] = {}
    for row in rows:
        base, sep, _ = row.id.rpartition("#")
        spans.setdefault(base if sep else row.id, []).append(row)
    if all(len(parts) == 1 and "#" not in parts[0].id for parts in spans.values()):
        return []
    out = []
    for rid, parts in spans.items():
        if len(parts) == 1 and "#" not in parts[0].id:
            out.append(parts[0])  # shorter than a clip: already whole
            continue
        start = min(p.offset for p in parts)
        end = max(p.offset + (p.length or 0.0) for p in parts)
        out.append(dataclasses.replace(parts[0], id=rid, offset=start, length=end - start))
    return out


def macro_f1(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Macro F1 over the classes present in `truth` or `pred` (torchmetrics' convention)."""
    scores = []
    for c in range(num_classes):
        tp = int(np.sum((pred == c) & (truth == c)))
        fp, fn = int(np.sum((pred == c) & (truth != c))), int(np.sum((pred != c) & (truth == c)))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def recording_metrics(
    net: Any, labels: Sequence[str], caches: Sequence[Any], dataset: Any, prefix: str
) -> dict[str, float]:
    """`{prefix}recording_f1_macro`, `{prefix}recording_acc`, `{prefix}recordings` of `net`
    (waveforms -> logits) on the windowed recordings of a CachedWaves split over `caches`
    (the datamodule's WaveCache parts), each scored whole by a Predictor; {} when the split
    has no windowed recording."""
    from .data.cache import decode_row
    from .inference import Predictor

    rows = recordings(split_rows(caches, dataset))
    if not rows:
        return {}
    sample_rate, clip_samples = int(caches[0].sample_rate), int(caches[0].clip_samples)
    meta = {"labels": list(labels), "sample_rate": sample_rate, "clip_samples": clip_samples}
    was_training = net.training
    net.eval()
    try:
        predictor = Predictor(net, meta, fast_path="eager", device=_device(net))
        results = predictor.predict([decode_row(r, sample_rate) for r in rows])
    finally:
        net.train(was_training)
    index = {label: i for i, label in enumerate(labels)}
    truth = np.array([index[r.label] for r in rows])
    pred = np.array([index[r["label"]] for r in results])
    return {
        f"{prefix}recording_f1_macro": macro_f1(truth, pred, len(labels)),
        f"{prefix}recording_acc": float(np.mean(truth == pred)),
        f"{prefix}recordings": float(len(rows)),
    }


def _device(net: Any) -> str:
    return str(next(net.parameters()).device)
