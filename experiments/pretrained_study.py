"""Per-fold table of CV runs of the pretrained-encoder study (issue 13): each fold's val
macro F1 and accuracy (best checkpoint, from `metrics.json`) and, for distilled runs, the
teacher's (frozen YAMNet + head trained inside the run on its training folds, last epoch,
from `teacher.json`).

    uv run --frozen python experiments/pretrained_study.py logs/cv/accurate logs/cv/distill \\
        --json logs/pretrained_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def fold_rows(sweep_dir: Path) -> list[dict]:
    """One dict per finished fold job under a multirun folder (val fold, metrics, teacher's)."""
    rows = []
    for summary in sorted(sweep_dir.glob("*/metrics.json")):
        data = json.loads(summary.read_text())
        teacher = summary.with_name("teacher.json")
        rows.append(
            {
                "val_fold": data.get("val_fold"),
                "f1": data["metrics"].get("val/f1_macro"),
                "acc": data["metrics"].get("val/acc"),
                "fit_s": data["timing"]["fit_seconds"],
                "teacher_f1": json.loads(teacher.read_text())["metrics"].get("val/f1_macro")
                if teacher.exists()
                else None,
            }
        )
    return rows


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    study = {}
    for sweep in args.sweeps:
        rows = fold_rows(sweep)
        study[str(sweep)] = rows
        folds = " / ".join(f"{r['val_fold']}: {r['f1']:.3f}" for r in rows)
        print(f"{sweep}: macro F1 {mean_std([r['f1'] for r in rows])} [{folds}]")
        print(f"    acc {mean_std([r['acc'] for r in rows])}")
        if any(r["teacher_f1"] is not None for r in rows):
            print(f"    teacher macro F1 {mean_std([r['teacher_f1'] for r in rows])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(study, indent=2))


if __name__ == "__main__":
    main()
