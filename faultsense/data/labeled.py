"""What the user's own labeled sources share (`data=folder`, `data=manifest`): one entry
per listed clip -> manifest rows with folds, the label set (sorted) and stats.

`LabeledFiles` collects entries (file, label, optional fold, group and segment), checks
the text fields as it goes (a DataError names the file or line), and `finish` gives
every row a fold: the data's own, or stratified group k-fold (`faultsense.data.splits`)
where a group is the `group` given, else the `data.group_by` match, else the file (so
segments of one file always split together).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .manifest import ManifestRow
from .sources import SourceStats
from .splits import assign_folds, compile_group_by, recording_of

log = logging.getLogger(__name__)


def source_path(source: str | Path | None, kind: str, what: str) -> Path:
    """`data.source` as an existing path, or a ConfigError/DataError saying what to pass."""
    if source is None or str(source).strip() == "":
        raise ConfigError(f"data={kind} needs data.source={what}.")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source={source} does not exist (data={kind} reads {what}).")
    return Path(os.path.abspath(path))


def parse_number(value: Any, name: str, where: str, *, integer: bool = False) -> float | None:
    """A non-negative number from a text/JSON field ("" or None = None)."""
    if value is None or str(value).strip() == "":
        return None
    try:
        number = int(str(value).strip()) if integer else float(value)
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise DataError(f"{where}: {name} {value!r} is not {kind}.") from None
    if not number >= 0:  # also catches NaN
        raise DataError(f"{where}: {name} {value!r} must be >= 0.")
    return number


@dataclass
class LabeledFiles:
    """Entries of one source, turned into manifest rows by `finish`."""

    root: Path
    source: str  # the rows' `source` field
    group_by: str | None = None
    skip_bad: bool = False
    rows: list[ManifestRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pattern = compile_group_by(self.group_by)
        self._ids: set[str] = set()

    def add(self, path: Path, label: Any, where: str, **extra: Any) -> None:
        """One clip: `path` (absolute), `label`; `extra`: fold, group, offset, length, id
        (text or numbers, "" = not given). A missing file is a DataError naming `where`
        unless `skip_bad` (then it is skipped and listed in the stats)."""
        label = str(label or "").strip()
        if not label:
            raise DataError(f"{where}: no label.")
        if not path.is_file():
            if not self.skip_bad:
                raise DataError(
                    f"{where}: {path} does not exist. Fix the entry, or set data.skip_bad=true "
                    "to skip missing files."
                )
            self.skipped.append(str(path))
            return
        fold, offset, length = _fold_and_segment(extra, where)
        group = str(extra.get("group") or "").strip()
        group = group or recording_of(path.stem, self._pattern) or ""
        if not group and (offset or length is not None):
            group = self._default_id(path, 0.0, None)  # segments of one file split together
        clip_id = str(extra.get("id") or "").strip() or self._default_id(path, offset, length)
        if clip_id in self._ids:
            raise DataError(f"{where}: clip {clip_id!r} is listed twice.")
        self._ids.add(clip_id)
        row = ManifestRow(clip_id, str(path), "", label, fold, self.source)
        self.rows.append(replace(row, group=group, offset=offset, length=length))

    def _default_id(self, path: Path, offset: float, length: float | None) -> str:
        rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
        segment = f"@{offset:g}" + ("" if length is None else f"+{length:g}")
        return rel.as_posix() + (segment if offset or length is not None else "")

    def finish(self, *, num_folds: int, seed: int) -> tuple[list[ManifestRow], SourceStats]:
        """The rows with folds, and the stats for `faultsense-data`."""
        if not self.rows:
            raise DataError(f"{self.root} holds no labeled audio clips.")
        if self._pattern is not None and not any(r.group for r in self.rows):
            log.warning(
                "data.group_by=%r matched no file name under %s: each file is its own group.",
                self.group_by,
                self.root,
            )
        rows = assign_folds(
            self.rows, num_folds=int(num_folds), seed=int(seed), where=str(self.root)
        )
        stats = SourceStats(root=self.root, clips=len(rows), mapped=len(rows), skipped=self.skipped)
        return rows, stats


def _fold_and_segment(extra: dict[str, Any], where: str) -> tuple[int, float, float | None]:
    """(fold, 0 = none given; offset; length or None) from an entry's text fields."""
    fold = parse_number(extra.get("fold"), "fold", where, integer=True)
    if fold == 0:
        raise DataError(f"{where}: fold 0 is reserved for uploads; folds start at 1.")
    offset = parse_number(extra.get("offset"), "offset", where) or 0.0
    length = parse_number(extra.get("length"), "duration", where)
    if length == 0:
        raise DataError(f"{where}: duration 0 cuts an empty segment.")
    return int(fold or 0), float(offset), length


class LabeledSource:
    """Base of the user's own sources: their options, and `labels` (sorted) and `stats`
    set by `finish` at the end of a subclass's `rows()`.

    `group_by`: regex naming a file's recording (first capture group); `num_folds`,
    `split_seed`: the stratified group k-fold made when the data has no folds.
    """

    mapping: dict | None = None  # the user's data names its labels: no mapping

    def __init__(
        self,
        source: str | Path | None = None,
        *,
        group_by: str | None = None,
        num_folds: int = 5,
        split_seed: int = 0,
        skip_bad: bool = False,
        progress: bool = True,
    ) -> None:
        self.source = source
        self.group_by, self.num_folds, self.split_seed = group_by, num_folds, split_seed
        self.skip_bad = bool(skip_bad)
        self.labels: list[str] | None = None
        self.stats: SourceStats | None = None

    def files(self, root: Path, source: str) -> LabeledFiles:
        """An empty collection for this source's entries under `root`."""
        return LabeledFiles(root, source, self.group_by, self.skip_bad)

    def finish(self, files: LabeledFiles) -> list[ManifestRow]:
        """The rows of `files` with folds; sets `labels` and `stats`."""
        rows, self.stats = files.finish(num_folds=self.num_folds, seed=self.split_seed)
        self.labels = sorted({r.label for r in rows})
        return rows
