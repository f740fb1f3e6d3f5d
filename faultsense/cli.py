"""`faultsense`: classify audio files and manage the model registry from a shell.

    faultsense predict pump.wav fan.flac [--json] [--registry DIR] [--version V]
    faultsense models list [--json]
    faultsense models promote v3 [--reason "better f1"]
    faultsense models rollback [v2] [--reason "v3 misfires on pumps"]

The registry defaults to `$FAULTSENSE_ROOT/models` (or `./models`). Every FaultSenseError
(bad audio, unknown version, tampered bundle, ...) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import run_cli
from .registry import Registry, default_registry_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faultsense", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def registry_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            type=Path,
            default=None,
            help=f"registry folder (default: {default_registry_dir()})",
        )

    predict = sub.add_parser("predict", help="classify audio files")
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE")
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.add_argument("--version", help="bundle version (default: the current one)")
    predict.add_argument(
        "--windows", action="store_true", help="also print per-window results of long clips"
    )
    registry_arg(predict)

    models = sub.add_parser("models", help="list, promote or roll back model versions")
    msub = models.add_subparsers(dest="action", required=True)
    listing = msub.add_parser("list", help="registered versions and the current one")
    listing.add_argument("--json", action="store_true")
    registry_arg(listing)
    promote = msub.add_parser("promote", help="make a version current")
    promote.add_argument("version")
    promote.add_argument("--reason", default="promoted from the CLI")
    registry_arg(promote)
    rollback = msub.add_parser(
        "rollback", help="go back to the previously promoted version, or to VERSION"
    )
    rollback.add_argument("version", nargs="?")
    rollback.add_argument("--reason", default="rolled back from the CLI")
    registry_arg(rollback)
    return parser


def _predict(args: argparse.Namespace) -> None:
    from .audio import decode
    from .inference import Predictor

    predictor = Predictor.from_registry(args.registry, args.version)
    # Decode every file first: a bad file fails the command before any output.
    waves = [decode(path, sample_rate=predictor.sample_rate) for path in args.files]
    results = predictor.predict(waves, names=[str(p) for p in args.files])
    if args.json:
        rows = [{"file": str(path), **r} for path, r in zip(args.files, results, strict=True)]
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for path, r in zip(args.files, results, strict=True):
        probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
        print(
            f"{path}: {r['label']} (confidence {r['confidence']:.3f}, model {r['version']}, "
            f"{r['duration_s']:.2f} s)\n  {probs}"
        )
        if args.windows and len(r["windows"]) > 1:
            for w in r["windows"]:
                print(
                    f"  [{w['start_s']:7.2f}-{w['end_s']:7.2f} s] {w['label']} {w['confidence']:.3f}"
                )


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    keys = ("val/f1_macro", "val/acc", "test/f1_macro", "test/acc")
    return "  ".join(
        f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), int | float)
    )


def model_rows(registry: Registry) -> list[dict[str, Any]]:
    """`registry.list()` rows with each version's `backbone` (short class name from
    `net_spec.backbone._target_`) and `labels` (its bundle's, in class order)."""
    rows = registry.list()
    for row in rows:
        if "error" in row:
            continue
        meta = registry.get(row["version"]).meta
        target = str(((meta.get("net_spec") or {}).get("backbone") or {}).get("_target_") or "?")
        row["backbone"] = target.rsplit(".", 1)[-1]
        row["labels"] = list(meta.get("labels") or [])
    return rows


def _models(args: argparse.Namespace) -> None:
    registry = Registry(args.registry)
    if args.action == "promote":
        print(f"current: {registry.promote(args.version, reason=args.reason)}")
    elif args.action == "rollback":
        print(f"current: {registry.rollback(args.version, reason=args.reason)}")
    elif args.json:
        doc = {
            "current": registry.current_version(),
            "versions": model_rows(registry),
            "history": registry.history(),
        }
        print(json.dumps(doc, indent=2))
    else:
        rows = model_rows(registry)
        if not rows:
            print(f"no models registered in {registry.root}")
            return
        for row in rows:
            mark = "*" if row["current"] else " "
            if "error" in row:
                print(f"{mark} {row['version']:<5} BROKEN: {row['error']}")
                continue
            parent = row.get("parent_version") or "-"
            print(
                f"{mark} {row['version']:<5} {row.get('created_at') or '?':<26} "
                f"parent {parent:<5} {row['backbone']:<14} {len(row['labels'])} labels  "
                f"{_fmt_metrics(row.get('metrics') or {})}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, or EXIT_USER_ERROR after printing
    `faultsense: Type: message` for a FaultSenseError)."""
    args = _parser().parse_args(argv)
    command = _predict if args.command == "predict" else _models
    try:
        run_cli("faultsense", command, args)
    except SystemExit as stop:  # the user error, already printed: a status for the caller
        return int(stop.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
