"""How confident a model is: the histogram of its top probability over a split.

A run's `metrics.json` records `confidence_histogram.val` (counts of the top softmax
probability per validation clip in `bins` equal bins over [0, 1]); the server's drift
check (serving/monitor.py) compares the confidences it serves with it, binned by the same
`bin_counts`. torch is imported inside the functions: the serving HTTP processes import
this module for `bin_counts` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DEFAULT_BINS = 10


def bin_counts(values: Iterable[float], bins: int = DEFAULT_BINS) -> list[int]:
    """Counts of `values` in `bins` equal bins over [0, 1] (1.0 in the last; values
    outside [0, 1] in the end bins)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(float(v) * bins)))] += 1
    return counts


def predict_loader(model: Any, loader: Iterable[Any]) -> tuple[Any, Any]:
    """(probabilities [N, C], targets [N]) of an eval-mode `model` over a loader of
    (inputs, labels, ...) batches, on the model's device: a FaultClassifier scores what its
    loaders yield (`eval_logits`: waves or cached embeddings), another module its forward."""
    import torch

    model.eval()
    logits_of = getattr(model, "eval_logits", model)
    device = next(model.parameters()).device
    probs, targets = [], []
    with torch.inference_mode():
        for waves, labels, *_ in loader:
            probs.append(torch.softmax(logits_of(waves.to(device)).float(), dim=1).cpu())
            targets.append(labels.cpu())
    if not probs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(targets)


def confidence_histogram(model: Any, loader: Iterable[Any], bins: int = DEFAULT_BINS) -> list[int]:
    """Counts of the top probability of `model` per clip of `loader` in `bins` equal bins
    over [0, 1] (what `confidence_histogram.val` in metrics.json holds)."""
    probs, _ = predict_loader(model, loader)
    if not len(probs):
        return [0] * bins
    return bin_counts(probs.max(dim=1).values.tolist(), bins)
