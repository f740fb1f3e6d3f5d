"""ESC-50 source (`data.kind=esc50`): fetch (or take a local folder / .zip), verify, and
map categories to fault labels as manifest rows.

A dataset root is a folder holding `meta/esc50.csv` (official columns) and `audio/`.
`resolve_source` turns `data.source` into such a root: a folder is used in place, a
.zip is extracted once under `raw_dir`, and no source means downloading the official
release over HTTPS (progress bar, resumable through an HTTP Range on a `.part` file).
Every write that matters (download, extraction) is atomic. `ESC50Source` is the
`faultsense.data.sources` seam: the DataModule asks it for rows and knows nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import plain
from ..errors import ConfigError, DataError, LabelError
from ..fileio import sha256_file
from ..taxonomy import check_label_name
from .manifest import AUX_ONLY, ManifestRow, read_csv_table
from .sources import SourceStats, register_source

log = logging.getLogger(__name__)

META_FILE = Path("meta") / "esc50.csv"
META_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
OFFICIAL_URL = "https://github.com/karolpiczak/ESC-50/archive/refs/heads/master.zip"
OFFICIAL_CLIPS = 2000


# ---------------------------------------------------------------- mapping


@dataclass(frozen=True)
class FaultMapping:
    """ESC-50 category -> label (by default a fault label; any safe label name works).
    `unmapped` is "drop", "aux" or one of the labels (e.g. "normal").

    "aux" keeps the unmapped clips without a fault label (`AUX_ONLY`): they train only a
    model's auxiliary ESC-50 category head (`model.aux_weight`), never the fault labels,
    and never enter val/test.
    """

    classes: dict[str, tuple[str, ...]]
    unmapped: str = "drop"
    category_to_label: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup: dict[str, str] = {}
        for label, categories in self.classes.items():
            for category in categories:
                if category in lookup and lookup[category] != label:
                    raise ConfigError(
                        f"data.mapping.classes: ESC-50 category {category!r} is mapped to both "
                        f"{lookup[category]!r} and {label!r}; give it one label."
                    )
                lookup[category] = label
        object.__setattr__(self, "category_to_label", lookup)

    @property
    def labels(self) -> list[str]:
        """The mapping's labels in the order of `classes` (the default: the four fault
        labels of `faultsense.taxonomy`, in class order)."""
        return list(self.classes)

    def label_for(self, category: str) -> str | None:
        """The label of `category`, `AUX_ONLY` for an unmapped one under
        `unmapped: aux`, or None when it is dropped."""
        label = self.category_to_label.get(category)
        if label is not None:
            return label
        if self.unmapped == "aux":
            return AUX_ONLY
        return None if self.unmapped == "drop" else self.unmapped

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (recorded in the cache index and in bundles)."""
        return {"unmapped": self.unmapped, "classes": {k: list(v) for k, v in self.classes.items()}}


def parse_mapping(mapping: Mapping[str, Any] | FaultMapping | None) -> FaultMapping:
    """Validate a `data.mapping` dict ({unmapped, classes: {label: [category, ...]}})."""
    if isinstance(mapping, FaultMapping):
        return mapping
    if not mapping or not mapping.get("classes"):
        raise ConfigError(
            "data.mapping.classes is empty: add `configs/data/esc50_fault.yaml` to the data "
            "config's defaults or pass a mapping {label: [esc50 category, ...]}."
        )
    classes: dict[str, tuple[str, ...]] = {}
    for label, categories in dict(mapping["classes"]).items():
        try:
            label = check_label_name(label)  # any safe name: the mapping's labels are its own
        except LabelError as err:
            raise ConfigError(f"data.mapping.classes: {err}") from None
        if label in ("drop", "aux"):
            raise ConfigError(
                f"data.mapping.classes: {label!r} names what data.mapping.unmapped does with "
                "unmapped clips; give the label another name."
            )
        if isinstance(categories, str) or not isinstance(categories, Iterable):
            raise ConfigError(f"data.mapping.classes.{label} must be a list of ESC-50 categories.")
        classes[label] = tuple(str(c).strip() for c in categories)
    unmapped = str(mapping.get("unmapped", "drop")).strip()
    # A label for the unmapped clips must be one of the mapping's, so a typo is caught.
    if unmapped not in ("drop", "aux", *classes):
        raise ConfigError(
            f"data.mapping.unmapped={unmapped!r}: expected 'drop', 'aux' or one of the "
            f"mapping's labels ({', '.join(classes)}); for a label of its own, list it in "
            "data.mapping.classes with no categories (e.g. other: [])."
        )
    return FaultMapping(classes=classes, unmapped=unmapped)


# ---------------------------------------------------------------- the source


@register_source("esc50")
class ESC50Source:
    """An ESC-50-layout dataset as manifest rows, categories mapped to fault labels.

    `source`: a folder or a release .zip, or None = the official release downloaded into
    `raw_dir` (`download`: url, sha256, expected_clips). `mapping`: see `parse_mapping`.
    """

    def __init__(
        self,
        source: str | Path | None = None,
        *,
        raw_dir: str | Path = "data/raw",
        mapping: Mapping[str, Any] | FaultMapping | None = None,
        download: Mapping[str, Any] | None = None,
        skip_bad: bool = False,
        progress: bool = True,
    ) -> None:
        self.source = source
        self.raw_dir = Path(raw_dir)
        self.fault_mapping = parse_mapping(plain(mapping))
        self.mapping: dict[str, Any] | None = self.fault_mapping.to_dict()
        self.labels: list[str] = self.fault_mapping.labels
        self.download = dict(plain(download) or {})
        self.skip_bad, self.progress = bool(skip_bad), progress
        self.stats: SourceStats | None = None

    def root(self, create: bool) -> Path:
        """The dataset root; only with `create` may it be downloaded or extracted."""
        if not create and self.source is None and find_raw(self.raw_dir) is None:
            raise DataError(f"ESC-50 is not downloaded under {self.raw_dir}; run prepare_data().")
        return resolve_source(self.source, self.raw_dir, progress=self.progress, **self.download)

    def rows(self, *, create: bool) -> list[ManifestRow]:
        rows, self.stats = clip_rows(self.root(create), self.fault_mapping, skip_bad=self.skip_bad)
        return rows


def find_raw(raw_dir: Path) -> Path | None:
    """The official release already extracted under `raw_dir`, else None."""
    release = raw_dir / "ESC-50-master"
    return find_root(release) if release.is_dir() else None


def find_root(path: Path) -> Path | None:
    """The dataset root at `path` or one level below it (e.g. `ESC-50-master/`), else None."""
    if (path / META_FILE).is_file():
        return path
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if (p / META_FILE).is_file()]
        if len(found) == 1:
            return found[0]
    return None


def read_meta(root: Path) -> list[dict[str, str]]:
    """Rows of `root/meta/esc50.csv`, checked for the official columns and integer folds."""
    meta = root / META_FILE
    rows = read_csv_table(meta, META_COLUMNS, "ESC-50")
    for line, row in enumerate(rows, start=2):
        try:
            row["fold"] = str(int(row["fold"]))
        except (TypeError, ValueError):
            raise DataError(
                f"{meta} line {line}: fold {row['fold']!r} is not an integer."
            ) from None
        if not row["filename"] or not row["category"]:
            raise DataError(f"{meta} line {line}: empty filename or category.")
    if not rows:
        raise DataError(f"{meta} lists no clips.")
    return rows


def clip_rows(
    root: Path, mapping: FaultMapping, *, skip_bad: bool = False
) -> tuple[list[ManifestRow], SourceStats]:
    """Map the clips of the dataset at `root` to fault labels.

    Any subset of folds works: a fold listed in the meta file whose audio is entirely
    absent is skipped with a warning. A missing file inside a present fold is an error
    (or, with `skip_bad`, reported by name and skipped).
    """
    meta = read_meta(root)
    audio_dir = Path(os.path.abspath(root / "audio"))  # absolute, without "..", symlinks kept
    present = {(r["fold"], (audio_dir / r["filename"]).is_file()) for r in meta}
    folds_with_audio = {fold for fold, exists in present if exists}
    stats = SourceStats(root=root)
    stats.missing_folds = sorted({int(f) for f, _ in present} - {int(f) for f in folds_with_audio})
    if stats.missing_folds:
        log.warning(
            "%s lists fold(s) %s but none of their audio is present; using the other folds.",
            root / META_FILE,
            ", ".join(map(str, stats.missing_folds)),
        )
    rows: list[ManifestRow] = []
    missing: list[str] = []
    dropped: set[str] = set()
    for r in meta:
        if r["fold"] not in folds_with_audio:
            continue
        path = audio_dir / r["filename"]
        if not path.is_file():
            missing.append(str(path))
            continue
        stats.clips += 1
        label = mapping.label_for(r["category"])
        if label is None:
            dropped.add(r["category"])
            continue
        clip_id = Path(r["filename"]).stem
        rows.append(ManifestRow(clip_id, str(path), r["category"], label, int(r["fold"]), "esc50"))
    if missing:
        listed = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        if not skip_bad:
            raise DataError(
                f"{len(missing)} clip(s) listed in {root / META_FILE} are missing: {listed}. "
                "Restore them, or set data.skip_bad=true to skip them."
            )
        log.warning("Skipping %d missing clip(s): %s", len(missing), listed)
        stats.skipped.extend(missing)
    unknown = sorted(set(mapping.category_to_label) - {r["category"] for r in meta})
    if unknown:
        log.info("Mapped categories not in %s: %s", root / META_FILE, ", ".join(unknown))
    stats.mapped = sum(r.label != AUX_ONLY for r in rows)
    stats.dropped_categories = sorted(dropped)
    return rows, stats


# ---------------------------------------------------------------- fetching


def resolve_source(
    source: str | Path | None,
    raw_dir: str | Path,
    *,
    url: str = OFFICIAL_URL,
    sha256: str | None = None,
    expected_clips: int | None = OFFICIAL_CLIPS,
    progress: bool = True,
) -> Path:
    """The dataset root for `data.source`: a folder, a .zip (extracted once under
    `raw_dir`), or None = the official release downloaded and extracted under `raw_dir`."""
    raw_dir = Path(raw_dir)
    if source is None or str(source).strip() == "":
        dest = raw_dir / "ESC-50-master"
        if (dest / META_FILE).is_file():
            return dest
        archive = raw_dir / "ESC-50-master.zip"
        if not archive.is_file():
            download(url, archive, sha256=sha256, progress=progress)
        try:
            root = extract_zip(archive, dest, expected_clips=expected_clips)
        except DataError:
            archive.unlink()  # a bad archive must not be reused: the next run downloads again
            raise
        archive.unlink()  # the extracted copy is what we use; 600 MB is worth freeing
        return root
    path = Path(source).expanduser()
    if path.is_dir():
        root = find_root(path)
        if root is None:
            raise DataError(
                f"ESC-50 meta file not found at {path / META_FILE}. Pass data.source=/path/to/ESC-50 "
                "(a folder with meta/esc50.csv and audio/, or the release .zip), or leave "
                "data.source unset to download it."
            )
        return root
    if path.is_file() and zipfile.is_zipfile(path):
        st = path.stat()
        key = hashlib.sha256(
            f"{path.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode()
        ).hexdigest()
        dest = raw_dir / f"{path.stem}-{key[:8]}"
        if (dest / META_FILE).is_file():
            return dest
        return extract_zip(path, dest)
    if path.is_file():
        raise DataError(f"data.source={source} is a file but not a .zip archive.")
    raise DataError(
        f"data.source={source} does not exist. Pass a folder with meta/esc50.csv and audio/ or "
        "an ESC-50 .zip, or leave data.source unset to download the official release."
    )


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest` over HTTP(S), resuming a previous `.part` with a Range request.

    `dest` appears only when complete (and matching `sha256` when given).
    """
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    hint = "Check the network and retry (the download resumes), or pass data.source=<folder|zip>."
    try:
        with requests.get(url, stream=True, headers=headers, timeout=timeout) as resp:
            if resp.status_code == 416 and offset:  # nothing past offset: the .part is complete
                total = offset
            else:
                resp.raise_for_status()
                if resp.status_code != 206:  # the server ignored the Range: start over
                    offset = 0
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                with (
                    open(part, "ab" if offset else "wb") as f,
                    _bytes_progress(dest.name, total, offset, progress) as advance,
                ):
                    for chunk in resp.iter_content(chunk_size):
                        f.write(chunk)
                        advance(len(chunk))
    except requests.RequestException as err:
        raise DataError(f"Download of {url} failed: {err}. {hint}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"Download of {url} stopped at {size} of {total} bytes. {hint}")
    if sha256:
        digest = sha256_file(part)
        if digest != sha256.lower():
            part.unlink()
            raise DataError(f"{url}: sha256 {digest} does not match the expected {sha256}.")
    os.replace(part, dest)
    return dest


class _bytes_progress:
    """A rich byte-progress bar as a context manager yielding `advance(n)`."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool) -> None:
        self.name, self.total, self.done, self.enabled = name, total, done, enabled
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        self._progress.start()
        task = self._progress.add_task(
            f"download {self.name}", total=self.total, completed=self.done
        )
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def extract_zip(
    archive: str | Path, dest: str | Path, *, expected_clips: int | None = None
) -> Path:
    """Extract an ESC-50 .zip so that `dest` is the verified dataset root.

    Atomic: extracted and verified in a temp folder, then renamed to `dest`.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            base = tmp.resolve()
            for member in zf.namelist():  # refuse entries that would land outside tmp
                if not (base / member).resolve().is_relative_to(base):
                    raise DataError(
                        f"{archive} contains an unsafe path {member!r}; not extracting."
                    )
            zf.extractall(tmp)
        root = find_root(tmp)
        if root is None:
            raise DataError(f"{archive} does not contain an ESC-50 folder ({META_FILE} not found).")
        verify(root, expected_clips)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a valid zip archive: {err}.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def verify(root: Path, expected_clips: int | None) -> None:
    """Check the meta columns, that every listed clip exists, and the clip count if known."""
    meta = read_meta(root)
    missing = [r["filename"] for r in meta if not (root / "audio" / r["filename"]).is_file()]
    if missing:
        raise DataError(
            f"{root}: {len(missing)} clip(s) listed in {META_FILE} are missing from audio/ "
            f"(e.g. {missing[0]}); the archive is incomplete."
        )
    if expected_clips is not None and len(meta) != expected_clips:
        raise DataError(f"{root}: {len(meta)} clips listed, expected {expected_clips}.")
    log.info(
        "Verified %s: %d clips, folds %s", root, len(meta), sorted(Counter(r["fold"] for r in meta))
    )
