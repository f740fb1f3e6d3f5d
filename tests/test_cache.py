"""Waveform cache: content, reuse, rebuild on fingerprint change, corrupt clips in both
`skip_bad` modes, and no usable half-cache after a crash mid-build."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from faultsense import audio
from faultsense.data import cache, esc50, manifest
from faultsense.data.synthetic import write_synthetic
from faultsense.errors import DataError
from tests.fixtures.data import compose_config

REPO = Path(__file__).resolve().parents[1]
SR = 16_000  # sources written at the model rate: no resampling, so no torch in subprocesses
CLIP = SR  # 1 s


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_synthetic(
        tmp_path / "src", clips_per_class=2, seconds=1.0, sample_rate=SR, folds=2
    )


def mapping() -> esc50.FaultMapping:
    return esc50.parse_mapping(compose_config("prepare").data.mapping)


def rows_of(root: Path) -> list[manifest.ManifestRow]:
    return esc50.clip_rows(root, mapping())[0]


def build(rows, cache_root, **kw):
    kw = {
        "sample_rate": SR,
        "clip_samples": CLIP,
        "mapping": mapping().to_dict(),
        "progress": False,
    } | kw
    return cache.get_or_build(rows, cache_root, "t", **kw)


def test_cache_holds_decoded_fixed_length_int16_rows(tmp_path: Path, source: Path):
    rows = rows_of(source)
    built = build(rows, tmp_path / "c", clip_samples=CLIP // 2)
    waves = built.waves
    assert waves.dtype == np.int16 and waves.shape == (len(rows), CLIP // 2)
    assert [r.id for r in built.rows] == [r.id for r in rows]
    for i in (0, len(rows) - 1):
        expected = audio.fix_length(audio.decode(rows[i].path), CLIP // 2)
        np.testing.assert_allclose(waves[i] / cache.INT16_SCALE, expected, atol=1 / 32767)
    assert all(r.duration == 1.0 for r in built.rows)  # the decoded length, before fix_length
    index = json.loads((built.path / "index.json").read_text())
    assert index["fingerprint"] == built.fingerprint and index["sample_rate"] == SR


def test_unchanged_inputs_reuse_the_cache(tmp_path: Path, source: Path, caplog):
    first = build(rows_of(source), tmp_path / "c")
    stamp = first.data_path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="faultsense.data.cache"):
        again = build(rows_of(source), tmp_path / "c")
    assert again.path == first.path and again.data_path.stat().st_mtime_ns == stamp
    assert "Reusing" in caplog.text


@pytest.mark.parametrize("change", ["sample_rate", "clip_length", "mapping", "file"])
def test_a_fingerprint_change_builds_a_new_cache(tmp_path: Path, source: Path, change: str):
    rows = rows_of(source)
    old = build(rows, tmp_path / "c")
    kw = {}
    if change == "sample_rate":
        kw = {"sample_rate": 8000}
    elif change == "clip_length":
        kw = {"clip_samples": CLIP // 4}
    elif change == "mapping":
        kw = {"mapping": {**mapping().to_dict(), "unmapped": "normal"}}
    else:  # new audio under the same name
        sf.write(rows[0].path, np.full(SR, 0.25, dtype=np.float32), SR, subtype="PCM_16")
    new = build(rows, tmp_path / "c", **kw)
    assert new.fingerprint != old.fingerprint and new.path != old.path
    assert old.path.is_dir()  # caches of other settings/sources are left alone
    if change == "file":
        assert np.all(new.waves[0] == round(0.25 * cache.INT16_SCALE))
        assert not np.array_equal(new.waves[0], old.waves[0])


def test_a_corrupt_clip_stops_the_build_and_names_the_file(tmp_path: Path, source: Path):
    rows = rows_of(source)
    Path(rows[3].path).write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(DataError, match=rf"{Path(rows[3].path).name}.*data\.skip_bad=true"):
        build(rows, tmp_path / "c")
    left = [p for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # no cache folder, no temp folder


def test_skip_bad_reports_the_clip_and_builds_without_it(tmp_path: Path, source: Path, caplog):
    rows = rows_of(source)
    bad = Path(rows[3].path)
    bad.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        built = build(rows, tmp_path / "c", skip_bad=True)
    assert bad.name in caplog.text
    assert len(built) == len(rows) - 1 and rows[3].id not in {r.id for r in built.rows}
    assert built.waves.shape == (len(rows) - 1, CLIP)
    assert built.skipped[0]["path"] == str(bad) and "empty" in built.skipped[0]["error"]
    # Reusing the cache reports the skipped clip again.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert build(rows, tmp_path / "c", skip_bad=True).path == built.path
    assert bad.name in caplog.text


def test_a_truncated_cache_file_is_not_reused(tmp_path: Path, source: Path):
    rows = rows_of(source)
    built = build(rows, tmp_path / "c")
    os.truncate(built.data_path, 100)
    assert cache.load_cache(built.path, built.fingerprint) is None
    rebuilt = build(rows, tmp_path / "c")
    assert rebuilt.waves.shape == (len(rows), CLIP)


CRASHING_BUILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from faultsense import audio
    from faultsense.data import cache, manifest

    real_decode, calls = audio.decode, 0

    def decode_then_crash(*args, **kwargs):  # power loss after 5 clips
        global calls
        calls += 1
        if calls == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_decode(*args, **kwargs)

    audio.decode = decode_then_crash
    spec = json.load(open(sys.argv[1]))
    rows = [manifest.ManifestRow.from_dict(r) for r in spec["rows"]]
    cache.get_or_build(rows, spec["root"], "t", sample_rate=spec["sr"], clip_samples=spec["n"],
                       mapping=spec["mapping"], progress=False)
    """
)


@pytest.mark.timeout(120)
def test_a_build_killed_midway_leaves_no_usable_cache(tmp_path: Path, source: Path):
    rows = rows_of(source)
    spec = {
        "rows": [r.as_dict() for r in rows],
        "root": str(tmp_path / "c"),
        "sr": SR,
        "n": CLIP,
        "mapping": mapping().to_dict(),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_BUILD, str(tmp_path / "spec.json")],
        cwd=REPO,
        capture_output=True,
        timeout=100,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    fp = cache.fingerprint(rows, sample_rate=SR, clip_samples=CLIP, mapping=mapping().to_dict())
    final = cache.cache_path(tmp_path / "c", "t", fp)
    assert not final.exists()
    assert cache.load_cache(final, fp) is None
    assert list((tmp_path / "c").glob(".tmp-*"))  # the dead build's leftovers, never used
    built = build(rows, tmp_path / "c")
    assert built.path == final and len(built) == len(rows)
    assert not list((tmp_path / "c").glob(".tmp-*"))  # cleaned up by the next build
