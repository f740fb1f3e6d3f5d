"""ONNX Runtime serving path against torch: parity on real clips, and speed, in one run.

Loads the registry's current model twice, `Predictor(runtime="torch")` (the traced graph)
and `Predictor(runtime="onnx")` (frontend in torch, backbone + head in ONNX Runtime;
faultsense/onnx_export.py), then

- parity: every audio file under `--audio` (default: the 1,600 ESC-50 development clips)
  through both, in batches of 32: label agreement and the max |probability difference|;
- speed: clips/s of each on one thread at batch 1 and batch 32, the runtimes interleaved
  round by round (a shared box drifts; the ratio within a round is what counts).

    uv run --frozen python experiments/onnx_parity.py --registry /tmp/lt/models
    uv run --frozen python experiments/onnx_parity.py --registry models --limit 200 --rounds 5

Asserts nothing; prints a summary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def load_clips(audio_dir: Path, sample_rate: int, limit: int | None) -> list[np.ndarray]:
    """Every audio file under `audio_dir` (sorted), decoded at `sample_rate`."""
    from faultsense.audio import decode

    files = sorted(p for p in audio_dir.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    return [decode(p, sample_rate=sample_rate) for p in files[:limit]]


def parity(torch_pred, onnx_pred, clips: list[np.ndarray], batch: int = 32) -> dict:
    """Labels that differ and the max |probability difference| over all clips."""
    differ, worst = 0, 0.0
    for lo in range(0, len(clips), batch):
        part = clips[lo : lo + batch]
        for a, b in zip(torch_pred.predict(part), onnx_pred.predict(part), strict=True):
            differ += a["label"] != b["label"]
            diff = max(
                abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]
            )
            worst = max(worst, diff)
    return {"clips": len(clips), "labels_differ": differ, "max_prob_diff": worst}


def rate(predictor, clips: list[np.ndarray], seconds: float) -> float:
    """clips/s of `predictor.predict(clips)` repeated for `seconds` (after one warm call)."""
    predictor.predict(clips)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.predict(clips)
        done += len(clips)
    return done / (time.perf_counter() - started)


def speed(predictors: dict, clips: list[np.ndarray], rounds: int, seconds: float) -> None:
    """Print clips/s per runtime and batch size, interleaved, and the onnx/torch ratios."""
    for batch in (1, 32):
        part = (clips * (batch // len(clips) + 1))[:batch]
        rates: dict[str, list[float]] = {name: [] for name in predictors}
        for _ in range(rounds):
            for name, predictor in predictors.items():
                rates[name].append(rate(predictor, part, seconds))
        ratios = [o / t for o, t in zip(rates["onnx"], rates["torch"], strict=True)]
        cells = ", ".join(
            f"{name} {statistics.median(r):.0f} ({' '.join(f'{x:.0f}' for x in r)})"
            for name, r in rates.items()
        )
        print(
            f"batch {batch:>2}: clips/s {cells}; onnx/torch per round "
            f"{' '.join(f'{x:.2f}' for x in ratios)}, median {statistics.median(ratios):.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--audio", type=Path, default=ROOT.parent / "shared/datasets/esc50-16k/audio"
    )
    parser.add_argument("--limit", type=int, help="only the first N clips (sorted by path)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per runtime, batch, round")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()

    import os

    import torch

    from faultsense.inference import Predictor

    torch.set_num_threads(1)  # as in a serving worker (server.torch_threads)
    with tempfile.TemporaryDirectory() as cache:
        predictors = {
            "torch": Predictor.from_registry(args.registry),
            "onnx": Predictor.from_registry(args.registry, runtime="onnx", onnx_cache=cache),
        }
        assert predictors["onnx"].runtime == "onnx", "the model did not export (see the log)"
        model = predictors["torch"]
        print(f"model {model.version} from {args.registry}, load {os.getloadavg()[0]:.1f}")
        if args.skip_parity:
            clips = [np.random.default_rng(0).normal(0, 0.1, model.clip_samples).astype(np.float32)]
        else:
            clips = load_clips(args.audio, model.sample_rate, args.limit)
            print(
                f"parity on {args.audio}: {parity(predictors['torch'], predictors['onnx'], clips)}"
            )
        speed(predictors, clips[:32], args.rounds, args.seconds)
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
