"""Cost of a FaultNet on one CPU core: params, FLOPs and ms per clip at batch 1 and 32,
plus the cost of each training-time augmentation on a batch of 32.

    uv run --frozen python experiments/bench_model.py                      # default model
    uv run --frozen python experiments/bench_model.py experiment=cnn_mfcc  # any train overrides
    uv run --frozen python experiments/bench_model.py --json logs/bench_model.json

FLOPs come from torch.utils.flop_counter (convolutions and matmuls, the mel filterbank
included; the FFT itself is not counted). Timings are medians of repeated runs with
torch.set_num_threads(1) in inference mode: they move with machine load, so compare
figures taken back to back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from timing import median_seconds
from torch.utils.flop_counter import FlopCounterMode

from faultsense import CONFIG_DIR
from faultsense.models.classifier import FaultClassifier
from faultsense.models.frontend import SpecAugment, WaveAugment


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    sample_rate = int(cfg.data.sample_rate)
    clip = int(sample_rate * cfg.data.clip_seconds)
    model = FaultClassifier(
        **{k: v for k, v in cfg.model.items() if k != "_target_"},
        sample_rate=sample_rate,
        clip_samples=clip,
    )
    net = model.net.eval()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    waves = torch.randn(32, clip) * 0.1

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(waves[:1])
    result = {
        "model": f"{cfg.model.net.frontend.kind} + {cfg.model.net.backbone._target_.rsplit('.', 1)[-1]}",
        "overrides": args.overrides,
        "params": sum(p.numel() for p in net.parameters()),
        "mflops_per_clip": round(counter.get_total_flops() / 1e6, 1),
        "clip_seconds": float(cfg.data.clip_seconds),
        "threads": 1,
    }
    with torch.inference_mode():
        for batch in (1, 32):
            x = waves[:batch]
            sec = median_seconds(lambda x=x: net(x), args.repeats)
            result[f"ms_per_clip_batch{batch}"] = round(1000 * sec / batch, 3)
        sec = median_seconds(lambda: net.frontend.features(waves), args.repeats)
        result["frontend_ms_per_clip_batch32"] = round(1000 * sec / 32, 3)

    # Augmentations run on the training batch (not in serving): cost per batch of 32.
    augment = {
        "gain+shift+noise (default)": WaveAugment(sample_rate=sample_rate).train(),
        "speed 0.9-1.1": WaveAugment(0, 0, 0, speed=(0.9, 1.1), sample_rate=sample_rate).train(),
        "pitch ±2 semitones": WaveAugment(
            0, 0, 0, pitch_semitones=2.0, pitch_p=1.0, sample_rate=sample_rate
        ).train(),
    }
    feats = net.frontend.features(waves)
    costs = {name: median_seconds(lambda m=m: m(waves), 3, 1) for name, m in augment.items()}
    if feats.dim() == 4:  # SpecAugment masks spectrogram-like features, not waveforms
        costs["specaugment 2f+2t"] = median_seconds(lambda: SpecAugment().train()(feats), 5)
    result["augment_ms_per_batch32"] = {k: round(1000 * v, 1) for k, v in costs.items()}

    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
