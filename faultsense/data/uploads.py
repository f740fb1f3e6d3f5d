"""Labeled uploads: user recordings that join the training split on the next (re)train.

`UploadStore(root)` validates an upload with `audio.decode` (so every bad file is an
AudioError naming it), checks that the label is a safe folder name (which labels a model
knows is the server's check, against the current model), normalizes the audio to
16 kHz mono PCM16 WAV and stores it at `root/<label>/<sha256>.wav`, where sha256 is
taken over the *normalized* WAV bytes: the same recording uploaded twice (even in a
different container or sample rate that decodes to the same samples) is a duplicate.
`root/manifest.csv` lists the stored clips. Writes are atomic and serialized by a file
lock: the WAV is written to a temp file and renamed, then the manifest is rewritten to
a temp file and renamed, so an interrupted upload leaves no partial file or row (at
worst a complete WAV without a row, which the next upload of it adopts). The client's
filename is recorded as text only, never used as a path.

`UploadSource` (`faultsense.data.sources` kind "uploads") turns the stored clips into
manifest rows with fold 0, so they join the training split only.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .. import audio
from ..config import utc_now
from ..fileio import atomic_write, display_name
from ..taxonomy import check_label_name, validate_label
from .manifest import TRAIN_ONLY_FOLD, ManifestRow, write_csv
from .sources import SourceStats, register_source

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
UPLOAD_COLUMNS = ("sha256", "label", "path", "filename", "seconds", "created_at")
SAMPLE_RATE = audio.MODEL_SAMPLE_RATE


@dataclass(frozen=True)
class UploadResult:
    """Outcome of `UploadStore.add`: `status` is "stored" or "duplicate"; `path` is the
    stored WAV; for a duplicate, `label` is the label it was first stored with."""

    status: str
    sha256: str
    label: str
    seconds: float
    path: Path


class UploadStore:
    """Labeled uploads under `root`: `root/<label>/<sha256>.wav` + `root/manifest.csv`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def _lock(self) -> FileLock:
        # A fresh lock per write: the server builds its store before uvicorn forks, and
        # filelock refuses to use an instance inherited across fork.
        return FileLock(str(self.root / ".lock"))

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def add(
        self,
        data: bytes,
        label: str,
        filename: str | None = None,
        *,
        max_seconds: float,
        labels: Sequence[str] | None = None,
    ) -> UploadResult:
        """Validate, normalize and store one upload. Raises LabelError for a label that is
        not a safe folder name (or, with `labels`, not one of them) and AudioError (naming
        `filename`) for audio that cannot be used."""
        label = check_label_name(label)
        if labels is not None:
            label = validate_label(label, labels)
        shown = display_name(filename, default="upload")
        wave = audio.decode(data, sample_rate=SAMPLE_RATE, max_seconds=max_seconds, name=shown)
        wav = audio.to_wav_bytes(wave, SAMPLE_RATE)
        digest = hashlib.sha256(wav).hexdigest()
        seconds = round(len(wave) / SAMPLE_RATE, 3)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._remove_stale_temporaries()
            rows = self.rows()
            for row in rows:
                if row["sha256"] == digest:
                    stored = self.root / row["path"]
                    return UploadResult(
                        "duplicate", digest, row["label"], float(row["seconds"]), stored
                    )
            rel = f"{label}/{digest}.wav"
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, wav)
            rows.append(
                {
                    "sha256": digest,
                    "label": label,
                    "path": rel,
                    "filename": shown,
                    "seconds": f"{seconds:.3f}",
                    "created_at": utc_now(),
                }
            )
            self._write_rows(rows)
        return UploadResult("stored", digest, label, seconds, target)

    def rows(self) -> list[dict[str, str]]:
        """Manifest rows (dicts with UPLOAD_COLUMNS), oldest first; [] when there are none."""
        try:
            with open(self.manifest_path, newline="") as f:
                return [dict(r) for r in csv.DictReader(f)]
        except FileNotFoundError:
            return []

    def counts(self, labels: Sequence[str] = ()) -> dict[str, int]:
        """Stored uploads per label: every one of `labels` (0 when none), in that order, then
        any other label that has uploads, sorted."""
        counted = Counter(r["label"] for r in self.rows())
        others = sorted(set(counted) - set(labels))
        return {label: counted.get(label, 0) for label in [*labels, *others]}

    def _remove_stale_temporaries(self) -> None:
        """Delete temp files a killed writer left (`.<name>.*.tmp`, see fileio.atomic_write).
        Call with the lock held: every write happens under it, so any temp seen then is
        from a process that died mid-write."""
        for tmp in [*self.root.glob(".*.tmp"), *self.root.glob("*/.*.tmp")]:
            with contextlib.suppress(OSError):
                tmp.unlink()
                log.warning("Removed %s, left by an upload that was killed mid-write", tmp)

    def _write_rows(self, rows: list[dict[str, str]]) -> None:
        write_csv(self.manifest_path, UPLOAD_COLUMNS, rows)


@register_source("uploads")
class UploadSource:
    """The clips of an `UploadStore` as train-only manifest rows (fold 0, no category)."""

    mapping: dict | None = None  # uploads are labeled by the user
    stats: SourceStats | None = None

    def __init__(
        self, source: str | Path, *, skip_bad: bool = False, progress: bool = True
    ) -> None:
        self.root = Path(source)

    def rows(self, *, create: bool) -> list[ManifestRow]:
        return [
            ManifestRow(
                f"upload-{r['sha256'][:16]}",
                os.path.abspath(self.root / r["path"]),
                "",
                r["label"],
                TRAIN_ONLY_FOLD,
                "upload",
            )
            for r in UploadStore(self.root).rows()
        ]
