"""The data-source seam: a source registered in a test is picked by `data.kind` and its
clips reach training batches without touching the DataModule; the manifest row reads
files written before its category field was named for every source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from faultsense.data import manifest
from faultsense.data.datamodule import build_datamodule
from faultsense.data.manifest import ManifestRow
from faultsense.data.sources import get_source, register_source
from faultsense.data.uploads import UploadStore
from faultsense.errors import ConfigError, DataError
from faultsense.taxonomy import LABELS
from tests.fixtures.data import compose_config

SR = 16_000
CLIP_SECONDS = 0.5
TONES = {"mechanical_fault": 300.0, "normal": 1200.0}  # label -> tone frequency (Hz)
CLIPS_PER_LABEL = 6  # folds 1..3, two clips of each label per fold


@register_source("test_tones")
class ToneFolder:
    """A folder of generated tones, two labels, `<label>/<fold>-<i>.wav`; written on the
    first `rows(create=True)`. Labels come from the folder names: no mapping."""

    mapping = None
    stats = None

    def __init__(self, source: str, *, skip_bad: bool = False, progress: bool = True) -> None:
        self.root = Path(source)

    def rows(self, *, create: bool) -> list[ManifestRow]:
        if not self.root.is_dir():
            if not create:
                raise DataError(f"{self.root} is not written yet; run prepare_data().")
            self._write()
        return [
            ManifestRow(
                f"{p.parent.name}-{p.stem}", str(p), "", p.parent.name, int(p.stem[0]), "tones"
            )
            for p in sorted(self.root.glob("*/*.wav"))
        ]

    def _write(self) -> None:
        t = np.arange(int(SR * CLIP_SECONDS)) / SR
        for label, hz in TONES.items():
            (self.root / label).mkdir(parents=True)
            for i in range(CLIPS_PER_LABEL):
                wave = 0.5 * np.sin(2 * np.pi * hz * (1 + 0.01 * i) * t)
                sf.write(self.root / label / f"{i % 3 + 1}-{i}.wav", wave, SR, subtype="PCM_16")


def tone_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """The stock data config, pointed at the test source: its kind, its folder, and
    without the ESC-50 source's own keys."""
    return [
        f"paths.root_dir={tmp_path}",
        "data.kind=test_tones",
        "data.name=tones",
        f"data.source={tmp_path / 'tones'}",
        "~data.raw_dir",
        "~data.download",
        "~data.mapping",
        f"data.clip_seconds={CLIP_SECONDS}",
        "data.val_fold=3",
        "data.test_fold=null",
        "data.batch_size=4",
        "data.progress=false",
        *extra,
    ]


def test_a_registered_source_is_picked_by_config_and_reaches_a_training_batch(tmp_path: Path):
    dm = build_datamodule(compose_config("prepare", tone_overrides(tmp_path)).data)
    assert isinstance(dm.data_source, ToneFolder)
    dm.prepare_data()
    dm.setup()
    assert dm.folds_present == [1, 2, 3] and not dm.has_test
    assert (len(dm.train_set), len(dm.val_set)) == (8, 4)
    assert dm.class_counts == {label: (4 if label in TONES else 0) for label in LABELS}
    assert dm.categories == [] and dm.mapping == {}
    assert dm.caches[0].path.name.startswith("tones-")
    waves, labels, categories = next(iter(dm.train_dataloader()))
    assert waves.shape == (4, int(SR * CLIP_SECONDS)) and waves.dtype == torch.float32
    assert waves.abs().max() > 0.4 and labels.dtype == torch.int64
    assert {LABELS[i] for i in labels.tolist()} <= set(TONES)
    assert categories.tolist() == [-1] * 4  # the source has no categories
    written = manifest.read_manifest(dm.manifest_path)
    assert len(written) == 12 and {r.source for r in written} == {"tones"}


def test_uploads_join_the_training_split_of_any_source(tmp_path: Path):
    from faultsense.audio import to_wav_bytes

    base = build_datamodule(compose_config("prepare", tone_overrides(tmp_path)).data)
    base.setup()
    wave = np.sin(np.linspace(0, 2000, SR // 2)).astype(np.float32)
    UploadStore(tmp_path / "data" / "uploads").add(
        to_wav_bytes(wave), "fluid_leak", "leak.wav", max_seconds=10
    )
    dm = build_datamodule(compose_config("prepare", tone_overrides(tmp_path)).data)
    dm.setup()
    assert len(dm.train_set) == len(base.train_set) + 1 and len(dm.val_set) == len(base.val_set)
    assert dm.class_counts["fluid_leak"] == 1
    assert dm.caches[0].path == base.caches[0].path  # the source's cache part is reused


def test_an_unknown_kind_or_a_key_the_source_does_not_take_is_a_config_error(tmp_path: Path):
    with pytest.raises(
        ConfigError,
        match=r"data.kind='no_such_source' is not a data source. Known: esc50, folder, manifest, synthetic, ",
    ):
        build_datamodule(
            compose_config("prepare", tone_overrides(tmp_path, "data.kind=no_such_source")).data
        )
    # The ESC-50 source's raw_dir left in: the test source does not take it.
    overrides = [o for o in tone_overrides(tmp_path) if o != "~data.raw_dir"]
    with pytest.raises(ConfigError, match="raw_dir"):
        build_datamodule(compose_config("prepare", overrides).data)


def test_built_in_sources_register_on_first_use_and_kinds_are_unique():
    assert get_source("esc50").__name__ == "ESC50Source"
    assert get_source("synthetic").__name__ == "SyntheticSource"
    assert get_source("uploads").__name__ == "UploadSource"
    with pytest.raises(ValueError, match="already registered"):

        @register_source("esc50")
        class Other:  # noqa: F841 - registering is the point
            pass


def test_manifests_and_caches_written_with_the_old_category_field_still_read(tmp_path: Path):
    old = {"id": "a", "path": "/x.wav", "esc50_category": "dog", "label": "", "fold": "2"}
    row = ManifestRow.from_dict({**old, "source": "esc50", "duration": "1.500"})
    assert row == ManifestRow("a", "/x.wav", "dog", "", 2, "esc50", 1.5)
    path = tmp_path / "old.csv"
    path.write_text(
        "id,path,esc50_category,label,fold,source,duration\na,/x.wav,dog,,2,esc50,1.500\n"
    )
    assert manifest.read_manifest(path) == [row]


def test_a_null_option_is_left_out_and_only_the_synthetic_kind_generates(tmp_path: Path):
    base = [f"paths.root_dir={tmp_path}", "data.progress=false"]
    assert build_datamodule(compose_config("prepare", [*base, "data.synthetic=null"]).data)
    with pytest.raises(ConfigError, match="data.kind=esc50: .*'synthetic'; remove that key"):
        build_datamodule(
            compose_config("prepare", [*base, "+data.synthetic.clips_per_class=2"]).data
        )
