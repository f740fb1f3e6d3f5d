"""`faultsense-data`: prepare the manifest + waveform cache and print clip counts per label
and per fold, then the split table: clips (and recordings) per label in train, val and
test, with a warning for a label missing from a split, a share far off train's, or a
recording in two splits. e.g. `faultsense-data data.source=../shared/datasets/esc50-16k`,
`faultsense-data data=folder data.source=DIR 'data.group_by="(.*)_[0-9]+"'`."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import hydra
from omegaconf import DictConfig

from . import CONFIG_DIR
from .config import run_cli
from .data.manifest import AUX_ONLY
from .data.splits import SPLITS, SplitTable, split_table

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate `cfg.data`, run prepare_data + setup, return a summary (counts per label/fold)."""
    from .data.datamodule import prepared_datamodule

    start = time.perf_counter()
    dm = prepared_datamodule(cfg.data)
    rows = [r for c in dm.caches for r in c.rows]
    stats = dm.stats
    return {
        "root": str(stats.root) if stats else None,
        "source_clips": stats.clips if stats else 0,
        "mapped": stats.mapped if stats else 0,
        "uploads": sum(r.source == "upload" for r in rows),
        "skipped": [s["path"] for c in dm.caches for s in c.skipped]
        + (stats.skipped if stats else []),
        "counts": Counter((r.label, r.fold) for r in rows),
        "labels": dm.labels,
        "folds": sorted({r.fold for r in rows}),
        "splits": {
            "train": len(dm.train_set or ()),
            "val": len(dm.val_set or ()),
            "test": len(dm.test_set or ()),
        },
        "split_table": split_table(
            rows, dm.labels, dm.val_fold, dm.test_fold if dm.has_test else None
        ),
        "val_fold": dm.val_fold,
        "test_fold": dm.test_fold,
        "has_test": dm.has_test,
        "manifest": str(dm.manifest_path),
        "caches": [str(c.path) for c in dm.caches],
        "fingerprint": dm.fingerprint,
        "mapping_unmapped": (dm.mapping or {}).get("unmapped"),
        "seconds": time.perf_counter() - start,
    }


def report(summary: dict[str, Any]) -> str:
    """The summary as text: a label x fold table plus where things were written."""
    folds = summary["folds"]
    heads = [("uploads" if f == 0 else f"fold {f}") for f in folds]
    width = max(len(label) for label in [*summary["labels"], "(aux only)"]) + 2
    lines = [
        f"source: {summary['root']}",
        f"clips in source: {summary['source_clips']}, mapped: {summary['mapped']} "
        f"(unmapped: {summary['mapping_unmapped']}), uploads: {summary['uploads']}",
        "",
        "label".ljust(width) + "".join(h.rjust(9) for h in heads) + "total".rjust(9),
    ]
    counts = summary["counts"]
    shown = list(summary["labels"])
    if any(label == AUX_ONLY for label, _ in counts):
        shown.append(AUX_ONLY)  # unmapped: aux (category head only)
    for label in shown:
        per_fold = [counts.get((label, f), 0) for f in folds]
        name = label or "(aux only)"
        lines.append(
            name.ljust(width) + "".join(f"{n:9d}" for n in per_fold) + f"{sum(per_fold):9d}"
        )
    totals = [sum(counts.get((label, f), 0) for label in shown) for f in folds]
    lines.append("total".ljust(width) + "".join(f"{n:9d}" for n in totals) + f"{sum(totals):9d}")
    s = summary["splits"]
    test = (
        f"test (fold {summary['test_fold']}) {s['test']}" if summary["has_test"] else "no test fold"
    )
    lines += [
        "",
        f"splits: train {s['train']}, val (fold {summary['val_fold']}) {s['val']}, {test}",
        *split_lines(summary["split_table"], width),
        f"manifest: {summary['manifest']}",
        "cache: " + ", ".join(summary["caches"]),
        f"fingerprint: {summary['fingerprint'][:16]}",
        f"done in {summary['seconds']:.1f} s",
    ]
    if summary["skipped"]:
        lines.append(
            f"skipped {len(summary['skipped'])} bad clip(s): " + ", ".join(summary["skipped"])
        )
    return "\n".join(lines)


def split_lines(table: SplitTable, width: int) -> list[str]:
    """The split table: clips (recordings) per label per split, then its warnings."""
    width = max(width, len("clips (recordings)") + 2)
    lines = ["", "clips (recordings)".ljust(width) + "".join(s.rjust(14) for s in SPLITS)]
    for label in table.labels:
        cells = [f"{table.clips[label, s]} ({len(table.groups[label, s])})" for s in SPLITS]
        lines.append(label.ljust(width) + "".join(c.rjust(14) for c in cells))
    for warning in table.warnings:
        log.warning("split: %s", warning)
        lines.append(f"warning: {warning}")
    return lines


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    print(report(run_cli("faultsense-data", prepare, cfg)))


if __name__ == "__main__":
    main()
