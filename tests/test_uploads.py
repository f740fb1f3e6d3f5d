"""UploadStore: store, normalize, dedupe, bad label, bad audio, manifest consistency, and
an upload killed midway leaves no partial file or row."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from faultsense.data.uploads import UPLOAD_COLUMNS, UploadStore
from faultsense.errors import AudioError, LabelError
from faultsense.taxonomy import LABELS

REPO = Path(__file__).resolve().parents[1]


def wav_bytes(
    seed: int, seconds: float = 0.5, sr: int = 16_000, channels: int = 1, fmt: str = "WAV"
) -> bytes:
    rng = np.random.default_rng(seed)
    wave = 0.3 * rng.standard_normal((int(seconds * sr), channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def assert_consistent(store: UploadStore) -> None:
    """Every row's file exists with the recorded hash; no file without a row; no temp files."""
    rows = store.rows()
    for row in rows:
        path = store.root / row["path"]
        assert path == store.root / row["label"] / f"{row['sha256']}.wav"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
    files = {p.relative_to(store.root).as_posix() for p in store.root.rglob("*.wav")}
    assert files == {r["path"] for r in rows}
    assert not [p for p in store.root.rglob("*") if ".tmp" in p.name]


def test_store_normalizes_to_16k_mono_and_records_a_row(tmp_path: Path):
    store = UploadStore(tmp_path / "up")
    result = store.add(
        wav_bytes(0, sr=44_100, channels=2), " fluid_leak ", "pump 3.wav", max_seconds=10
    )
    assert result.status == "stored" and result.label == "fluid_leak"
    assert result.path == tmp_path / "up" / "fluid_leak" / f"{result.sha256}.wav"
    info = sf.info(result.path)
    assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
    assert result.seconds == pytest.approx(0.5, abs=1e-3)
    with open(store.manifest_path, newline="") as f:
        assert tuple(next(csv.reader(f))) == UPLOAD_COLUMNS
    [row] = store.rows()
    assert row["filename"] == "pump 3.wav" and row["label"] == "fluid_leak"
    assert store.counts(LABELS) == {label: int(label == "fluid_leak") for label in LABELS}
    assert store.counts() == {"fluid_leak": 1}  # no label list: the labels stored
    assert_consistent(store)


def test_the_same_audio_twice_is_a_duplicate_even_with_another_label_or_container(tmp_path: Path):
    store = UploadStore(tmp_path / "up")
    first = store.add(wav_bytes(1), "normal", "a.wav", max_seconds=10)
    again = store.add(wav_bytes(1), "normal", "b.wav", max_seconds=10)
    relabeled = store.add(wav_bytes(1), "electrical_fault", "c.wav", max_seconds=10)
    samples, sr = sf.read(io.BytesIO(wav_bytes(1)), dtype="int16")
    flac = io.BytesIO()
    sf.write(flac, samples, sr, format="FLAC")  # the same samples in another container
    as_flac = store.add(flac.getvalue(), "normal", "a.flac", max_seconds=10)
    for dup in (again, relabeled, as_flac):
        assert dup.status == "duplicate" and dup.sha256 == first.sha256
        assert dup.label == "normal" and dup.path == first.path
    assert len(store.rows()) == 1 and store.counts()["normal"] == 1
    assert store.add(wav_bytes(2), "normal", max_seconds=10).status == "stored"
    assert len(store.rows()) == 2
    assert_consistent(store)


def test_unknown_label_is_rejected_and_nothing_is_written(tmp_path: Path):
    store = UploadStore(tmp_path / "up")
    with pytest.raises(LabelError, match="'leaky'.*mechanical_fault"):
        store.add(wav_bytes(0), "leaky", "x.wav", max_seconds=10, labels=LABELS)
    assert store.rows() == [] and not list((tmp_path / "up").rglob("*.wav"))


def test_any_safe_label_is_stored_and_counted_in_the_order_asked(tmp_path: Path):
    """Labels are data: the store takes any safe folder name (which labels the current
    model knows is the server's check) and counts what it holds."""
    store = UploadStore(tmp_path / "up")
    result = store.add(wav_bytes(4), " bearing_wear ", "p.wav", max_seconds=10)
    assert result.status == "stored" and result.label == "bearing_wear"
    assert result.path.parent == tmp_path / "up" / "bearing_wear"
    store.add(wav_bytes(5), "Idle-2", "q.wav", max_seconds=10)
    assert store.counts(["cavitation", "bearing_wear"]) == {
        "cavitation": 0, "bearing_wear": 1, "Idle-2": 1,
    }  # fmt: skip
    assert list(store.counts(["cavitation", "bearing_wear"])) == [
        "cavitation", "bearing_wear", "Idle-2",
    ]  # fmt: skip
    assert_consistent(store)


@pytest.mark.parametrize(
    "label", ["", "   ", "../normal", "a/b", "bearing wear", "normál", "x" * 65, ".hidden"]
)
def test_a_label_that_is_no_safe_folder_name_is_rejected(tmp_path: Path, label: str):
    store = UploadStore(tmp_path / "up")
    with pytest.raises(LabelError, match="letters, digits"):
        store.add(wav_bytes(0), label, "x.wav", max_seconds=10)
    assert store.rows() == [] and not list(tmp_path.rglob("*.wav"))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"this is not audio at all" * 10, "could not be decoded"),
        (wav_bytes(0)[:30], "pump.wav"),
        (wav_bytes(0, seconds=3.0), "longer than the limit of 2 s"),
    ],
)
def test_bad_audio_is_rejected_by_name_and_nothing_is_written(
    tmp_path: Path, data: bytes, match: str
):
    store = UploadStore(tmp_path / "up")
    with pytest.raises(AudioError, match=match) as err:
        store.add(data, "normal", "pump.wav", max_seconds=2)
    assert "pump.wav" in str(err.value)
    assert store.rows() == [] and not list((tmp_path / "up").rglob("*.wav"))


def test_client_filename_is_text_never_a_path(tmp_path: Path):
    store = UploadStore(tmp_path / "up")
    result = store.add(wav_bytes(3), "normal", "../../etc/evil\n.wav", max_seconds=10)
    assert result.path.parent == tmp_path / "up" / "normal"
    assert store.rows()[0]["filename"] == "evil.wav"
    assert not (tmp_path / "etc").exists()


def test_concurrent_uploads_keep_the_manifest_consistent(tmp_path: Path):
    errors: list[BaseException] = []

    def upload(seed: int) -> None:
        try:  # a separate store per thread, like separate server workers
            UploadStore(tmp_path / "up").add(wav_bytes(seed), LABELS[seed % 4], max_seconds=10)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=upload, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    store = UploadStore(tmp_path / "up")
    assert len(store.rows()) == 8 and sum(store.counts().values()) == 8
    assert_consistent(store)


KILLED_UPLOAD = textwrap.dedent(
    """
    import os, signal, sys
    from faultsense.data import uploads

    real_replace = os.replace

    def replace_then_die(src, dst):  # power loss while committing the manifest
        if str(dst).endswith("manifest.csv"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    uploads.os.replace = replace_then_die
    uploads.UploadStore(sys.argv[1]).add(open(sys.argv[2], "rb").read(), "normal", max_seconds=10)
    """
)


@pytest.mark.timeout(60)
def test_an_upload_killed_midway_leaves_no_partial_file_or_row(tmp_path: Path):
    store = UploadStore(tmp_path / "up")
    store.add(wav_bytes(10), "normal", "kept.wav", max_seconds=10)
    before = store.manifest_path.read_bytes()
    (tmp_path / "new.wav").write_bytes(wav_bytes(11))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_UPLOAD, str(store.root), str(tmp_path / "new.wav")],
        cwd=REPO,
        capture_output=True,
        timeout=50,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert store.manifest_path.read_bytes() == before  # the old manifest, whole
    assert [r["filename"] for r in store.rows()] == ["kept.wav"]
    for wav in store.root.rglob("*.wav"):  # any file is complete; a file without a row is ignored
        assert sf.info(wav).frames > 0
    assert list(store.root.glob(".*.tmp")), "the killed writer's temp manifest is there"
    # Uploading the same audio again adopts the orphan and records it; the store itself
    # removes what the dead writer left.
    result = store.add(wav_bytes(11), "normal", "new.wav", max_seconds=10)
    assert result.status == "stored" and len(store.rows()) == 2
    assert_consistent(store)


def test_uploads_never_load_torch(tmp_path: Path):
    """The HTTP processes validate uploads; a 44.1 kHz stereo upload (resampled) must not
    pull torch (~500 MiB resident per process) into them."""
    (tmp_path / "cd.wav").write_bytes(wav_bytes(12, sr=44_100, channels=2))
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import serving.server
        from faultsense.data.uploads import UploadStore
        root, src = map(Path, sys.argv[1:])
        result = UploadStore(root).add(src.read_bytes(), "normal", "cd.wav", max_seconds=10)
        assert result.status == "stored", result
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchaudio")))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "up"), str(tmp_path / "cd.wav")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
