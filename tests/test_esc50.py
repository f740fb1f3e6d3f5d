"""ESC-50 source: mapping, meta checks, any subset of folds, local folder / zip / resumable
download over real HTTP (a local server), and the atomic manifest."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import shutil
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from faultsense.data import esc50, manifest
from faultsense.errors import ConfigError, DataError
from faultsense.taxonomy import LABELS
from tests.fixtures.data import SYNTH, compose_config, copy_source

N_CLIPS = SYNTH["clips_per_class"] * 9  # 8 mapped categories + dog


def default_mapping(**overrides) -> esc50.FaultMapping:
    cfg = compose_config("prepare", [f"data.mapping.{k}={v}" for k, v in overrides.items()])
    return esc50.parse_mapping(cfg.data.mapping)


# ---------------------------------------------------------------- mapping


def test_default_mapping_is_the_design_table():
    mapping = default_mapping()
    assert mapping.unmapped == "aux"
    assert set(mapping.classes) == set(LABELS)
    assert all(len(c) == 6 for c in mapping.classes.values())
    assert len(mapping.category_to_label) == 24
    assert mapping.label_for("chainsaw") == "mechanical_fault"
    assert mapping.label_for("siren") == "electrical_fault"
    assert mapping.label_for("sea_waves") == "fluid_leak"
    assert mapping.label_for("helicopter") == "normal"
    assert mapping.label_for("dog") == esc50.AUX_ONLY  # kept for the category head only


def test_unmapped_drop_and_normal(synthetic_source: Path):
    dropped, stats = esc50.clip_rows(synthetic_source, default_mapping(unmapped="drop"))
    assert stats.clips == N_CLIPS and stats.mapped == N_CLIPS - SYNTH["clips_per_class"]
    assert stats.dropped_categories == ["dog"]
    assert "dog" not in {r.category for r in dropped}

    kept, stats = esc50.clip_rows(synthetic_source, default_mapping(unmapped="normal"))
    assert stats.mapped == N_CLIPS and stats.dropped_categories == []
    labels = Counter(r.label for r in kept)
    assert labels["normal"] == 3 * SYNTH["clips_per_class"]  # engine, vacuum_cleaner and dog
    assert {r.label for r in kept if r.category == "dog"} == {"normal"}

    aux, stats = esc50.clip_rows(synthetic_source, default_mapping(unmapped="aux"))
    assert len(aux) == N_CLIPS and stats.mapped == N_CLIPS - SYNTH["clips_per_class"]
    assert {r.label for r in aux if r.category == "dog"} == {esc50.AUX_ONLY}
    assert esc50.AUX_ONLY not in {r.label for r in aux if r.category != "dog"}


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({"classes": {"normal": ["dog"], "fluid_leak": ["dog"]}}, "dog.*both"),
        ({"classes": {"no/slash": ["dog"]}}, "Invalid label 'no/slash'"),
        ({"classes": {"aux": ["dog"]}}, "'aux' names what data.mapping.unmapped does"),
        ({"classes": {"idle": ["dog"]}, "unmapped": "other"}, "other: \\[\\]"),
        ({"classes": {"normal": "dog"}}, "must be a list"),
        ({"classes": {"normal": ["dog"]}, "unmapped": "keep"}, "unmapped='keep'"),
        ({"classes": {}}, "mapping.classes is empty"),
    ],
)
def test_bad_mapping_is_a_config_error_naming_the_field(mapping, match):
    with pytest.raises(ConfigError, match=match):
        esc50.parse_mapping(mapping)


def test_a_mapping_to_labels_of_its_own(tmp_path: Path, synthetic_overrides: list[str]):
    """Any safe label names work: the DataModule learns the mapping's labels, in its order."""
    from faultsense.data.datamodule import build_datamodule

    classes = "{idle:[engine,vacuum_cleaner],cavitation:[water_drops,rain],bearing_wear:[chainsaw]}"
    cfg = compose_config(
        "prepare",
        [
            *synthetic_overrides,
            "~data.mapping.classes",
            f"+data.mapping.classes={classes}",
            "data.mapping.unmapped=idle",  # one of its own labels
        ],
    )
    dm = build_datamodule(cfg.data)
    dm.prepare_data()
    dm.setup()
    per_category = SYNTH["clips_per_class"] * 3 // SYNTH["folds"]  # train folds 1-3
    assert dm.labels == ["idle", "cavitation", "bearing_wear"]
    # idle: engine, vacuum_cleaner and the unmapped hand_saw, crackling_fire, insects, dog
    assert dm.class_counts == {
        "idle": 6 * per_category,
        "cavitation": 2 * per_category,
        "bearing_wear": per_category,
    }
    mapping = esc50.parse_mapping(cfg.data.mapping)
    assert mapping.label_for("dog") == "idle" and mapping.label_for("chainsaw") == "bearing_wear"


# ---------------------------------------------------------------- meta and folds


def test_meta_without_official_columns_is_rejected_by_name(tmp_path: Path, synthetic_source: Path):
    root = copy_source(synthetic_source, tmp_path / "ds")
    meta = root / "meta" / "esc50.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0].replace("fold", "split")] + lines[1:]))
    with pytest.raises(DataError, match=r"esc50\.csv is missing the ESC-50 column\(s\) fold"):
        esc50.clip_rows(root, default_mapping())


def test_any_subset_of_folds_works(tmp_path: Path, synthetic_source: Path, caplog):
    root = copy_source(synthetic_source, tmp_path / "ds")
    for wav in (root / "audio").glob("5-*.wav"):
        wav.unlink()
    with caplog.at_level(logging.WARNING):
        rows, stats = esc50.clip_rows(root, default_mapping())
    assert stats.missing_folds == [5]
    assert {r.fold for r in rows} == {1, 2, 3, 4}
    assert "fold(s) 5" in caplog.text


def test_a_missing_clip_inside_a_present_fold_is_named(tmp_path: Path, synthetic_source: Path):
    root = copy_source(synthetic_source, tmp_path / "ds")
    victim = sorted((root / "audio").glob("2-*.wav"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        esc50.clip_rows(root, default_mapping())
    rows, stats = esc50.clip_rows(root, default_mapping(), skip_bad=True)
    assert stats.skipped == [str(victim.absolute())]
    assert victim.stem not in {r.id for r in rows}


# ---------------------------------------------------------------- sources


def _zip_folder(folder: Path, archive: Path, prefix: str = "ESC-50-master") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{prefix}/{path.relative_to(folder)}")
    return archive


def test_local_folder_parent_folder_and_zip(tmp_path: Path, synthetic_source: Path):
    raw = tmp_path / "raw"
    assert esc50.resolve_source(str(synthetic_source), raw) == synthetic_source
    assert esc50.resolve_source(synthetic_source.parent, raw) == synthetic_source

    archive = _zip_folder(synthetic_source, tmp_path / "esc.zip")
    root = esc50.resolve_source(archive, raw)
    assert root.parent == raw and (root / "meta" / "esc50.csv").is_file()
    assert len(list((root / "audio").iterdir())) == N_CLIPS
    stamp = (root / "meta" / "esc50.csv").stat().st_mtime_ns
    assert esc50.resolve_source(archive, raw) == root  # extracted once, then reused
    assert (root / "meta" / "esc50.csv").stat().st_mtime_ns == stamp
    assert not list(raw.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a .zip"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"meta file not found.*data\.source"),
    ],
)
def test_unusable_source_says_what_to_do(tmp_path: Path, make, match):
    with pytest.raises(DataError, match=match):
        esc50.resolve_source(make(tmp_path), tmp_path / "raw")


def test_zip_with_unsafe_paths_is_refused(tmp_path: Path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(DataError, match="unsafe path"):
        esc50.resolve_source(archive, tmp_path / "raw")
    assert not (tmp_path / "escaped.txt").exists()


class _RangeServer:
    """A real HTTP server on 127.0.0.1 serving one file, honoring Range (or not)."""

    def __init__(self, payload: bytes, honor_range: bool = True):
        self.payload, self.honor_range, self.ranges = payload, honor_range, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header and outer.honor_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(outer.payload):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(outer.payload)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/*")
                else:
                    self.send_response(200)
                body = outer.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/master.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def release_zip(tmp_path: Path, synthetic_source: Path) -> bytes:
    return _zip_folder(synthetic_source, tmp_path / "release.zip").read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("honor_range", [True, False])
def test_download_resumes_a_partial_file_then_verifies_and_extracts(
    tmp_path: Path, release_zip: bytes, honor_range: bool
):
    raw = tmp_path / "raw"
    raw.mkdir()
    half = len(release_zip) // 2
    (raw / "ESC-50-master.zip.part").write_bytes(release_zip[:half])  # an interrupted download
    server = _RangeServer(release_zip, honor_range)
    try:
        root = esc50.resolve_source(
            None,
            raw,
            url=server.url,
            expected_clips=N_CLIPS,
            progress=False,
            sha256=hashlib.sha256(release_zip).hexdigest(),
        )
    finally:
        server.close()
    assert server.ranges == [f"bytes={half}-"]
    assert root == raw / "ESC-50-master"
    assert len(esc50.read_meta(root)) == N_CLIPS
    assert sorted(os.listdir(raw)) == ["ESC-50-master"]  # archive and .part are gone
    # Already there: no network needed the second time.
    assert esc50.resolve_source(None, raw, url="http://127.0.0.1:9/unreachable") == root


@pytest.mark.timeout(60)
def test_download_checksum_mismatch_and_wrong_clip_count_are_errors(
    tmp_path: Path, release_zip: bytes
):
    server = _RangeServer(release_zip)
    try:
        with pytest.raises(DataError, match="sha256"):
            esc50.download(server.url, tmp_path / "dl" / "a.zip", sha256="0" * 64, progress=False)
        assert not list((tmp_path / "dl").iterdir())  # neither the file nor a reusable .part
        with pytest.raises(DataError, match=f"{N_CLIPS} clips listed, expected 2000"):
            esc50.resolve_source(None, tmp_path / "raw", url=server.url, progress=False)
        assert not (tmp_path / "raw" / "ESC-50-master").exists()
    finally:
        server.close()


def test_unreachable_download_is_a_data_error_with_a_hint(tmp_path: Path):
    with pytest.raises(DataError, match="data.source"):
        esc50.download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", progress=False, timeout=5)


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip_is_atomic_and_has_the_contract_columns(
    tmp_path: Path, synthetic_source: Path
):
    rows, _ = esc50.clip_rows(synthetic_source, default_mapping())
    path = manifest.write_manifest(rows, tmp_path / "m" / "esc50.csv")
    assert path.read_text().splitlines()[0] == "id,path,category,label,fold,source,duration"
    assert manifest.read_manifest(path) == rows
    assert os.listdir(path.parent) == ["esc50.csv"]
    shutil.rmtree(path.parent)
    with pytest.raises(DataError, match="Cannot read manifest"):
        manifest.read_manifest(path)
