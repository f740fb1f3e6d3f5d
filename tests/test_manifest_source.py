"""The manifest source (`data=manifest`): CSV or JSON lines, relative paths from the
manifest's folder, `offset`/`duration` segments of long recordings decoded once into
the cache (the cached clip is the decoded segment), segments of one recording in one
fold, clear errors naming the line; manifests of either column set read back."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from faultsense import audio
from faultsense.data import manifest
from faultsense.data.cache import INT16_SCALE
from faultsense.data.datamodule import build_datamodule, prepared_datamodule
from faultsense.data.manifest import ManifestRow
from faultsense.data.manifest_file import ManifestFileSource
from faultsense.errors import DataError
from tests.fixtures.data import compose_config
from tests.test_folder_source import OWN_LABELS, folder_overrides, sound

SR = 16_000


def long_recordings(root: Path, per_label: int = 2, seconds: float = 4.0) -> list[Path]:
    """`root/rec/<label>_<i>.wav`, 16 kHz, one long recording per (label, i)."""
    rng = np.random.default_rng(3)
    paths = []
    for label in OWN_LABELS:
        for i in range(per_label):
            path = root / "rec" / f"{label}_{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, sound(label, seconds, SR, rng), SR)
            paths.append(path)
    return paths


def segment_entries(paths: list[Path]) -> list[dict]:
    """Three 0.6 s segments per recording (relative paths), labeled by file name."""
    return [
        {"path": f"rec/{p.name}", "label": p.stem.rsplit("_", 1)[0], "offset": o, "duration": 0.6}
        for p in paths
        for o in (0.25, 1.5, 3.1)
    ]


def write_csv(path: Path, entries: list[dict]) -> Path:
    keys = list(entries[0])
    lines = [",".join(keys)] + [",".join(str(e[k]) for k in keys) for e in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


def manifest_overrides(tmp_path: Path, source: Path, *extra: str) -> list[str]:
    """Two folds (val 1, no test): the manifests here list few recordings."""
    folds = ["data.num_folds=2", "data.val_fold=1", "data.test_fold=null"]
    return folder_overrides(tmp_path, source, *folds, *extra, kind="manifest")


def test_the_cached_clip_is_the_decoded_segment(tmp_path: Path):
    paths = long_recordings(tmp_path)
    source = write_csv(tmp_path / "clips.csv", segment_entries(paths))
    dm = prepared_datamodule(compose_config("prepare", manifest_overrides(tmp_path, source)).data)
    assert dm.labels == sorted(OWN_LABELS)
    cache = dm.caches[0]
    # 0.6 s segments, 0.5 s clips: each segment gives a window at its start and one at its end.
    assert len(cache) == len(paths) * 3 * 2
    for i, row in enumerate(cache.rows):
        whole = audio.decode(row.path)
        start = int(round(row.offset * SR))
        assert row.duration == pytest.approx(0.5)
        np.testing.assert_allclose(
            cache.waves[i] / INT16_SCALE, whole[start : start + dm.clip_samples], atol=1e-4
        )
    assert sorted({r.offset for r in cache.rows if r.path == str(paths[0])}) == pytest.approx(
        [0.25, 0.35, 1.5, 1.6, 3.1, 3.2]
    )
    # Segments of one recording (the default group: its file) share a fold.
    folds = defaultdict(set)
    for row in cache.rows:
        folds[row.recording].add(row.fold)
    assert set(folds) == {p.relative_to(tmp_path).as_posix() for p in paths}
    assert all(len(f) == 1 for f in folds.values())
    written = manifest.read_manifest(dm.manifest_path)
    assert written == cache.rows  # segment columns round-trip


def test_without_windows_a_segment_is_decoded_once_and_fixed_to_the_clip(tmp_path: Path):
    paths = long_recordings(tmp_path, per_label=1)
    entries = [
        {"path": str(p), "label": p.stem[:-2], "offset": 1.0, "duration": 0.3} for p in paths
    ]
    source = write_csv(tmp_path / "abs.csv", entries)
    source_rows = ManifestFileSource(source, num_folds=2).rows(create=False)
    assert [r.length for r in source_rows] == [0.3] * 3
    dm = prepared_datamodule(
        compose_config(
            "prepare", manifest_overrides(tmp_path, source, "data.train_hop_seconds=null")
        ).data
    )
    row = dm.caches[0].rows[0]
    whole = audio.decode(row.path)
    expected = audio.fix_length(whole[SR : SR + int(0.3 * SR)], dm.clip_samples)  # zero-padded
    np.testing.assert_allclose(dm.caches[0].waves[0] / INT16_SCALE, expected, atol=1e-4)
    assert row.duration == pytest.approx(0.3)


def test_json_lines_with_nemo_keys_and_given_folds_and_groups(tmp_path: Path):
    paths = long_recordings(tmp_path, per_label=2, seconds=1.0)
    lines = [
        {"audio_filepath": f"rec/{p.name}", "label": p.stem[:-2], "fold": 1 + i % 2, "group": "m"}
        for i, p in enumerate(paths)
    ]
    source = tmp_path / "train_manifest.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    rows = ManifestFileSource(source).rows(create=False)
    assert [r.fold for r in rows] == [1, 2] * 3 and {r.group for r in rows} == {"m"}
    assert [r.path for r in rows] == [str(p) for p in paths]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,label\nrec/idle_0.wav,\n", r"clips.csv line 2: no label"),
        ("label\nidle\n", r"clips.csv line 2: no path"),
        ("path,label,offset\nrec/idle_0.wav,idle,soon\n", r"line 2: offset 'soon' is not a number"),
        ("path,label,duration\nrec/idle_0.wav,idle,-1\n", r"line 2: duration '-1' must be >= 0"),
        ("path,label\nrec/nope.wav,idle\n", r"line 2: .*nope.wav does not exist"),
        ("path,label\nrec/idle_0.wav,idle\nrec/idle_0.wav,idle\n", r"line 3: clip .* listed twice"),
    ],
)
def test_a_bad_entry_is_a_data_error_naming_its_line(tmp_path: Path, text: str, match: str):
    long_recordings(tmp_path, per_label=1, seconds=1.0)
    (tmp_path / "clips.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        ManifestFileSource(tmp_path / "clips.csv", num_folds=2).rows(create=False)


def test_a_segment_past_the_end_of_its_file_stops_the_cache_by_name(tmp_path: Path):
    paths = long_recordings(tmp_path, per_label=1, seconds=1.0)
    entries = [{"path": f"rec/{p.name}", "label": p.stem[:-2], "offset": 0.0} for p in paths]
    entries[0]["offset"] = 5.0
    source = write_csv(tmp_path / "clips.csv", entries)
    dm = build_datamodule(compose_config("prepare", manifest_overrides(tmp_path, source)).data)
    with pytest.raises(DataError, match=r"bear.*_0.wav \[5 s \+ end\]: the segment starts after"):
        dm.prepare_data()


def test_manifests_with_and_without_the_segment_columns_read_back(tmp_path: Path):
    plain = ManifestRow("a", "/a.wav", "", "idle", 1, "folder", 1.0)
    cut = ManifestRow("b#1", "/b.wav", "", "idle", 2, "manifest", 0.5, "b", 1.25, 0.5)
    old = manifest.write_manifest([plain], tmp_path / "old.csv")
    assert old.read_text().splitlines()[0] == "id,path,category,label,fold,source,duration"
    new = manifest.write_manifest([plain, cut], tmp_path / "new.csv")
    assert new.read_text().splitlines()[0].endswith(",duration,group,offset,length")
    assert manifest.read_manifest(old) == [plain]
    assert manifest.read_manifest(new) == [plain, cut]
    assert cut.recording == "b" and plain.recording == "a" and cut.is_segment
