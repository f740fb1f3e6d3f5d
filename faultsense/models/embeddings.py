"""Embedding cache: a frozen encoder's clip embeddings, computed once per clip and reused.

With a frozen encoder (e.g. YAMNet, `train_blocks: 0`) only the head learns, so running
the encoder on every clip in every epoch of every fold is wasted work: `part_embeddings`
runs it once over a waveform cache part and stores `[N, D]` float32 in an `.npy` file in
that part's folder, named by `encoder_key` (the encoder's spec, a sha256 over its tensors
and frontend settings, the clip size) and keyed by the part's data fingerprint (the
folder). `EmbeddingDataModule` then serves `(embedding, label, category)` batches in place
of waveforms; `FaultClassifier(inputs="embedding")` trains its head on them. Waveform
augmentation does not apply to cached embeddings: training uses mixup in embedding space
(the model's `augment.mixup_*`) and nothing else. The checkpoint still holds the whole
FaultNet (frozen encoder + trained head), so registering and serving are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDINGS_VERSION = 1
EMBED_BATCH = 32


def is_frozen(net: torch.nn.Module) -> bool:
    """True when nothing before the head trains (frontend and backbone have no trainable
    tensor), so a clip's embedding is the same in every epoch."""
    encoder = [*net.frontend.parameters(), *net.backbone.parameters()]
    return not any(p.requires_grad for p in encoder)


def encoder_key(net: torch.nn.Module) -> str:
    """sha256 over what makes an embedding: the frontend and backbone specs, the sample rate
    and clip length, and a digest of the encoder's tensors (the weights actually loaded, so
    random or local weights key correctly too)."""
    spec = {k: net.spec[k] for k in ("frontend", "backbone", "sample_rate", "clip_samples")}
    digest = hashlib.sha256(
        json.dumps({"v": EMBEDDINGS_VERSION, **spec}, sort_keys=True, default=str).encode()
    )
    state = {**net.frontend.state_dict(prefix="f."), **net.backbone.state_dict(prefix="b.")}
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def embeddings_path(part_dir: str | os.PathLike[str], key: str) -> Path:
    """Where one waveform cache part (a fingerprint-named folder) keeps one encoder's embeddings."""
    return Path(part_dir) / f"embeddings-{key[:24]}.npy"


@torch.no_grad()
def embed_waves(net: torch.nn.Module, waves: np.ndarray, batch_size: int = EMBED_BATCH):
    """int16 waves [N, T] -> float32 embeddings [N, D] from `net.embed` in eval mode."""
    from ..data.cache import INT16_SCALE

    was_training = net.training
    net.eval()
    try:
        chunks = [
            net.embed(torch.from_numpy(waves[i : i + batch_size].astype(np.float32) / INT16_SCALE))
            for i in range(0, len(waves), batch_size)
        ]
    finally:
        net.train(was_training)
    return torch.cat(chunks).numpy().astype(np.float32)


def part_embeddings(net: torch.nn.Module, part: Any, key: str) -> np.ndarray:
    """Embeddings [len(part), D] of a waveform cache part (`data.cache.WaveCache`): read from
    its folder when present, else computed once and written atomically (parallel CV jobs may
    both compute; the last rename wins, with identical content)."""
    path = embeddings_path(part.path, key)
    if path.exists():
        cached = np.load(path, mmap_mode="r")
        if cached.shape[0] == len(part):
            return cached
        log.warning(
            "embedding cache %s has %d rows, want %d: rebuilding",
            path,
            *cached.shape[:1],
            len(part),
        )
    log.info("embedding %d clips into %s", len(part), path)
    embeddings = embed_waves(net, part.waves)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, embeddings)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


class BatchRows(Dataset):
    """A Dataset read a batch at a time: subclasses give `__len__` and `__getitems__`
    (indices -> a tuple of stacked tensors); one row is a batch of one."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([i]))


class CachedEmbeddings(BatchRows):
    """Rows of cached embeddings -> (embedding float32 [D], label int64, category int64), with
    the `items` [M, 2] (part, row) of the `data.datasets.CachedWaves` it stands for."""

    def __init__(self, parts: Sequence[np.ndarray], waves: Any) -> None:
        self.parts = list(parts)
        self.items, self.labels, self.categories = waves.items, waves.labels, waves.categories

    def __len__(self) -> int:
        return len(self.items)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """A batch: (embeddings [B, D], labels [B], categories [B])."""
        idx = np.asarray(indices, dtype=np.int64)
        items = self.items[idx]
        out = np.empty((len(idx), self.parts[0].shape[1]), dtype=np.float32)
        for part, embeddings in enumerate(self.parts):
            sel = np.flatnonzero(items[:, 0] == part)
            if len(sel):
                out[sel] = embeddings[items[sel, 1]]
        return (
            torch.from_numpy(out),
            torch.from_numpy(self.labels[idx]),
            torch.from_numpy(self.categories[idx]),
        )


def _stacked(batch: Any) -> Any:
    """Batches from `__getitems__` are already stacked tuples: pass them through."""
    return batch


class DerivedDataModule(L.LightningDataModule):
    """A prepared datamodule with other train/val/test Datasets (batches already stacked by
    their `__getitems__`); everything else (labels, fingerprint, class_weights, ...) is the
    wrapped one's, so training, summaries and registration read it as before."""

    def __init__(self, inner: Any, train_set: Any, val_set: Any, test_set: Any, batch_size: int):
        super().__init__()
        self.inner = inner
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.batch_size = int(batch_size)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling): avoid recursing into __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    def _loader(self, dataset: Any, train: bool) -> DataLoader:
        if dataset is None:
            raise ConfigError("No such split (check has_test before testing).")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) % self.batch_size == 1,  # no batch of one
            collate_fn=_stacked,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


def embedding_datamodule(datamodule: Any, net: torch.nn.Module, batch_size: int = 64):
    """A `DerivedDataModule` over `datamodule`'s splits as cached embeddings of `net`'s frozen
    encoder (computed now where missing). ConfigError when the encoder trains."""
    if not is_frozen(net):
        raise ConfigError(
            "embedding_cache=true needs a frozen encoder (e.g. model.net.backbone.train_blocks=0)."
        )
    key = encoder_key(net)
    parts = [part_embeddings(net, part, key) for part in datamodule.caches]

    def cached(waves: Any) -> CachedEmbeddings | None:
        return None if waves is None else CachedEmbeddings(parts, waves)

    return DerivedDataModule(
        datamodule,
        cached(datamodule.train_set),
        cached(datamodule.val_set),
        cached(datamodule.test_set),
        batch_size,
    )
