"""Predictor latency (batch 1) and throughput (batch 32) on ONE CPU core.

    uv run --frozen python experiments/bench_predict.py                 # default CNN, untrained
    uv run --frozen python experiments/bench_predict.py --registry models [--version v3]
    uv run --frozen python experiments/bench_predict.py --compile       # also time torch.compile

Times the raw network under each fast path the Predictor offers (eager, channels_last,
jit) and, with --compile, torch.compile; then the Predictor end to end (windowing,
softmax, result dicts) with its default path. Prints figures; asserts nothing.
Weights do not change the cost, so an untrained default-config net is representative.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from timing import median_seconds

from faultsense.inference import FAST_PATHS, Predictor, build_runner
from faultsense.models.net import build_net
from faultsense.taxonomy import NUM_LABELS

REPO = Path(__file__).resolve().parent.parent


def default_spec() -> dict:
    """The default CNN's net spec, composed from configs/ (train.yaml -> model=cnn)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train")
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    sample_rate = int(cfg.data.sample_rate)
    return {
        **net,
        "num_classes": NUM_LABELS,
        "sample_rate": sample_rate,
        "clip_samples": round(float(cfg.data.clip_seconds) * sample_rate),
    }


def interleaved(fns: dict, reps: int, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` median seconds per call; rounds alternate between the variants so
    a noisy neighbour on a shared machine slows them all alike instead of one."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_seconds(fn, reps))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, help="bench a registered bundle instead")
    parser.add_argument("--version", help="bundle version (default: current)")
    parser.add_argument("--reps", type=int, default=30, help="timed calls at batch 1")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if args.registry:
        from faultsense.registry import Registry

        reg = Registry(args.registry)
        bundle = reg.get(args.version) if args.version else reg.current()
        net, spec = bundle.load_net(), bundle.meta["net_spec"]
        source = f"bundle {bundle.version} from {args.registry}"
    else:
        spec = default_spec()
        torch.manual_seed(0)
        net = build_net(spec).eval()
        source = "untrained default-config FaultNet (configs/train.yaml)"
    clip = int(spec["clip_samples"])
    params = sum(p.numel() for p in net.parameters())
    print(f"model: {source}; {params / 1e6:.2f} M params; clip {clip} samples")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")

    rng = np.random.default_rng(0)
    x1 = torch.from_numpy(rng.normal(0, 0.1, (1, clip)).astype(np.float32))
    x32 = torch.from_numpy(rng.normal(0, 0.1, (32, clip)).astype(np.float32))
    reps32 = max(3, args.reps // 6)

    print("\nraw network (inference_mode)      batch 1 ms/clip   batch 32 clips/s")
    variants = {}
    for path in FAST_PATHS:
        t0 = time.perf_counter()
        runner, used = build_runner(copy.deepcopy(net), clip, path)
        variants[path] = (runner, used, time.perf_counter() - t0)
    if args.compile:
        t0 = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(net).eval())
        with torch.inference_mode():
            compiled(x1)
            compiled(x32)
        variants["compile"] = (compiled, "compile", time.perf_counter() - t0)
    with torch.inference_mode():
        b1 = interleaved({n: (lambda r=v[0]: r(x1)) for n, v in variants.items()}, args.reps, 5)
        b32 = interleaved({n: (lambda r=v[0]: r(x32)) for n, v in variants.items()}, reps32, 5)
    for name, (_, used, setup_s) in variants.items():
        print(
            f"  {name:<14} (ran as {used:<13}) {b1[name] * 1e3:8.2f}        {32 / b32[name]:10.1f}"
            f"    setup {setup_s:.1f} s"
        )

    meta = {"version": "bench", "labels": [str(i) for i in range(int(spec["num_classes"]))]}
    meta |= {"sample_rate": spec["sample_rate"], "clip_samples": clip}
    predictor = Predictor(copy.deepcopy(net), meta)
    waves1 = [x1[0].numpy()]
    waves32 = list(x32.numpy())
    long_clip = [rng.normal(0, 0.1, clip * 6).astype(np.float32)]
    times = interleaved(
        {"b1": lambda: predictor.predict(waves1), "b32": lambda: predictor.predict(waves32)},
        args.reps,
        3,
    )
    b1, b32 = times["b1"], times["b32"]
    windows = len(predictor.predict(long_clip)[0]["windows"])
    long_s = median_seconds(lambda: predictor.predict(long_clip), reps32)
    print(f"\nPredictor.predict end to end (fast_path={predictor.fast_path}):")
    print(f"  batch 1:  {b1 * 1e3:.2f} ms per clip")
    print(f"  batch 32: {32 / b32:.1f} clips/s ({b32 / 32 * 1e3:.2f} ms per clip)")
    print(
        f"  one {6 * clip / int(spec['sample_rate']):.0f} s clip ({windows} windows): {long_s * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
