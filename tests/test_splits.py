"""Leak-free splits: stratified group k-fold keeps a recording in one fold, spreads each
label evenly, is deterministic for its seed; the split table flags a label missing from
a split and a recording in two; `faultsense-cv` rotates over the group folds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from faultsense.data import splits
from faultsense.data.manifest import ManifestRow, read_manifest
from faultsense.errors import ConfigError, DataError
from tests.test_folder_source import GROUP_BY, OWN_LABELS, write_recordings

ROOT = Path(__file__).resolve().parents[1]


def grouped(labels_groups: list[tuple[str, str]], folds: list[int]) -> dict[str, set[int]]:
    by_group = defaultdict(set)
    for (_, group), fold in zip(labels_groups, folds, strict=True):
        by_group[group].add(fold)
    return by_group


def items(groups_per_label: int, sizes=(1, 2, 3)) -> list[tuple[str, str]]:
    """(label, group) per clip: groups of varied sizes, `groups_per_label` per label."""
    return [
        (label, f"{label}-{g}")
        for label in OWN_LABELS
        for g in range(groups_per_label)
        for _ in range(sizes[g % len(sizes)])
    ]


def test_groups_stay_in_one_fold_and_every_label_spreads_evenly():
    data = items(10)
    labels, groups = [lab for lab, _ in data], [g for _, g in data]
    folds = splits.stratified_group_folds(labels, groups, num_folds=5, seed=0)
    assert set(folds) == {1, 2, 3, 4, 5}
    assert all(len(f) == 1 for f in grouped(data, folds).values())
    for label in OWN_LABELS:
        per_fold = Counter(f for lab, f in zip(labels, folds, strict=True) if lab == label)
        # 20 clips of each label in groups of 1-3: within one group size of the mean 4.
        assert max(per_fold.values()) - min(per_fold.values()) <= 2, per_fold
        assert len(per_fold) == 5  # every fold holds some of every label


def test_folds_are_deterministic_for_a_seed_and_the_seed_matters():
    data = items(6, sizes=(2,))
    labels, groups = [lab for lab, _ in data], [g for _, g in data]
    first = splits.stratified_group_folds(labels, groups, 3, seed=7)
    assert splits.stratified_group_folds(labels, groups, 3, seed=7) == first
    others = [splits.stratified_group_folds(labels, groups, 3, seed=s) for s in range(5)]
    assert any(o != first for o in others)


def rows_of(data: list[tuple[str, str]], fold: int = 0) -> list[ManifestRow]:
    return [
        ManifestRow(f"c{i}", f"/x/{g}_{i}.wav", "", lab, fold, "folder", group=g)
        for i, (lab, g) in enumerate(data)
    ]


def test_assign_folds_keeps_given_folds_and_refuses_what_cannot_work():
    given = rows_of(items(2), fold=3)
    assert splits.assign_folds(given, num_folds=5, seed=0, where="w") == given
    mixed = given[:1] + rows_of(items(2))[1:]
    with pytest.raises(DataError, match="w: 1 of .* clips have a fold"):
        splits.assign_folds(mixed, num_folds=5, seed=0, where="w")
    with pytest.raises(DataError, match="6 recording.s. cannot fill data.num_folds=7"):
        splits.assign_folds(rows_of(items(2)), num_folds=7, seed=0, where="w")
    with pytest.raises(ConfigError, match="data.num_folds must be >= 2"):
        splits.assign_folds(rows_of(items(2)), num_folds=1, seed=0, where="w")


def test_group_by_needs_a_capture_group_and_names_the_recording():
    pattern = splits.compile_group_by(GROUP_BY)
    assert splits.recording_of("pumpA_2024-01_17", pattern) == "pumpA_2024-01"
    assert splits.recording_of("no-chunk-number", pattern) is None
    with pytest.raises(ConfigError, match="has no capture group"):
        splits.compile_group_by(".*_[0-9]+")
    with pytest.raises(ConfigError, match="is not a regular expression"):
        splits.compile_group_by("(.*")


def test_split_table_counts_clips_and_groups_and_flags_gaps_and_leaks():
    rows = rows_of([("idle", "a"), ("idle", "a"), ("idle", "b"), ("cavitation", "c")])
    rows = [
        ManifestRow(r.id, r.path, "", r.label, f, "folder", group=r.group)
        for r, f in zip(rows, [1, 2, 1, 1], strict=True)
    ]
    table = splits.split_table(rows, ["cavitation", "idle"], val_fold=2, test_fold=None)
    assert table.clips["idle", "train"] == 2 and table.clips["idle", "val"] == 1
    assert table.groups["idle", "train"] == {"a", "b"}
    assert "label 'cavitation' has no clip in val." in table.warnings
    assert any("1 group(s) have clips in two splits (e.g. 'a')" in w for w in table.warnings)


def test_faultsense_cv_rotates_the_group_folds_of_a_folder(tmp_path: Path):
    """The README's command: CV over stratified group folds, no recording in two splits."""
    source = write_recordings(tmp_path / "own", recordings=3, chunks=2)
    out_dir = tmp_path / "cv"
    args = [
        "data=folder",
        f"data.source={source}",
        f"data.group_by='{GROUP_BY}'",
        "data.num_folds=3",
        "data.test_fold=3",
        "data.clip_seconds=0.5",
        "experiment=smoke",
        "logger=none",
        f"paths.root_dir={tmp_path}",
        "data.progress=false",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={out_dir}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "faultsense.cv", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    (entry,) = json.loads((out_dir / "cv.json").read_text())["models"].values()
    assert entry["folds"] == [1, 2] and "test/f1_macro" in entry["metrics"]
    rows = read_manifest(tmp_path / "data" / "manifests" / "folder.csv")
    assert len(rows) == 3 * 3 * 2 * 2 and {r.label for r in rows} == set(OWN_LABELS)
    folds = defaultdict(set)
    for row in rows:
        folds[row.group].add(row.fold)
    assert len(folds) == 9 and all(len(f) == 1 for f in folds.values())  # no leak
    for job in entry["jobs"]:
        assert json.loads((Path(job) / "metrics.json").read_text())["labels"] == sorted(OWN_LABELS)
