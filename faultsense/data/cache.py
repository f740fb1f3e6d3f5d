"""Decoded waveform cache: decode + resample + fix length once, then epochs read a memmap.

A cache is a folder `<cache_root>/<name>-<fingerprint[:16]>/` with
- `waves.int16`: one int16 memmap [N, clip_samples] (16 kHz mono by default),
- `index.json`: version, fingerprint, sample_rate, clip_samples and the manifest rows in
  row order (with each clip's decoded duration), plus clips skipped as bad.

A row that is a segment of its file (`offset`, `length`) is cut out of it here: only
that part of the file is read and decoded, once.

The fingerprint covers the clips (id, label, fold, group and segment, file size and
mtime), the sample rate, the clip length and the mapping, so a change to any of them selects another
folder (different sources never clobber each other) and an unchanged one is reused.
A build writes into a temp folder and renames it into place only when complete, so a
crash never leaves a usable half-cache; builds of one fingerprint are serialized by a
file lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from filelock import FileLock

from .. import audio
from ..errors import AudioError, DataError
from .manifest import ManifestRow

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: resampled with soxr (was torchaudio)
DATA_FILE = "waves.int16"
INDEX_FILE = "index.json"
INT16_SCALE = 32767.0


@dataclass
class WaveCache:
    """A built cache: `waves` is a read-only int16 memmap [N, clip_samples] matching `rows`."""

    path: Path
    fingerprint: str
    sample_rate: int
    clip_samples: int
    rows: list[ManifestRow]
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def waves(self) -> np.ndarray:
        """int16 [N, clip_samples], memory-mapped read-only."""
        return np.memmap(
            self.data_path, dtype=np.int16, mode="r", shape=(len(self.rows), self.clip_samples)
        )


def fingerprint(
    rows: list[ManifestRow], *, sample_rate: int, clip_samples: int, mapping: dict[str, Any] | None
) -> str:
    """sha256 over what decides the cache's content: clips (id, label, fold, category,
    file size + mtime), sample rate, clip length and the mapping."""
    h = hashlib.sha256()
    head = {"v": CACHE_VERSION, "sr": sample_rate, "n": clip_samples, "mapping": mapping}
    h.update(json.dumps(head, sort_keys=True).encode())
    for row in rows:
        try:
            st = os.stat(row.path)
            stat = (st.st_size, st.st_mtime_ns)
        except OSError:
            stat = (-1, -1)  # the build reports the missing file by name
        fields = [row.id, row.label, row.fold, row.category, row.source, *stat]
        if row.group or row.is_segment:  # absent otherwise: older fingerprints stay valid
            fields += [row.group, row.offset, row.length]
        h.update(json.dumps(fields).encode())
    return h.hexdigest()


def cache_path(cache_root: str | Path, name: str, fp: str) -> Path:
    return Path(cache_root) / f"{name}-{fp[:16]}"


def load_cache(
    path: str | Path, fp: str, current_rows: list[ManifestRow] | None = None
) -> WaveCache | None:
    """The complete cache at `path` if it was built for fingerprint `fp`, else None.

    With `current_rows` (the clips it is loaded for), rows report those clips' current paths:
    same content, but the source folder may have moved or be spelled differently.
    """
    path = Path(path)
    try:
        index = json.loads((path / INDEX_FILE).read_text())
        if index.get("version") != CACHE_VERSION or index.get("fingerprint") != fp:
            return None
        rows = [ManifestRow.from_dict(r) for r in index["rows"]]
        expected = len(rows) * int(index["clip_samples"]) * 2
        if (path / DATA_FILE).stat().st_size != expected:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if current_rows is not None:
        current = {r.id: r.path for r in current_rows}
        rows = [dataclasses.replace(r, path=current.get(r.id, r.path)) for r in rows]
    return WaveCache(
        path, fp, int(index["sample_rate"]), int(index["clip_samples"]), rows, index["skipped"]
    )


def get_or_build(
    rows: list[ManifestRow],
    cache_root: str | Path,
    name: str,
    *,
    sample_rate: int,
    clip_samples: int,
    mapping: dict[str, Any] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> WaveCache:
    """Reuse the cache for these rows and settings, or build it. Raises DataError on a bad
    clip unless `skip_bad` (then the clip is reported by name and left out)."""
    fp = fingerprint(rows, sample_rate=sample_rate, clip_samples=clip_samples, mapping=mapping)
    path = cache_path(cache_root, name, fp)
    cache = load_cache(path, fp, rows)
    if cache is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            cache = load_cache(path, fp)  # another process may have built it meanwhile
            if cache is None:
                cache = _build(rows, path, fp, sample_rate, clip_samples, skip_bad, progress)
    else:
        log.info("Reusing waveform cache %s (%d clips)", path, len(cache))

    for bad in cache.skipped:
        log.warning("Skipped bad clip %s: %s", bad["path"], bad["error"])
    return cache


def _build(
    rows: list[ManifestRow],
    path: Path,
    fp: str,
    sample_rate: int,
    clip_samples: int,
    skip_bad: bool,
    progress: bool,
) -> WaveCache:
    if not rows:
        raise DataError(f"No clips to cache for {path.name}: check data.source and data.mapping.")
    # Leftovers of builds that died (we hold the lock, so none is running).
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.perf_counter()
    kept: list[ManifestRow] = []
    skipped: list[dict[str, str]] = []
    try:
        waves = np.memmap(
            tmp / DATA_FILE, dtype=np.int16, mode="w+", shape=(len(rows), clip_samples)
        )
        for row in _track(rows, f"caching {path.name}", progress):
            try:
                wave = decode_row(row, sample_rate)
            except AudioError as err:
                if not skip_bad:
                    raise DataError(
                        f"Cache build stopped at a bad clip: {err} Fix or remove it, or set "
                        "data.skip_bad=true to skip bad clips (each is reported by name)."
                    ) from None
                log.warning("Skipping bad clip %s: %s", row.path, err)
                skipped.append({"path": row.path, "error": str(err)})
                continue
            clip = audio.fix_length(wave, clip_samples)
            waves[len(kept)] = np.round(np.clip(clip, -1.0, 1.0) * INT16_SCALE).astype(np.int16)
            kept.append(_with_duration(row, len(wave) / sample_rate))
        waves.flush()
        del waves
        if not kept:
            raise DataError(f"Every clip for {path.name} was bad; nothing to cache.")
        if len(kept) < len(rows):  # skipped rows leave unused space at the end
            os.truncate(tmp / DATA_FILE, len(kept) * clip_samples * 2)
        index = {
            "version": CACHE_VERSION,
            "fingerprint": fp,
            "sample_rate": sample_rate,
            "clip_samples": clip_samples,
            "dtype": "int16",
            "rows": [r.as_dict() for r in kept],
            "skipped": skipped,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index))
        if path.exists():  # an incomplete or foreign folder under our name
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    log.info("Built waveform cache %s: %d clips in %.1f s", path, len(kept), elapsed)
    return WaveCache(path, fp, sample_rate, clip_samples, kept, skipped)


def decode_row(row: ManifestRow, sample_rate: int) -> np.ndarray:
    """The clip of `row` as mono float32 [T] at `sample_rate`: the whole file, or only
    its segment `offset` .. `offset + length` (read by seeking, not by decoding it all)."""
    if not row.is_segment:
        return audio.decode(row.path, sample_rate=sample_rate, allow_silent=True)
    name = f"{row.path} [{row.offset:g} s + {'end' if row.length is None else f'{row.length:g} s'}]"
    seconds = audio.info_seconds(row.path)  # AudioError naming the file if unreadable
    if row.offset >= seconds:
        raise AudioError(f"{name}: the segment starts after the end of the file ({seconds:g} s).")
    try:
        with sf.SoundFile(row.path) as f:
            f.seek(int(round(row.offset * f.samplerate)))
            frames = -1 if row.length is None else int(round(row.length * f.samplerate))
            data, rate = f.read(frames, dtype="float32", always_2d=True), f.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError(f"{name} is corrupt or truncated: {err}") from None
    # Through audio.decode as a WAV in memory: the same checks and resampling as a file.
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype="FLOAT")
    return audio.decode(buf.getvalue(), sample_rate=sample_rate, name=name, allow_silent=True)


def _with_duration(row: ManifestRow, seconds: float) -> ManifestRow:
    return dataclasses.replace(row, duration=seconds)


def _track(rows: list[ManifestRow], description: str, enabled: bool):
    if not enabled:
        return rows
    from rich.progress import track

    return track(rows, description=description, transient=True)
