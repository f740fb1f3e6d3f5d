"""The folder source (`data=folder`): one sub-folder per label, any format and sample
rate, labels of the user's own (not the fault labels), optional metadata.csv, folds by
stratified group k-fold over recordings, long clips as windows, `make data` quoting,
and a smoke training run that learns the three labels.

`write_recordings` is the generator the manifest and split tests use too: per label,
`recordings` recordings of `chunks` chunks `<rec>_<n>.<wav|flac>` at 16, 22.05 or
44.1 kHz, each label a different learnable sound.
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from faultsense import audio
from faultsense.data.datamodule import build_datamodule, prepared_datamodule
from faultsense.data.folder import FolderSource
from faultsense.errors import DataError
from tests.fixtures.data import compose_config

ROOT = Path(__file__).resolve().parents[1]
OWN_LABELS = ("bearing_wear", "cavitation", "idle")  # none of them a fault label
GROUP_BY = "(.*)_[0-9]+"
RATES = ((16_000, "wav"), (22_050, "flac"), (44_100, "wav"))


def sound(label: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable sound per label: a 900 Hz tone, broadband noise, a 150 Hz hum."""
    t = np.arange(int(seconds * sr)) / sr
    if label == "bearing_wear":
        wave = 0.4 * np.sin(2 * np.pi * rng.uniform(870, 930) * t)
    elif label == "cavitation":
        wave = 0.3 * rng.standard_normal(len(t))
    else:
        wave = 0.4 * np.sin(2 * np.pi * rng.uniform(140, 160) * t)
    return (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_recordings(
    root: Path, recordings: int = 4, chunks: int = 2, seconds: float = 1.0, seed: int = 0
) -> Path:
    """`root/<label>/<rec>_<n>.<wav|flac>` for OWN_LABELS; returns `root`."""
    rng = np.random.default_rng(seed)
    for label in OWN_LABELS:
        (root / label).mkdir(parents=True, exist_ok=True)
        for r in range(recordings):
            for c in range(chunks):
                sr, fmt = RATES[(r + c) % len(RATES)]
                path = root / label / f"{label[:4]}{r}_{c}.{fmt}"
                sf.write(path, sound(label, seconds, sr, rng), sr)
    return root


def folder_overrides(tmp_path: Path, source: Path, *extra: str, kind: str = "folder") -> list[str]:
    """A data config of `kind` (folder or manifest) over `source`, 0.5 s clips, under tmp_path."""
    return [
        f"data={kind}",
        f"paths.root_dir={tmp_path}",
        f"data.source={source}",
        "data.clip_seconds=0.5",
        "data.batch_size=8",
        "data.progress=false",
        *extra,
    ]


def folds_by_recording(rows) -> dict[str, set[int]]:
    folds = defaultdict(set)
    for row in rows:
        folds[row.recording].add(row.fold)
    return folds


def test_folders_give_the_labels_and_chunks_of_a_recording_share_a_fold(tmp_path: Path):
    root = write_recordings(tmp_path / "own", recordings=5)
    (root / "README.txt").write_text("not audio")
    source = FolderSource(root, group_by=GROUP_BY)
    rows = source.rows(create=False)
    assert source.labels == sorted(OWN_LABELS) and len(rows) == 3 * 5 * 2
    assert {r.source for r in rows} == {"folder"} and all(Path(r.path).is_file() for r in rows)
    by_recording = folds_by_recording(rows)
    assert len(by_recording) == 15 and all(len(f) == 1 for f in by_recording.values())
    # 5 recordings per label over 5 folds: each fold holds one recording of each label.
    for label in OWN_LABELS:
        assert sorted(r.fold for r in rows if r.label == label) == sorted([1, 2, 3, 4, 5] * 2)
    assert FolderSource(root, group_by=GROUP_BY).rows(create=False) == rows  # deterministic
    # Without group_by each file is its own group: chunks may land in different folds.
    alone = FolderSource(root).rows(create=False)
    assert {r.recording for r in alone} == {r.id for r in alone}


def test_any_rate_and_format_reaches_batches_with_the_own_labels(tmp_path: Path):
    root = write_recordings(tmp_path / "own", recordings=5)
    dm = prepared_datamodule(
        compose_config(
            "prepare", folder_overrides(tmp_path, root, f"data.group_by='{GROUP_BY}'")
        ).data
    )
    assert dm.labels == sorted(OWN_LABELS) and dm.folds_present == [1, 2, 3, 4, 5]
    assert dm.class_counts == {label: 3 * 2 * 2 for label in OWN_LABELS}  # 1 s chunks -> 2 windows
    cached = dm.caches[0]
    assert cached.sample_rate == 16_000 and {Path(r.path).suffix for r in cached.rows} == {
        ".wav",
        ".flac",
    }
    i = next(i for i, r in enumerate(cached.rows) if r.path.endswith(".flac"))
    row = cached.rows[i]
    whole = audio.decode(row.path)
    start = int(round(row.offset * 16_000))
    expected = audio.fix_length(whole[start:], dm.clip_samples)
    # Resampled per segment: only the last few samples feel the cut.
    np.testing.assert_allclose(cached.waves[i][:-50] / 32767.0, expected[:-50], atol=2e-3)
    waves, labels, _ = next(iter(dm.train_dataloader()))
    assert waves.shape == (8, 8000) and set(labels.tolist()) <= {0, 1, 2}


def test_metadata_csv_overrides_the_folders(tmp_path: Path):
    root = write_recordings(tmp_path / "own", recordings=2, chunks=1)
    sf.write(root / "loose.wav", sound("idle", 1.0, 16_000, np.random.default_rng(1)), 16_000)
    (root / "metadata.csv").write_text(
        "file_name,label,group\n"
        "idle/idle0_0.wav,cavitation,\n"  # relabelled
        "loose.wav,idle,pumpX\n"  # outside any label folder: needs its label
        "bearing_wear/bear0_0.wav,,pumpX\n"  # empty label: the folder's; group given
    )
    source = FolderSource(root, num_folds=2)
    rows = {r.id: r for r in source.rows(create=False)}
    assert rows["idle/idle0_0.wav"].label == "cavitation"
    assert rows["loose.wav"].label == "idle" and rows["loose.wav"].group == "pumpX"
    assert rows["bearing_wear/bear0_0.wav"].label == "bearing_wear"
    assert rows["loose.wav"].fold == rows["bearing_wear/bear0_0.wav"].fold  # one group
    # Folds from metadata are kept as they are; some with and some without is an error.
    (root / "metadata.csv").write_text("file_name,fold\nidle/idle0_0.wav,3\n")
    with pytest.raises(DataError, match="1 of 6 clips have a fold; give every clip a fold"):
        FolderSource(root, num_folds=2).rows(create=False)
    (root / "metadata.csv").write_text("file_name,label\ngone.wav,idle\n")
    with pytest.raises(DataError, match=r"metadata.csv: gone.wav: .*gone.wav does not exist"):
        FolderSource(root, num_folds=2).rows(create=False)


def test_explicit_labels_set_the_order_and_an_unknown_label_names_the_file(tmp_path: Path):
    root = write_recordings(tmp_path / "own", recordings=5, chunks=1)
    order = "[idle,cavitation,bearing_wear]"
    dm = prepared_datamodule(
        compose_config("prepare", folder_overrides(tmp_path, root, f"data.labels={order}")).data
    )
    assert dm.labels == ["idle", "cavitation", "bearing_wear"]
    idle = [i for i, r in enumerate(dm.caches[0].rows) if r.label == "idle"]
    assert set(dm.train_set.labels.tolist()) == {0, 1, 2} and idle
    dm = build_datamodule(
        compose_config(
            "prepare", folder_overrides(tmp_path, root, "data.labels=[idle,cavitation]")
        ).data
    )
    with pytest.raises(
        DataError,
        match=r"bear0_0.wav is labeled 'bearing_wear', which is not one of data.labels: idle, cavitation",
    ):
        dm.prepare_data()


def test_a_long_recording_becomes_windows_of_one_group_and_fold(tmp_path: Path):
    root = write_recordings(tmp_path / "own", recordings=5, chunks=1)
    long = root / "idle" / "long_0.wav"
    sf.write(long, sound("idle", 2.2, 16_000, np.random.default_rng(2)), 16_000)
    dm = prepared_datamodule(
        compose_config(
            "prepare",
            folder_overrides(
                tmp_path, root, f"data.group_by='{GROUP_BY}'", "data.train_hop_seconds=0.4"
            ),
        ).data
    )
    windows = [r for r in dm.caches[0].rows if r.path == str(long)]
    # 0, .4, .8, 1.2, 1.6 and the tail window ending at 2.2 s.
    assert [r.offset for r in windows] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 1.7])
    assert {r.group for r in windows} == {"long"} and len({r.fold for r in windows}) == 1
    assert all(r.length == 0.5 and r.duration == pytest.approx(0.5) for r in windows)
    whole = audio.decode(long)
    for row in windows:
        i = dm.caches[0].rows.index(row)
        start = int(round(row.offset * 16_000))
        np.testing.assert_allclose(
            dm.caches[0].waves[i] / 32767.0, whole[start : start + 8000], atol=1e-4
        )


def test_make_data_takes_the_group_by_regex_quoted_for_hydra(tmp_path: Path):
    """The README's command, through make and the shell: a Hydra-quoted regex survives."""
    root = write_recordings(tmp_path / "own", recordings=4)
    args = (
        f"data=folder data.source={root} 'data.group_by=\"{GROUP_BY}\"' "
        f"paths.root_dir={tmp_path} data.clip_seconds=0.5 data.progress=false"
    )
    out = subprocess.run(
        ["make", "-s", "data", f"ARGS={args}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "clips (recordings)" in out.stdout
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line}
    # 4 recordings per label over 5 folds: one label misses val or test, and it says so.
    for label in OWN_LABELS:
        recordings = [int(c.strip("()")) for c in lines[label][1::2]][-3:]
        assert sum(recordings) == 4, lines[label]
    assert "warning: label" in out.stdout and "has no clip in" in out.stdout


def test_smoke_training_learns_three_labels_of_its_own(tmp_path: Path):
    from faultsense.train import train

    root = write_recordings(tmp_path / "own", recordings=6, chunks=2)
    cfg = compose_config(
        "train",
        [
            "experiment=smoke",
            *folder_overrides(tmp_path, root, f"data.group_by='{GROUP_BY}'"),
            f"paths.output_dir={tmp_path}/run",
            "data.num_folds=3",
            "data.val_fold=2",
            "data.test_fold=3",
            "logger=none",
            "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "trainer.max_epochs=6",
        ],
    )
    metrics = train(cfg)
    # Chance is 1/3; the three sounds are easy, so a working pipeline gets them right.
    assert metrics["val/f1_macro"] >= 0.8 and metrics["test/f1_macro"] >= 0.8, dict(metrics)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["labels"] == sorted(OWN_LABELS)
    assert np.array(summary["confusion"]["test"]).shape == (3, 3)
    # The 1-s files were 0.5-s windows in training; each is also scored whole, as served.
    from faultsense.data.datamodule import prepared_datamodule
    from faultsense.recordings import split_rows

    dm = prepared_datamodule(cfg.data)
    val_files = {r.path for r in split_rows(dm.caches, dm.val_set)}
    assert summary["metrics"]["val/recordings"] == len(val_files) > 0
    assert metrics["val/recording_f1_macro"] >= 0.8 and "test/recording_acc" in metrics


def test_windowed_rows_are_scored_as_the_recordings_they_came_from(tmp_path: Path):
    from faultsense.data.manifest import ManifestRow
    from faultsense.recordings import macro_f1, recordings

    def row(rid: str, offset: float = 0.0, length: float | None = None) -> ManifestRow:
        return ManifestRow(
            id=rid,
            path=f"/x/{rid.split('#')[0]}.wav",
            category="",
            label="idle",
            fold=1,
            source="folder",
            offset=offset,
            length=length,
        )

    whole = [row("a"), row("b")]
    assert recordings(whole) == []  # nothing windowed: the clip metrics are the recordings'
    windows = [row("long#0", 1.0, 0.5), row("long#1", 1.5, 0.5), row("long#2", 1.7, 0.5), row("a")]
    spans = {r.id: (r.offset, r.length) for r in recordings(windows)}
    assert spans == {"long": (1.0, pytest.approx(1.2)), "a": (0.0, None)}
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), 3) == pytest.approx(2 / 3)
