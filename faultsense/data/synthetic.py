"""A small, learnable dataset in the ESC-50 layout, for tests and offline demos
(`data.kind=synthetic`: generated into `data.source` on first use, then read as ESC-50).

`write_synthetic` writes `meta/esc50.csv` (the official columns) and `audio/*.wav` at
44.1 kHz, named like the release (`{fold}-{src_file}-{take}-{target}.wav`), so it goes
through exactly the same code path as the real ESC-50. Its categories are real ESC-50
names that the default mapping sends to all four labels (two per label), plus `dog`,
which the default mapping drops (so `unmapped: normal|drop` is testable).

Each label has its own sound, randomized per clip from the seed:
mechanical_fault = periodic impacts + grinding harmonics; electrical_fault = mains hum
with crackle bursts; fluid_leak = band-limited hiss with drips; normal = steady
broadband machine noise; dog (unmapped) = harmonic barks.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..config import plain
from ..errors import DataError
from .esc50 import ESC50Source
from .manifest import ManifestRow
from .sources import register_source

log = logging.getLogger(__name__)

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
SAMPLE_RATE = 44_100
PARAMS_FILE = "synthetic.json"  # the parameters a folder was written with

Signal = Callable[[np.random.Generator, int, int, str], np.ndarray]


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    """White noise restricted to [lo, hi] Hz, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    out = np.fft.irfft(spec, n)
    return out / (np.sqrt(np.mean(out**2)) + 1e-9)


def _events(rng: np.random.Generator, n: int, sr: int, rate_hz: float, jitter: float) -> np.ndarray:
    """Sample positions of roughly periodic events at `rate_hz` with relative `jitter`."""
    period = sr / rate_hz
    starts = np.arange(rng.uniform(0, period), n, period)
    starts += rng.normal(0, jitter * period, starts.shape)
    return starts[(starts >= 0) & (starts < n)].astype(int)


def _place(out: np.ndarray, event: np.ndarray, start: int) -> None:
    end = min(len(out), start + len(event))
    out[start:end] += event[: end - start]


def _mechanical(rng: np.random.Generator, n: int, sr: int, category: str) -> np.ndarray:
    t = np.arange(n) / sr
    stroke_hz = rng.uniform(3, 9)
    f0 = rng.uniform(90, 220)
    grind = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k for k in range(1, 9))
    grind *= 0.6 + 0.4 * np.sin(2 * np.pi * stroke_hz * t)
    out = (0.5 if category == "chainsaw" else 0.25) * grind / 3
    ring_hz, tau = rng.uniform(1500, 4000), rng.uniform(0.005, 0.015)
    k = np.arange(int(0.08 * sr)) / sr
    impact = np.sin(2 * np.pi * ring_hz * k) * np.exp(-k / tau)
    for start in _events(rng, n, sr, stroke_hz, 0.05):
        _place(out, impact * rng.uniform(0.6, 1.0), start)
    return out


def _electrical(rng: np.random.Generator, n: int, sr: int, category: str) -> np.ndarray:
    t = np.arange(n) / sr
    mains = rng.choice([50.0, 60.0])
    top = 9 if category == "insects" else 5  # insects buzz with more harmonics
    hum = sum(
        np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 6.3)) / k for k in range(1, top + 1)
    )
    out = 0.3 * hum / 2
    for start in _events(rng, n, sr, rng.uniform(4, 15), 0.6):
        burst = rng.standard_normal(int(rng.uniform(0.001, 0.005) * sr))
        _place(out, burst * rng.uniform(0.4, 0.9), start)
    return out


def _fluid(rng: np.random.Generator, n: int, sr: int, category: str) -> np.ndarray:
    hiss_level = 0.2 if category == "rain" else 0.08
    out = hiss_level * _band_noise(rng, n, sr, rng.uniform(1800, 2500), rng.uniform(6000, 9000))
    k = np.arange(int(0.06 * sr)) / sr
    for start in _events(rng, n, sr, rng.uniform(2, 8), 0.4):
        f = rng.uniform(800, 2500)
        chirp = np.sin(2 * np.pi * (f * k + 0.5 * 8 * f * k**2))  # rising pitch, like a drop
        _place(out, 0.6 * chirp * np.exp(-k / rng.uniform(0.01, 0.03)), start)
    return out


def _normal(rng: np.random.Generator, n: int, sr: int, category: str) -> np.ndarray:
    t = np.arange(n) / sr
    top = 3000 if category == "engine" else 6000
    out = 0.3 * _band_noise(rng, n, sr, 40, rng.uniform(0.7, 1.0) * top)
    return out + 0.15 * np.sin(2 * np.pi * rng.uniform(30, 120) * t)


def _dog(rng: np.random.Generator, n: int, sr: int, category: str) -> np.ndarray:
    out = np.zeros(n)
    for start in _events(rng, n, sr, rng.uniform(1, 2.5), 0.2):
        k = np.arange(int(rng.uniform(0.15, 0.3) * sr)) / sr
        f0 = rng.uniform(400, 700) * (1 + 0.05 * np.sin(2 * np.pi * 6 * k))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        bark = sum(np.sin(h * phase) / h for h in range(1, 5)) * np.hanning(len(k))
        _place(out, 0.5 * bark, start)
    return out


# category -> (ESC-50 target, esc10 flag, signal). Targets are the official ones.
CATEGORIES: dict[str, tuple[int, bool, Signal]] = {
    "chainsaw": (41, True, _mechanical),
    "hand_saw": (49, False, _mechanical),
    "crackling_fire": (12, True, _electrical),
    "insects": (7, False, _electrical),
    "water_drops": (15, False, _fluid),
    "rain": (10, True, _fluid),
    "engine": (44, False, _normal),
    "vacuum_cleaner": (36, False, _normal),
    "dog": (0, True, _dog),
}


def synth_clip(
    category: str, rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """One clip of `category` as float32 [T] in [-1, 1], randomized by `rng`."""
    n = int(round(seconds * sample_rate))
    wave = CATEGORIES[category][2](rng, n, sample_rate, category)
    wave = wave + 0.005 * rng.standard_normal(n)  # a noise floor, like any recording
    wave *= rng.uniform(0.3, 0.9) / (np.abs(wave).max() + 1e-9)
    return wave.astype(np.float32)


def write_synthetic(
    root: str | Path,
    clips_per_class: int = 40,
    seed: int = 0,
    seconds: float = 5.0,
    sample_rate: int = SAMPLE_RATE,
    folds: int = 5,
) -> Path:
    """Write an ESC-50-layout folder at `root` and return it.

    `clips_per_class` clips per category, spread round-robin over folds 1..`folds`.
    The folder appears atomically (written beside `root`, then renamed), so a crash
    never leaves a half-written dataset; an existing `root` is replaced.
    """
    if clips_per_class < 1 or folds < 1 or seconds <= 0:
        raise ValueError("clips_per_class, folds and seconds must be positive.")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    (tmp / "meta").mkdir()
    rng = np.random.default_rng(seed)
    src_ids = rng.choice(np.arange(100_000, 999_999), len(CATEGORIES) * clips_per_class, False)
    rows = []
    for c, (category, (target, esc10, _)) in enumerate(CATEGORIES.items()):
        for i in range(clips_per_class):
            fold = i % folds + 1
            src = int(src_ids[c * clips_per_class + i])
            filename = f"{fold}-{src}-A-{target}.wav"
            wave = synth_clip(category, rng, seconds, sample_rate)
            sf.write(tmp / "audio" / filename, wave, sample_rate, subtype="PCM_16")
            rows.append((filename, fold, target, category, esc10, src, "A"))
    params = dict(clips_per_class=clips_per_class, seed=seed, seconds=seconds, folds=folds)
    (tmp / PARAMS_FILE).write_text(json.dumps({**params, "sample_rate": sample_rate}))
    rows.sort(key=lambda r: (r[1], r[0]))  # the release is ordered by fold, then name
    with open(tmp / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ESC50_COLUMNS)
        writer.writerows(rows)
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def matches(root: str | Path, **params: object) -> bool:
    """True if `root` holds a synthetic set written with `params` (unspecified ones: defaults)."""
    try:
        written = json.loads((Path(root) / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return False
    wanted = {
        "clips_per_class": 40,
        "seed": 0,
        "seconds": 5.0,
        "folds": 5,
        "sample_rate": SAMPLE_RATE,
    }
    wanted.update(params)
    return all(written.get(k) == v for k, v in wanted.items())


@register_source("synthetic")
class SyntheticSource(ESC50Source):
    """`ESC50Source` over a synthetic set that is written to `source` with the `synthetic`
    parameters (see `write_synthetic`) when it is missing or was written with others.
    `synthetic: null` reads `source` as it is."""

    def __init__(
        self,
        source: str | Path | None = None,
        *,
        synthetic: Mapping[str, Any] | None = None,
        **esc50_options: Any,
    ) -> None:
        super().__init__(source, **esc50_options)
        self.params: dict[str, Any] | None = plain(synthetic)

    def rows(self, *, create: bool) -> list[ManifestRow]:
        if self.source and self.params and not matches(self.source, **self.params):
            if not create:
                raise DataError(f"Synthetic dataset {self.source} is missing; run prepare_data().")
            log.info("Writing the synthetic dataset to %s", self.source)
            write_synthetic(self.source, **self.params)
        return super().rows(create=create)


def main(argv: list[str] | None = None) -> None:
    """`faultsense-synth`: write the synthetic ESC-50-layout dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", help="output folder")
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)
    root = write_synthetic(
        args.out, args.clips_per_class, args.seed, args.seconds, folds=args.folds
    )
    n = args.clips_per_class * len(CATEGORIES)
    print(f"wrote {n} clips ({len(CATEGORIES)} categories, {args.folds} folds) to {root}")


if __name__ == "__main__":
    main()
