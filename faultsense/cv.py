"""Cross-validation: `faultsense-cv [train overrides]` (`make cv`).

Runs `faultsense-train -m data.val_fold=<each fold present>` as one Hydra multirun (the
test fold, when the source has it, stays held out), then aggregates the multirun directory
into a table of mean ± std per metric per model, written as `cv.md` and `cv.json` there.
Sweeping models too works: `faultsense-cv experiment=cnn_logmel,cnn_mfcc`.

`faultsense-cv --aggregate DIR` only aggregates an existing multirun directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import CONFIG_DIR
from .config import run_cli
from .errors import ConfigError, DataError, FaultSenseError
from .fileio import atomic_write

# Overrides that vary across folds/seeds and do not name a different model.
_FOLD_KEYS = ("data.val_fold", "seed")
# Metrics the table shows first (any other val/ or test/ metric follows).
_MAIN = ("val/f1_macro", "val/acc", "val/precision_macro", "val/recall_macro", "val/loss")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _model_key(summary: dict[str, Any]) -> str:
    overrides = [
        o
        for o in summary.get("overrides", [])
        if o.split("=", 1)[0].lstrip("+~") not in _FOLD_KEYS
        and o.lstrip("+~").startswith(("model", "experiment"))
    ]
    if overrides:
        return " ".join(sorted(overrides))
    choices = summary.get("choices", {})
    return f"model={choices.get('model', '?')}" + (
        f" experiment={choices['experiment']}" if choices.get("experiment") else ""
    )


def aggregate(multirun_dir: str | Path) -> dict[str, Any]:
    """Aggregate every `metrics.json` under `multirun_dir` (one per job) into
    `{"dir", "models": {key: {"n", "folds", "metrics": {name: {mean, std, values}},
    "timing": {...}}}}`, and write `cv.json` + `cv.md` into `multirun_dir`.

    std is the sample standard deviation (n-1); 0 for a single fold.
    """
    root = Path(multirun_dir)
    summaries = sorted(root.rglob("metrics.json"))
    if not summaries:
        raise DataError(f"No metrics.json under {root}: is it a faultsense-train multirun folder?")
    groups: dict[str, list[dict[str, Any]]] = {}
    for path in summaries:
        summary = json.loads(path.read_text())
        summary["job_dir"] = str(path.parent)
        groups.setdefault(_model_key(summary), []).append(summary)

    models: dict[str, Any] = {}
    for key, runs in sorted(groups.items()):
        runs.sort(key=lambda s: (s.get("val_fold") or 0, s.get("seed") or 0))
        names = sorted({n for s in runs for n in s["metrics"] if n.startswith(("val/", "test/"))})
        names = [n for n in _MAIN if n in names] + [n for n in names if n not in _MAIN]
        metrics = {}
        for name in names:
            values = [float(s["metrics"][name]) for s in runs if name in s["metrics"]]
            mean, std = _mean_std(values)
            metrics[name] = {"mean": mean, "std": std, "values": values}
        timing = [s.get("timing", {}) for s in runs]
        fit = [t["fit_seconds"] for t in timing if "fit_seconds" in t]
        rate = [t["train_clips_per_s"] for t in timing if "train_clips_per_s" in t]
        models[key] = {
            "n": len(runs),
            "folds": [s.get("val_fold") for s in runs],
            "metrics": metrics,
            "timing": {
                "fit_seconds_total": round(sum(fit), 1),
                "fit_seconds_mean": round(sum(fit) / len(fit), 1) if fit else None,
                "train_clips_per_s_mean": round(sum(rate) / len(rate), 1) if rate else None,
            },
            "jobs": [s["job_dir"] for s in runs],
        }
    report = {"dir": str(root), "models": models}
    atomic_write(root / "cv.json", json.dumps(report, indent=2))
    atomic_write(root / "cv.md", to_markdown(report))
    return report


def to_markdown(report: dict[str, Any]) -> str:
    """One row per model, one column per metric: `mean ± std` over folds."""
    models = report["models"]
    names: list[str] = []
    for entry in models.values():
        names += [n for n in entry["metrics"] if n not in names and n != "val/f1_macro_best"]
    lines = [
        f"Cross-validation over `{report['dir']}` (mean ± sample std over folds)",
        "",
        "| model | folds | " + " | ".join(names) + " | fit s/fold | clips/s |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for key, entry in models.items():
        cells = []
        for name in names:
            m = entry["metrics"].get(name)
            cells.append(f"{m['mean']:.3f} ± {m['std']:.3f}" if m else "")
        timing = entry["timing"]
        folds = ",".join(str(f) for f in entry["folds"])
        lines.append(
            f"| {key} | {folds} | "
            + " | ".join(cells)
            + f" | {timing['fit_seconds_mean']} | {timing['train_clips_per_s_mean']} |"
        )
    return "\n".join(lines) + "\n"


def cv_folds(overrides: list[str]) -> list[int]:
    """Folds to rotate as val: those the configured source holds, minus the test fold."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    # Sweeps (a,b) are for the multirun; the data config must be a single one.
    single = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=single)
    from .data.datamodule import build_datamodule

    # Prepared, not set up: the configured val_fold (replaced per job) need not exist.
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    test_fold = cfg.data.get("test_fold")
    folds = [int(f) for f in datamodule.folds_present if f and f != test_fold]
    if len(folds) < 2:
        raise DataError(
            f"Cross-validation needs at least 2 folds besides test fold {test_fold}; "
            f"the data has {list(datamodule.folds_present)}."
        )
    return folds


def run_cv(overrides: list[str], sweep_dir: str | None = None) -> dict[str, Any]:
    """Run the fold multirun as a subprocess (a fresh Hydra app), then aggregate it."""
    if any(o.split("=", 1)[0] == "data.val_fold" for o in overrides):
        raise ConfigError("faultsense-cv sets data.val_fold itself; drop that override.")
    folds = cv_folds(overrides)
    sweep_dir = sweep_dir or str(
        Path(os.environ.get("FAULTSENSE_ROOT", "."))
        / "logs"
        / "cv"
        / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    cmd = [
        sys.executable,
        "-m",
        "faultsense.train",
        "-m",
        f"data.val_fold={','.join(map(str, folds))}",
        f"hydra.sweep.dir={sweep_dir}",
        "task_name=cv",
        *overrides,
    ]
    print(f"faultsense-cv: folds {folds} -> {sweep_dir}", file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise FaultSenseError(
            f"The fold multirun failed (exit {done.returncode}); see {sweep_dir}."
        )
    report = aggregate(sweep_dir)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write(Path(sweep_dir) / "cv.json", json.dumps(report, indent=2))
    return report


def _cv_command(args: list[str]) -> dict[str, Any]:
    if args[:1] == ["--aggregate"]:
        if len(args) != 2:
            raise ConfigError("Usage: faultsense-cv --aggregate MULTIRUN_DIR")
        return aggregate(args[1])
    sweep_dir = None
    for a in args:
        if a.startswith("hydra.sweep.dir="):
            sweep_dir = a.split("=", 1)[1]
    return run_cv([a for a in args if not a.startswith("hydra.sweep.dir=")], sweep_dir)


def main(argv: list[str] | None = None) -> None:
    """`faultsense-cv [overrides]` or `faultsense-cv --aggregate DIR`: prints the table."""
    args = list(sys.argv[1:] if argv is None else argv)
    report = run_cli("faultsense-cv", _cv_command, args)
    print(to_markdown(report))
    print(f"written: {Path(report['dir']) / 'cv.md'}, {Path(report['dir']) / 'cv.json'}")


if __name__ == "__main__":
    main()
