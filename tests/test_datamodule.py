"""FaultDataModule: fold splits (and missing folds), batches, class weights, uploads joined
to train only, DDP sampling, workers, and prediction over files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from faultsense.data import manifest
from faultsense.data.datamodule import FaultDataModule, build_datamodule
from faultsense.data.synthetic import synth_clip
from faultsense.data.uploads import UploadStore
from faultsense.errors import AudioError, ConfigError, DataError
from faultsense.taxonomy import LABELS
from tests.fixtures.data import SYNTH, compose_config, copy_source

PER_FOLD = SYNTH["clips_per_class"] // SYNTH["folds"] * 8  # mapped clips per fold
AUX_PER_FOLD = SYNTH["clips_per_class"] // SYNTH["folds"]  # dog: unmapped, kept as aux-only
T = int(16_000 * SYNTH["seconds"])


def make(overrides: list[str], *extra: str) -> FaultDataModule:
    dm = build_datamodule(compose_config("prepare", [*overrides, *extra]).data)
    dm.prepare_data()
    dm.setup()
    return dm


def test_official_folds_split_and_class_statistics(synthetic_datamodule: FaultDataModule):
    dm = synthetic_datamodule
    assert dm.folds_present == [1, 2, 3, 4, 5] and dm.has_test
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (
        3 * (PER_FOLD + AUX_PER_FOLD),
        PER_FOLD,
        PER_FOLD,
    )
    rows = [r for c in dm.caches for r in c.rows]
    assert {rows[i].fold for i in dm.val_set.items[:, 1]} == {4}
    assert {rows[i].fold for i in dm.test_set.items[:, 1]} == {5}
    assert {rows[i].fold for i in dm.train_set.items[:, 1]} == {1, 2, 3}
    assert dm.labels == list(LABELS)
    assert dm.class_counts == {label: 3 * PER_FOLD // 4 for label in LABELS}
    assert dm.class_weights == pytest.approx([1.0] * 4)
    assert (dm.sample_rate, dm.clip_samples) == (16_000, T)
    assert dm.fingerprint == dm.caches[0].fingerprint and len(dm.fingerprint) == 64
    assert (
        dm.mapping["unmapped"] == "aux" and "chainsaw" in dm.mapping["classes"]["mechanical_fault"]
    )


def test_batches_are_float_waveforms_and_int64_labels_from_the_cache(synthetic_datamodule):
    dm = synthetic_datamodule
    waves, labels, categories = next(iter(dm.val_dataloader()))
    assert waves.shape == (16, T) and waves.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    expected = dm.caches[0].waves[dm.val_set.items[:16, 1]] / 32767.0
    np.testing.assert_allclose(waves.numpy(), expected, rtol=1e-6)
    assert labels.tolist() == dm.val_set.labels[:16].tolist()
    # Each clip's ESC-50 category index points at its own category, which maps to its label.
    rows = dm.caches[0].rows
    for row, label, category in zip(
        (rows[i] for i in dm.val_set.items[:16, 1]), labels, categories, strict=True
    ):
        assert dm.categories[int(category)] == row.category
        assert LABELS[int(label)] == row.label
    assert dm.categories == sorted({r.category for r in rows}) and "dog" in dm.categories
    # Item-wise access agrees with the batched read.
    wave, label, category = dm.val_set[3]
    assert torch.equal(wave, waves[3]) and int(label) == int(labels[3])
    assert int(category) == int(categories[3])
    # Training batches are shuffled; one epoch covers the train split once.
    seen = torch.cat([y for _, y, _ in dm.train_dataloader()])
    assert sorted(seen.tolist()) == sorted(dm.train_set.labels.tolist())
    assert not torch.equal(seen, torch.from_numpy(dm.train_set.labels[: len(seen)]))


def test_missing_test_fold_means_no_test_split(
    tmp_path: Path, synthetic_source: Path, synthetic_overrides, caplog
):
    src = copy_source(synthetic_source, tmp_path / "four_folds")
    for wav in (src / "audio").glob("5-*.wav"):
        wav.unlink()
    with caplog.at_level(logging.WARNING):
        dm = make(synthetic_overrides, f"data.source={src}")
    assert dm.folds_present == [1, 2, 3, 4] and not dm.has_test
    assert "data.test_fold=5 is not in the data" in caplog.text
    assert len(dm.train_set) == 3 * (PER_FOLD + AUX_PER_FOLD)
    with pytest.raises(DataError, match="has_test"):
        dm.test_dataloader()


def test_missing_val_fold_is_an_error_listing_the_folds(synthetic_overrides):
    with pytest.raises(
        DataError, match=r"data.val_fold=7 is not in the data \(folds present: 1, 2, 3, 4, 5\)"
    ):
        make(synthetic_overrides, "data.val_fold=7")
    with pytest.raises(ConfigError, match="both 3"):
        make(synthetic_overrides, "data.val_fold=3", "data.test_fold=3")


def test_cross_validation_fold_and_no_test_fold(synthetic_overrides):
    dm = make(synthetic_overrides, "data.val_fold=1", "data.test_fold=null")
    assert (
        not dm.has_test
        and len(dm.val_set) == PER_FOLD
        and len(dm.train_set) == 4 * (PER_FOLD + AUX_PER_FOLD)
    )


def test_unmapped_aux_keeps_unmapped_clips_for_training_the_category_head_only(
    synthetic_overrides,
):
    base = make(synthetic_overrides, "data.mapping.unmapped=drop")
    dm = make(synthetic_overrides)  # unmapped: aux is the default
    assert "dog" in dm.categories and "dog" not in base.categories
    dog = dm.categories.index("dog")
    # Dog clips of the training folds join train with no fault label ...
    train_dog = dm.train_set.categories == dog
    assert train_dog.sum() == 3 * AUX_PER_FOLD
    assert set(dm.train_set.labels[train_dog].tolist()) == {-1}
    assert len(dm.train_set) == len(base.train_set) + train_dog.sum()
    # ... but are never scored: val and test hold exactly the fault-labeled clips.
    for split, before in ((dm.val_set, base.val_set), (dm.test_set, base.test_set)):
        assert len(split) == len(before) and (split.labels >= 0).all()
        assert dog not in split.categories.tolist()
    # Class counts and weights cover the fault-labeled clips only.
    assert dm.class_counts == base.class_counts
    assert dm.class_weights == pytest.approx(base.class_weights)
    # A model without a category head (retraining a bundle, aux_weight=0) leaves them out.
    off = make(synthetic_overrides, "data.mapping.unmapped=aux", "data.aux_clips=false")
    assert len(off.train_set) == len(base.train_set) and (off.train_set.labels >= 0).all()


def test_unmapped_normal_makes_an_imbalanced_set_with_weights(synthetic_overrides):
    dm = make(synthetic_overrides, "data.mapping.unmapped=normal")
    assert dm.class_counts["normal"] == 1.5 * dm.class_counts["fluid_leak"]
    weights = dict(zip(LABELS, dm.class_weights, strict=True))
    assert np.mean(dm.class_weights) == pytest.approx(1.0)
    assert weights["normal"] < weights["fluid_leak"] == pytest.approx(weights["mechanical_fault"])
    assert weights["normal"] * dm.class_counts["normal"] == pytest.approx(
        weights["fluid_leak"] * dm.class_counts["fluid_leak"]
    )


def _upload_some(root: Path) -> UploadStore:
    from faultsense.audio import to_wav_bytes

    store = UploadStore(root)
    rng = np.random.default_rng(7)
    for i in range(3):
        wave = synth_clip("chainsaw", rng, seconds=1.0, sample_rate=16_000)
        store.add(to_wav_bytes(wave), "mechanical_fault", f"u{i}.wav", max_seconds=30)
    return store


def test_uploads_join_the_training_split_only(tmp_path: Path, synthetic_overrides):
    base = make(synthetic_overrides)
    _upload_some(tmp_path / "data" / "uploads")  # paths.root_dir is tmp_path
    dm = make(synthetic_overrides)
    assert len(dm.train_set) == len(base.train_set) + 3
    assert (len(dm.val_set), len(dm.test_set)) == (len(base.val_set), len(base.test_set))
    assert dm.class_counts["mechanical_fault"] == base.class_counts["mechanical_fault"] + 3
    assert dm.fingerprint != base.fingerprint
    assert dm.caches[0].path == base.caches[0].path  # the ESC-50 part is reused, not rebuilt
    written = manifest.read_manifest(dm.manifest_path)
    uploads = [r for r in written if r.source == "upload"]
    assert len(uploads) == 3 and {(r.fold, r.label) for r in uploads} == {(0, "mechanical_fault")}
    # Upload rows are really read into training batches (from the uploads cache part).
    upload_pos = np.flatnonzero(dm.train_set.items[:, 0] == 1)
    assert len(upload_pos) == 3
    waves, labels, categories = dm.train_set.__getitems__(upload_pos.tolist())
    assert labels.tolist() == [0, 0, 0] and waves.shape == (3, T)
    assert categories.tolist() == [-1, -1, -1]  # uploads carry no ESC-50 category
    np.testing.assert_allclose(
        waves[:, :16_000].numpy(), dm.caches[1].waves[:, :16_000] / 32767.0, rtol=1e-6
    )
    assert waves[:, 16_000:].abs().max() == 0  # 1 s uploads zero-padded to the 2 s clip

    off = make(synthetic_overrides, "data.include_uploads=false")
    assert len(off.train_set) == len(base.train_set)


def test_ddp_sampling_splits_the_data_across_ranks(synthetic_datamodule):
    """What Lightning does under DDP: the same loader with a DistributedSampler per rank;
    batch_size stays per device."""
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = synthetic_datamodule
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = _update_dataloader(dm.train_dataloader(), sampler)
        batches = list(loader)
        assert all(w.shape[0] <= dm.batch_size for w, *_ in batches)
        seen.append(torch.cat([w[:, :64] for w, *_ in batches]))
    assert len(seen[0]) == len(seen[1]) == len(dm.train_set) // 2
    assert dm.batch_size == 16 and len(batches) == 2  # 24 clips per rank: 16 + 8
    # No clip is fed to both ranks.
    a, b = ({tuple(x.tolist()) for x in s} for s in seen)
    assert not a & b


def test_worker_processes_deliver_the_same_batches(synthetic_overrides):
    single = make(synthetic_overrides)
    multi = make(synthetic_overrides, "data.num_workers=2", "data.persistent_workers=true")
    got = list(multi.val_dataloader())
    want = list(single.val_dataloader())
    assert len(got) == len(want)
    for (wg, yg, cg), (ww, yw, cw) in zip(got, want, strict=True):
        assert torch.equal(wg, ww) and torch.equal(yg, yw) and torch.equal(cg, cw)


def test_predict_dataloader_over_files(tmp_path: Path, synthetic_source: Path, synthetic_overrides):
    files = sorted((synthetic_source / "audio").glob("1-*.wav"))[:3]
    dm = make(synthetic_overrides, f"data.predict_files=[{','.join(map(str, files))}]")
    waves, labels = next(iter(dm.predict_dataloader()))
    assert waves.shape == (3, T) and waves.dtype == torch.float32
    assert labels.tolist() == [-1, -1, -1]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"nope")
    dm.predict_files = [str(bad)]
    with pytest.raises(AudioError, match="broken.wav"):
        next(iter(dm.predict_dataloader()))
    dm.predict_files = []
    with pytest.raises(DataError, match="predict_files"):
        dm.predict_dataloader()


def test_setup_alone_prepares_and_a_bad_source_is_a_clean_error(
    tmp_path: Path, synthetic_overrides
):
    fresh = [*synthetic_overrides, f"data.cache_dir={tmp_path / 'fresh-cache'}"]
    dm = build_datamodule(compose_config("prepare", fresh).data)
    dm.setup()  # without prepare_data: a single process prepares on demand
    assert dm.manifest_path.is_file() and len(dm.train_set) > 0
    with pytest.raises(DataError, match="does not exist"):
        make(synthetic_overrides, f"data.source={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="data.mapping.unmapped"):
        make(synthetic_overrides, "data.mapping.unmapped=sometimes")
