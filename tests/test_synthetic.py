"""The synthetic ESC-50-layout dataset: layout, determinism, learnability, full path to a batch."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from faultsense.data import esc50, manifest
from faultsense.data.synthetic import CATEGORIES, main, write_synthetic
from faultsense.taxonomy import LABELS
from tests.fixtures.data import SYNTH, compose_config


def _meta(root: Path) -> list[dict[str, str]]:
    with open(root / "meta" / "esc50.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_layout_matches_the_esc50_release(synthetic_source: Path):
    with open(synthetic_source / "meta" / "esc50.csv", newline="") as f:
        assert next(csv.reader(f)) == list(esc50.META_COLUMNS)
    meta = _meta(synthetic_source)
    assert len(meta) == SYNTH["clips_per_class"] * len(CATEGORIES)
    assert sorted(p.name for p in (synthetic_source / "audio").iterdir()) == sorted(
        r["filename"] for r in meta
    )
    for r in meta:
        fold, _, take, target = re.fullmatch(
            r"(\d)-(\d+)-([A-Z])-(\d+)\.wav", r["filename"]
        ).groups()
        assert (fold, take, target) == (r["fold"], r["take"], r["target"])
    assert {int(r["fold"]) for r in meta} == {1, 2, 3, 4, 5}
    info = sf.info(synthetic_source / "audio" / meta[0]["filename"])
    assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
    assert info.duration == SYNTH["seconds"]


def test_default_mapping_covers_all_labels_and_leaves_one_category_unmapped(synthetic_source: Path):
    mapping = esc50.parse_mapping(compose_config("prepare").data.mapping)
    categories = {r["category"] for r in _meta(synthetic_source)}
    labels = {mapping.label_for(c) for c in categories}
    assert labels == set(LABELS) | {esc50.AUX_ONLY}
    assert [c for c in categories if mapping.label_for(c) == esc50.AUX_ONLY] == ["dog"]


def test_same_seed_same_bytes_other_seed_other_audio(tmp_path: Path):
    def digest(root: Path) -> str:
        files = sorted((root / "audio").iterdir())
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()

    a = write_synthetic(tmp_path / "a", clips_per_class=2, seed=3, seconds=0.5)
    b = write_synthetic(tmp_path / "b", clips_per_class=2, seed=3, seconds=0.5)
    c = write_synthetic(tmp_path / "c", clips_per_class=2, seed=4, seconds=0.5)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_labels_are_separable_by_a_trivial_spectral_classifier(synthetic_source: Path):
    """Nearest class centroid on log band energies: if this can't separate the labels,
    no small model will. Train on folds 1-3, score fold 4 + 5."""
    mapping = esc50.parse_mapping(
        compose_config("prepare", ["data.mapping.unmapped=drop"]).data.mapping
    )
    rows, _ = esc50.clip_rows(synthetic_source, mapping)

    def features(path: str) -> np.ndarray:
        wave, sr = sf.read(path, dtype="float32")
        power = np.abs(np.fft.rfft(wave)) ** 2
        bands = np.array_split(power, 32)
        energy = np.log(np.array([b.sum() for b in bands]) + 1e-6)
        # Envelope roughness separates steady noise from impacts, crackles and drips.
        frames = wave[: len(wave) // 441 * 441].reshape(-1, 441)
        env = np.log(np.sqrt((frames**2).mean(axis=1)) + 1e-6)
        return np.concatenate([energy - energy.mean(), [env.std() * 4]])

    x = np.stack([features(r.path) for r in rows])
    y = np.array([LABELS.index(r.label) for r in rows])
    folds = np.array([r.fold for r in rows])
    train = folds <= 3
    centroids = np.stack([x[train & (y == k)].mean(axis=0) for k in range(len(LABELS))])
    pred = np.argmin(((x[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[~train]).mean() >= 0.9


def test_generated_on_first_use_and_through_the_full_path_to_a_batch(tmp_path: Path):
    from faultsense.data.datamodule import build_datamodule

    cfg = compose_config(
        "prepare",
        [
            "data=synthetic",
            f"paths.root_dir={tmp_path}",
            "data.synthetic.clips_per_class=5",
            "data.synthetic.seconds=1.0",
            "data.clip_seconds=1.0",
            "data.batch_size=4",
            "data.progress=false",
        ],
    )
    dm = build_datamodule(cfg.data)
    dm.prepare_data()
    dm.setup()
    assert (tmp_path / "data" / "synthetic" / "meta" / "esc50.csv").is_file()
    assert dm.has_test and dm.folds_present == [1, 2, 3, 4, 5]
    assert sum(dm.class_counts.values()) == 8 * 3  # 8 mapped categories x folds 1-3
    waves, labels, _ = next(iter(dm.train_dataloader()))
    assert waves.shape == (4, 16000) and waves.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert waves.abs().max() <= 1.0 and waves.abs().max() > 0.1
    assert set(labels.tolist()) <= set(range(len(LABELS))) | {-1}  # -1: dog, aux-only
    # The manifest is written and consistent with what was cached (dog kept as aux-only).
    rows = manifest.read_manifest(dm.manifest_path)
    assert len(rows) == 9 * 5 and {r.source for r in rows} == {"esc50"}
    assert {r.label for r in rows if r.category == "dog"} == {esc50.AUX_ONLY}
    assert all(r.duration == 1.0 for r in rows)


def test_synth_command_writes_the_folder(tmp_path: Path, capsys):
    main(
        ["--out", str(tmp_path / "s"), "--clips-per-class", "1", "--seconds", "0.5", "--folds", "1"]
    )
    assert "wrote 9 clips" in capsys.readouterr().out
    assert len(_meta(tmp_path / "s")) == 9
