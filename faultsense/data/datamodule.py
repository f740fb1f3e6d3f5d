"""`FaultDataModule`: a data source (`data.kind`) + labeled uploads -> batches of raw
waveforms float32 [B, T], int64 fault labels [B] and int64 category indices [B].

The source is looked up by `data.kind` in `faultsense.data.sources` and yields manifest
rows; this module knows no source. The labels are `data.labels` (that order), else the
source's own (`source.labels`, e.g. a folder's, sorted), else the default taxonomy's; a
clip of the source with another label is a DataError naming it (an upload of another
label set is left out with a warning). With `data.train_hop_seconds`, a clip longer than
`clip_seconds` becomes windows every `train_hop_seconds` (the last one ends at the end),
all in the recording's group and fold. The category index (into
`FaultDataModule.categories`, -1 for a clip without one, e.g. an upload) feeds a model's
optional auxiliary category head; the fault label is -1 for clips kept only for that
head (`data.mapping.unmapped=aux`), which are train-only.

`prepare_data` (rank 0) asks the sources for rows (a source may download, extract or
generate its data then), builds or reuses one waveform cache per source and writes the
manifest. `setup` (every rank) opens the caches and splits by fold: `val_fold`,
`test_fold`, the rest train; uploads (fold 0) join train only.

Batches come from `datasets.CachedWaves` (one memmap read per batch). Under DDP
Lightning swaps in a DistributedSampler and `batch_size` is per device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, default_collate

from .. import audio
from ..config import instantiate, plain
from ..errors import AudioError, ConfigError, DataError
from ..taxonomy import LABELS
from . import cache as wave_cache
from .datasets import CachedWaves, FileWaves, collate_batch
from .manifest import AUX_ONLY, ManifestRow, write_manifest
from .sources import DataSource, SourceStats, build_source

log = logging.getLogger(__name__)

UPLOADS = "uploads"  # the uploads' source kind and cache part name


class FaultDataModule(LightningDataModule):
    """The clips of one data source + uploads as batches `(waves float32 [B, T], labels
    int64 [B], categories int64 [B])`.

    `kind` names the source (`faultsense.data.sources`); keys of the data config not
    named here (`source`, `mapping`, `raw_dir`, ...) are `source_options` for it (null
    ones left out).
    After `prepare_data()` + `setup()`: `labels`, `categories` (the source categories in
    the data, sorted; what a category index points at), `sample_rate`, `clip_samples`,
    `class_counts` (train, fault-labeled clips), `class_weights` (inverse frequency, mean 1
    over present classes, 0 for absent ones), `fingerprint`, `mapping`, `folds_present`,
    `has_test`, `stats` (what the source found, if it reports it).
    """

    def __init__(
        self,
        kind: str,
        name: str | None = None,
        cache_dir: str = "data/cache",
        manifest_path: str | None = None,
        sample_rate: int = audio.MODEL_SAMPLE_RATE,
        clip_seconds: float = 5.0,
        train_hop_seconds: float | None = None,
        labels: Sequence[str] | None = None,
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
        predict_files: Sequence[str] | None = None,
        progress: bool = True,
        **source_options: Any,
    ) -> None:
        super().__init__()
        _check_settings(val_fold, test_fold, batch_size, train_hop_seconds)
        self.label_config = _label_config(labels)
        self.kind = str(kind)
        self.name = name or self.kind
        self.cache_dir = Path(cache_dir)
        self.manifest_path = Path(
            manifest_path or self.cache_dir.parent / "manifests" / f"{self.name}.csv"
        )
        self.skip_bad = bool(skip_bad)
        self.progress = progress
        # A null option is left out (the source's default): every data config can then
        # share keys such as `synthetic: null` that only some sources take.
        options = {k: plain(v) for k, v in source_options.items() if v is not None}
        self.data_source: DataSource = build_source(
            self.kind, skip_bad=self.skip_bad, progress=progress, **options
        )
        self.mapping: dict[str, Any] = dict(self.data_source.mapping or {})
        # Until the rows are read: the configured labels, else the default ones.
        self.labels: list[str] = list(self.label_config or LABELS)
        self.categories: list[str] = []
        # Each category's label index (-1: no label, or rows of several labels).
        self.category_labels: list[int] = []
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.train_hop_seconds = None if train_hop_seconds is None else float(train_hop_seconds)
        self.val_fold = int(val_fold)
        self.test_fold = None if test_fold is None else int(test_fold)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.uploads_dir = Path(uploads_dir) if uploads_dir else None
        self.include_uploads = bool(include_uploads)
        self.aux_clips = bool(aux_clips)
        self.predict_files = list(predict_files or [])

        self.caches: list[wave_cache.WaveCache] = []
        self._prepared = False
        self.stats: SourceStats | None = None
        self.fingerprint = ""
        self.folds_present: list[int] = []
        self.has_test = False
        self.class_counts: dict[str, int] = {}
        self.class_weights: list[float] = []
        self.train_set: CachedWaves | None = None
        self.val_set: CachedWaves | None = None
        self.test_set: CachedWaves | None = None

    # ------------------------------------------------------------ preparing

    def _parts(self, create: bool) -> list[tuple[str, list[ManifestRow]]]:
        """(cache part name, rows): the data source, then the uploads. A part per source,
        so a new upload never re-decodes the source's clips."""
        rows = self.data_source.rows(create=create)
        self.stats = self.data_source.stats
        self.labels = list(self.label_config or getattr(self.data_source, "labels", None) or LABELS)
        check_labels(rows, self.labels, explicit=bool(self.label_config))
        parts = [(self.name, self._windows(rows))]
        if self.include_uploads and self.uploads_dir:
            uploads = build_source(
                UPLOADS, source=self.uploads_dir, skip_bad=self.skip_bad, progress=self.progress
            )
            parts.append((UPLOADS, known_labels(uploads.rows(create=create), self.labels)))
        return parts

    def _windows(self, rows: list[ManifestRow]) -> list[ManifestRow]:
        """`rows`, each clip longer than `clip_seconds` split into windows every
        `train_hop_seconds` (none without it)."""
        if self.train_hop_seconds is None:
            return rows
        clip = self.clip_samples / self.sample_rate
        return [w for row in rows for w in windows(row, clip, self.train_hop_seconds)]

    def _caches(self, create: bool) -> list[wave_cache.WaveCache]:
        """Build (`create`) or open the cache of every part with rows; [] when one is not
        built yet."""
        settings = dict(
            sample_rate=self.sample_rate, clip_samples=self.clip_samples, mapping=self.mapping
        )
        caches = []
        for name, rows in self._parts(create):
            if not rows:
                continue
            if create:
                cache = wave_cache.get_or_build(
                    rows,
                    self.cache_dir,
                    name,
                    skip_bad=self.skip_bad,
                    progress=self.progress,
                    **settings,
                )
            else:
                fp = wave_cache.fingerprint(rows, **settings)
                cache = wave_cache.load_cache(
                    wave_cache.cache_path(self.cache_dir, name, fp), fp, rows
                )
                if cache is None:
                    return []
            caches.append(cache)
        if not caches:
            where = self.stats.root if self.stats else f"the data.kind={self.kind} source"
            raise DataError(
                f"No clips in {where} map to a label under data.mapping ({self.mapping})."
            )
        return caches

    def prepare_data(self) -> None:
        """Fetch/generate the source, build or reuse the caches, write the manifest (rank 0)."""
        if self._prepared:  # Lightning calls it again in fit() after the caller did
            return
        caches = self._caches(create=True)
        write_manifest([r for c in caches for r in c.rows], self.manifest_path)
        # Known before setup(), whose val_fold must be one of them (faultsense-cv asks).
        self.folds_present = sorted({r.fold for c in caches for r in c.rows if r.fold > 0})
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
        to_index = {label: i for i, label in enumerate(self.labels)}
        labels = np.array([to_index.get(r.label, -1) for r in rows], dtype=np.int64)
        self.categories = sorted({r.category for r in rows if r.category})
        index = {c: i for i, c in enumerate(self.categories)}
        categories = np.array([index.get(r.category, -1) for r in rows], dtype=np.int64)
        self.category_labels = category_labels(categories, labels, len(self.categories))
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
        counts = np.bincount(train_labels[train_labels >= 0], minlength=len(self.labels))
        self.class_counts = {label: int(n) for label, n in zip(self.labels, counts, strict=True)}
        self.class_weights = inverse_frequency_weights(counts)

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
    """`faultsense.config.instantiate(cfg.data, **overrides)`: a FaultSenseError raised
    while building comes out as itself, so CLIs can print it."""
    return instantiate(data_cfg, **overrides)


def prepared_datamodule(data_cfg: Any, **overrides: Any) -> FaultDataModule:
    """`build_datamodule(data_cfg, **overrides)`, prepared and set up: ready to use."""
    datamodule = build_datamodule(data_cfg, **overrides)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def inverse_frequency_weights(counts: np.ndarray) -> list[float]:
    """Per-class loss weights from class counts: inverse frequency scaled to mean 1 over
    the classes present, 0 for absent ones."""
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    scale = (counts > 0).sum() / inv.sum() if inv.sum() > 0 else 0.0
    return [float(w) for w in inv * scale]


def _check_settings(
    val_fold: int, test_fold: int | None, batch_size: int, train_hop_seconds: float | None
) -> None:
    if val_fold == test_fold:
        raise ConfigError(f"data.val_fold and data.test_fold are both {val_fold}; pick two folds.")
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
    if train_hop_seconds is not None and not train_hop_seconds > 0:
        raise ConfigError(f"data.train_hop_seconds must be > 0, got {train_hop_seconds}.")


def _label_config(labels: Sequence[str] | None) -> list[str] | None:
    """`data.labels` checked: None, or distinct non-empty names."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ConfigError(f"data.labels must be a list of labels, got {labels!r}.")
    names = [str(label).strip() for label in plain(labels)]
    if not names or "" in names or len(set(names)) != len(names):
        raise ConfigError(f"data.labels must list distinct, non-empty labels; got {names}.")
    return names


def check_labels(rows: Sequence[ManifestRow], labels: Sequence[str], *, explicit: bool) -> None:
    """A DataError naming the first clip whose label is not in `labels` (AUX_ONLY aside)."""
    known = set(labels)
    for row in rows:
        if row.label != AUX_ONLY and row.label not in known:
            origin = "data.labels" if explicit else "the labels of this source"
            raise DataError(
                f"{row.path} is labeled {row.label!r}, which is not one of {origin}: "
                f"{', '.join(labels)}. Fix its label, or add it to data.labels."
            )


def known_labels(rows: list[ManifestRow], labels: Sequence[str]) -> list[ManifestRow]:
    """Uploads whose label is in `labels`; the others (uploaded for a model with another
    label set) are left out with a warning naming them."""
    known = set(labels)
    other = [r for r in rows if r.label not in known]
    if other:
        log.warning(
            "Leaving out %d upload(s) with labels outside %s (e.g. %s labeled %r).",
            len(other),
            ", ".join(labels),
            other[0].path,
            other[0].label,
        )
    return [r for r in rows if r.label in known]


def windows(row: ManifestRow, clip: float, hop: float) -> list[ManifestRow]:
    """`row` as windows of `clip` seconds every `hop` seconds, the last one ending at the
    end of the clip (as `audio.sliding_windows`), all in the row's recording; `[row]`
    when it is no longer than `clip` or its file cannot be read (the cache reports it)."""
    if row.length is not None:
        seconds = row.length
    else:
        try:
            seconds = audio.info_seconds(row.path) - row.offset
        except AudioError:
            return [row]
    if seconds <= clip + 1e-6:
        return [row]
    starts = list(np.arange(0.0, seconds - clip + 1e-6, hop))
    if starts[-1] + clip < seconds - 1e-6:
        starts.append(seconds - clip)
    return [
        dataclasses.replace(
            row,
            id=f"{row.id}#{k}",
            group=row.recording,
            offset=round(row.offset + float(start), 6),
            length=clip,
        )
        for k, start in enumerate(starts)
    ]


def _combine(fingerprints: Iterable[str]) -> str:
    return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()


def category_labels(categories: np.ndarray, labels: np.ndarray, num_categories: int) -> list[int]:
    """Each category's label index from the rows that have both [N] (-1 where a category's
    rows carry no label, or more than one)."""
    out = []
    for k in range(num_categories):
        seen = np.unique(labels[(categories == k) & (labels >= 0)])
        out.append(int(seen[0]) if len(seen) == 1 else -1)
    return out
