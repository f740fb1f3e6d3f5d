"""Data benchmark: clips/s to build the waveform cache, then clips/s and batches/s from the
FaultDataModule reading that cache. Prints figures; asserts nothing.

    uv run --frozen python experiments/bench_data.py --source ../shared/datasets/esc50-16k
    uv run --frozen python experiments/bench_data.py            # a generated synthetic set

The cache is built fresh into a temporary folder (so the build is really measured);
the loader is timed over whole epochs of the training split, after one warm-up epoch
(the first pass reads the memmap from disk; later ones from the page cache, as training does).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from faultsense import CONFIG_DIR
from faultsense.data.datamodule import build_datamodule
from faultsense.data.synthetic import write_synthetic


def timed_epochs(loader, epochs: int) -> tuple[int, int, float]:
    clips = batches = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for waves, _labels, _categories in loader:
            clips += waves.shape[0]
            batches += 1
    return clips, batches, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="ESC-50-layout folder (default: generate a synthetic one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        source = args.source
        if source is None:
            source = write_synthetic(Path(tmp) / "synthetic", clips_per_class=40, seed=0)
        base = [
            f"paths.root_dir={tmp}",
            f"data.source={Path(source).absolute()}",
            f"data.batch_size={args.batch_size}",
            "data.include_uploads=false",
            *args.overrides,
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("prepare", base)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; source: {source}")

        dm = build_datamodule(cfg.data)
        start = time.perf_counter()
        dm.prepare_data()
        build_s = time.perf_counter() - start
        dm.setup()
        n = sum(len(c) for c in dm.caches)
        size_mb = sum(c.data_path.stat().st_size for c in dm.caches) / 1e6
        print(
            f"cache build: {n} clips in {build_s:.2f} s = {n / build_s:.0f} clips/s "
            f"({size_mb:.0f} MB int16, {dm.clip_samples} samples/clip at {dm.sample_rate} Hz)"
        )
        # Reuse is what every later run pays.
        start = time.perf_counter()
        build_datamodule(cfg.data).prepare_data()
        print(f"cache reuse (fingerprint check): {time.perf_counter() - start:.2f} s")

        for workers in args.workers:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                wcfg = compose(
                    "prepare",
                    [
                        *base,
                        f"data.num_workers={workers}",
                        f"data.persistent_workers={workers > 0}",
                    ],
                )
            wdm = build_datamodule(wcfg.data)
            wdm.setup()
            loader = wdm.train_dataloader()
            timed_epochs(loader, 1)  # warm-up: page cache, worker start
            clips, batches, secs = timed_epochs(loader, args.epochs)
            print(
                f"loader (batch {args.batch_size}, num_workers={workers}): "
                f"{clips / secs:.0f} clips/s, {batches / secs:.1f} batches/s "
                f"({args.epochs} epochs x {len(wdm.train_set)} train clips)"
            )


if __name__ == "__main__":
    main()
