"""`FaultDataModule`: ESC-50 (or its synthetic twin) + labeled uploads -> batches of raw
waveforms float32 [B, T], int64 fault labels [B] and int64 ESC-50 category indices [B].

The category index (into `FaultDataModule.categories`, -1 for uploads) feeds a model's
optional auxiliary category head; the fault label is -1 for clips kept only for that head
(`data.mapping.unmapped=aux`), which are train-only.

`prepare_data` (rank 0) resolves the source (download / extract / generate the
synthetic set), maps categories to labels, builds or reuses the waveform caches and
writes the manifest. `setup` (every rank) opens the caches and splits by official fold:
`val_fold`, `test_fold`, the rest train; uploads (fold 0) join train only.

Loading is batch-at-a-time: the Dataset implements `__getitems__`, so one fancy-indexed
read of the int16 memmap per batch feeds the model. It is a plain map-style Dataset, so
under DDP Lightning swaps in a DistributedSampler and `batch_size` is per device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, default_collate

from .. import audio
from ..errors import ConfigError, DataError, FaultSenseError
from ..taxonomy import LABEL_TO_INDEX, LABELS
from . import cache as wave_cache
from . import esc50
from . import synthetic as synth
from .uploads import UploadStore

log = logging.getLogger(__name__)


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


class FaultDataModule(LightningDataModule):
    """ESC-50-layout data + uploads as batches `(waves float32 [B, T], labels int64 [B],
    categories int64 [B])`.

    After `prepare_data()` + `setup()`: `labels`, `categories` (the ESC-50 categories in
    the data, sorted; what a category index points at), `sample_rate`, `clip_samples`,
    `class_counts` (train, fault-labeled clips), `class_weights` (inverse frequency, mean 1
    over present classes, 0 for absent ones), `fingerprint`, `mapping`, `folds_present`,
    `has_test`.
    """

    def __init__(
        self,
        name: str = "esc50",
        source: str | None = None,
        raw_dir: str = "data/raw",
        cache_dir: str = "data/cache",
        manifest_path: str | None = None,
        mapping: Mapping[str, Any] | None = None,
        sample_rate: int = audio.MODEL_SAMPLE_RATE,
        clip_seconds: float = 5.0,
        val_fold: int = 4,
        test_fold: int | None = 5,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        skip_bad: bool = False,
        uploads_dir: str | None = None,
        include_uploads: bool = True,
        aux_clips: bool = True,
        download: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        predict_files: Sequence[str] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if val_fold == test_fold:
            raise ConfigError(
                f"data.val_fold and data.test_fold are both {val_fold}; pick two folds."
            )
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
        self.name = name
        self.source = source
        self.raw_dir = Path(raw_dir)
        self.cache_dir = Path(cache_dir)
        self.manifest_path = Path(
            manifest_path or Path(cache_dir).parent / "manifests" / f"{name}.csv"
        )
        self._mapping = esc50.parse_mapping(_plain(mapping))
        self.mapping: dict[str, Any] = self._mapping.to_dict()
        self.labels: list[str] = list(LABELS)
        self.categories: list[str] = []
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.val_fold = int(val_fold)
        self.test_fold = None if test_fold is None else int(test_fold)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.skip_bad = bool(skip_bad)
        self.uploads_dir = Path(uploads_dir) if uploads_dir else None
        self.include_uploads = bool(include_uploads)
        self.aux_clips = bool(aux_clips)
        self.download = dict(_plain(download) or {})
        self.synthetic = _plain(synthetic)
        self.predict_files = list(predict_files or [])
        self.progress = progress

        self.caches: list[wave_cache.WaveCache] = []
        self._prepared = False
        self.stats: esc50.SourceStats | None = None
        self.fingerprint = ""
        self.folds_present: list[int] = []
        self.has_test = False
        self.class_counts: dict[str, int] = {}
        self.class_weights: list[float] = []
        self.train_set: CachedWaves | None = None
        self.val_set: CachedWaves | None = None
        self.test_set: CachedWaves | None = None

    # ------------------------------------------------------------ preparing

    def _root(self, create: bool) -> Path:
        if self.source and self.synthetic and not synth.matches(self.source, **self.synthetic):
            if not create:
                raise DataError(f"Synthetic dataset {self.source} is missing; run prepare_data().")
            log.info("Writing the synthetic dataset to %s", self.source)
            synth.write_synthetic(self.source, **self.synthetic)
        if not create and self.source is None and find_raw(self.raw_dir) is None:
            raise DataError(f"ESC-50 is not downloaded under {self.raw_dir}; run prepare_data().")
        return esc50.resolve_source(
            self.source, self.raw_dir, progress=self.progress, **self.download
        )

    def _upload_rows(self) -> list[esc50.ClipRow]:
        if not (self.include_uploads and self.uploads_dir):
            return []
        rows = []
        for r in UploadStore(self.uploads_dir).rows():
            path = os.path.abspath(self.uploads_dir / r["path"])
            rows.append(
                esc50.ClipRow(f"upload-{r['sha256'][:16]}", str(path), "", r["label"], 0, "upload")
            )
        return rows

    def _caches(self, create: bool) -> list[wave_cache.WaveCache]:
        root = self._root(create)
        rows, self.stats = esc50.clip_rows(root, self._mapping, skip_bad=self.skip_bad)
        parts = [(self.name, rows), ("uploads", self._upload_rows())]
        caches = []
        for name, part_rows in parts:
            if not part_rows:
                continue
            kwargs = dict(
                sample_rate=self.sample_rate, clip_samples=self.clip_samples, mapping=self.mapping
            )
            if create:
                cache = wave_cache.get_or_build(
                    part_rows,
                    self.cache_dir,
                    name,
                    skip_bad=self.skip_bad,
                    progress=self.progress,
                    **kwargs,
                )
            else:
                fp = wave_cache.fingerprint(part_rows, **kwargs)
                cache = wave_cache.load_cache(
                    wave_cache.cache_path(self.cache_dir, name, fp), fp, part_rows
                )
                if cache is None:
                    return []
            caches.append(cache)
        if not caches:
            raise DataError(
                f"No clips in {root} map to a label under data.mapping ({self.mapping})."
            )
        return caches

    def prepare_data(self) -> None:
        """Fetch/generate the source, build or reuse the caches, write the manifest (rank 0)."""
        if self._prepared:  # Lightning calls it again in fit() after the caller did
            return
        caches = self._caches(create=True)
        esc50.write_manifest([r for c in caches for r in c.rows], self.manifest_path)
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        """Open the caches built by `prepare_data` and split by fold (every rank)."""
        if self.train_set is not None:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            caches = self._caches(create=False)
        except DataError:
            if distributed:
                raise
            caches = []
        if not caches:
            if distributed:
                raise DataError(
                    f"The waveform cache under {self.cache_dir} is missing; run prepare_data()."
                )
            self.prepare_data()  # single process: prepare on demand
            caches = self._caches(create=False)
        self.caches = caches
        self.fingerprint = (
            caches[0].fingerprint if len(caches) == 1 else _combine(c.fingerprint for c in caches)
        )
        self._split(caches)

    def _split(self, caches: list[wave_cache.WaveCache]) -> None:
        items = np.array(
            [(p, i) for p, c in enumerate(caches) for i in range(len(c))], dtype=np.int64
        )
        rows = [r for c in caches for r in c.rows]
        folds = np.array([r.fold for r in rows])
        labels = np.array([LABEL_TO_INDEX.get(r.label, -1) for r in rows], dtype=np.int64)
        self.categories = sorted({r.esc50_category for r in rows if r.esc50_category})
        index = {c: i for i, c in enumerate(self.categories)}
        categories = np.array([index.get(r.esc50_category, -1) for r in rows], dtype=np.int64)
        self.folds_present = sorted({int(f) for f in folds if f > 0})
        present = ", ".join(map(str, self.folds_present))
        if self.val_fold not in self.folds_present:
            raise DataError(
                f"data.val_fold={self.val_fold} is not in the data (folds present: {present}). "
                "Set data.val_fold to one of them."
            )
        self.has_test = self.test_fold in self.folds_present
        if self.test_fold is not None and not self.has_test:
            log.warning(
                "data.test_fold=%s is not in the data (folds present: %s): no test split; "
                "testing is skipped.",
                self.test_fold,
                present,
            )
        held_out = folds == self.val_fold, folds == (self.test_fold if self.has_test else -1)
        is_train = ~(held_out[0] | held_out[1])
        if not self.aux_clips:  # a model without a category head gains nothing from them
            is_train &= labels >= 0
        # Aux-only clips (no fault label) never enter val/test: they are not scored.
        is_val, is_test = (h & (labels >= 0) for h in held_out)

        def subset(mask: np.ndarray) -> CachedWaves:
            return CachedWaves(caches, items[mask], labels[mask], categories[mask])

        self.train_set, self.val_set = subset(is_train), subset(is_val)
        self.test_set = subset(is_test) if self.has_test else None
        train_labels = labels[is_train]
        counts = np.bincount(train_labels[train_labels >= 0], minlength=len(LABELS))
        self.class_counts = {label: int(n) for label, n in zip(LABELS, counts, strict=True)}
        inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        present_classes = counts > 0
        scale = present_classes.sum() / inv.sum() if inv.sum() > 0 else 0.0
        self.class_weights = [float(w) for w in inv * scale]

    # ------------------------------------------------------------ loaders

    def _loader(
        self, dataset: Dataset | None, batch_size: int, train: bool, collate=collate_batch
    ) -> DataLoader:
        if dataset is None:
            raise DataError(
                "No such split: call setup() first (and check has_test before testing)."
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            # A final training batch of one sample breaks BatchNorm; drop only that case.
            drop_last=train and len(dataset) % batch_size == 1,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """The test fold; raises DataError when `has_test` is False (the trainer checks first)."""
        return self._loader(self.test_set, self.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        """`predict_files` decoded and fixed to `clip_samples`: batches (waves [B, T], -1 labels)."""
        if not self.predict_files:
            raise DataError("data.predict_files is empty: give a list of audio files to predict.")
        dataset = FileWaves(self.predict_files, self.sample_rate, self.clip_samples)
        return self._loader(dataset, self.eval_batch_size, train=False, collate=default_collate)


def build_datamodule(data_cfg: Any, **overrides: Any) -> FaultDataModule:
    """`hydra.utils.instantiate(cfg.data, **overrides)`, but a FaultSenseError raised while
    building comes out as itself (Hydra wraps it in InstantiationException), so CLIs can
    print it."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(data_cfg, **overrides)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, FaultSenseError):
            raise cause from None
        raise


def prepared_datamodule(data_cfg: Any, **overrides: Any) -> FaultDataModule:
    """`build_datamodule(data_cfg, **overrides)`, prepared and set up: ready to use."""
    datamodule = build_datamodule(data_cfg, **overrides)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def find_raw(raw_dir: Path) -> Path | None:
    return (
        esc50.find_root(raw_dir / "ESC-50-master") if (raw_dir / "ESC-50-master").is_dir() else None
    )


def _combine(fingerprints: Any) -> str:
    import hashlib

    return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (Hydra passes configs through as-is)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
