"""Torch Datasets over the waveform cache (training) and over audio files (prediction).

Loading is batch-at-a-time: `CachedWaves` implements `__getitems__`, so one
fancy-indexed read of the int16 memmap per batch feeds the model. It is a plain
map-style Dataset, so under DDP Lightning swaps in a DistributedSampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .. import audio
from . import cache as wave_cache


class CachedWaves(Dataset):
    """Rows of one or more int16 cache memmaps -> (wave float32 [T], label int64,
    category int64).

    `items` is [M, 2] (part, row). `categories` defaults to -1 (unknown). Memmaps open
    lazily in each process, so pickling the Dataset into DataLoader workers copies paths,
    never audio.
    """

    def __init__(
        self,
        parts: Sequence[wave_cache.WaveCache],
        items: np.ndarray,
        labels: np.ndarray,
        categories: np.ndarray | None = None,
    ):
        self._parts = [(c.data_path, len(c), c.clip_samples) for c in parts]
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.categories = (
            np.full(len(self.labels), -1, dtype=np.int64)
            if categories is None
            else np.asarray(categories, dtype=np.int64)
        )
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.memmap(p, dtype=np.int16, mode="r", shape=(n, t)) for p, n, t in self._parts
            ]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        part, row = self.items[i]
        wave = self._open()[part][row].astype(np.float32)
        wave *= 1.0 / wave_cache.INT16_SCALE  # exactly as __getitems__ scales
        return (
            torch.from_numpy(wave),
            torch.tensor(self.labels[i]),
            torch.tensor(self.categories[i]),
        )

    def __getitems__(
        self, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch in one read per cache part: (waves [B, T], labels [B], categories [B])."""
        idx = np.asarray(indices, dtype=np.int64)
        items, maps = self.items[idx], self._open()
        out = np.empty((len(idx), self._parts[0][2]), dtype=np.float32)
        for part, mm in enumerate(maps):
            sel = np.flatnonzero(items[:, 0] == part)
            if len(sel):
                out[sel] = mm[items[sel, 1]]  # one gather per part; int16 -> float32 on assignment
        out *= 1.0 / wave_cache.INT16_SCALE
        return (
            torch.from_numpy(out),
            torch.from_numpy(self.labels[idx]),
            torch.from_numpy(self.categories[idx]),
        )


class FileWaves(Dataset):
    """Audio files decoded on the fly -> (wave float32 [T], -1). For prediction."""

    def __init__(self, files: Sequence[str | Path], sample_rate: int, clip_samples: int):
        self.files = [str(f) for f in files]
        self.sample_rate, self.clip_samples = sample_rate, clip_samples

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        wave = audio.decode(self.files[i], sample_rate=self.sample_rate)
        return torch.from_numpy(audio.fix_length(wave, self.clip_samples).copy()), torch.tensor(-1)


def collate_batch(batch: Any) -> Any:
    """Batches from `CachedWaves.__getitems__` are already stacked; others use default_collate."""
    if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[0], torch.Tensor):
        return batch
    return default_collate(batch)
