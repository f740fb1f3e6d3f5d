"""The manifest row every data source yields, and the manifest CSV it is written to.

A row is one clip: where it is, its category in its source (if it has one), its label,
its fold and which source it came from; optionally the recording it belongs to (`group`)
and the segment of the file it is (`offset`, `length` in seconds). `fold` 0 = train only
(uploads); the label `AUX_ONLY` marks a clip kept for the auxiliary category head only.
Files are written atomically (`faultsense.fileio.atomic_write`); the segment columns
are written only when a row uses them, so an ESC-50 manifest keeps its old columns.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..fileio import atomic_write

MANIFEST_COLUMNS = ("id", "path", "category", "label", "fold", "source", "duration")
# Written only when some row has a group or is a segment of its file.
SEGMENT_COLUMNS = ("group", "offset", "length")
# Manifests and cache indexes written before the field was named for every source.
_LEGACY_CATEGORY = "esc50_category"
_LEGACY_COLUMNS = tuple(_LEGACY_CATEGORY if c == "category" else c for c in MANIFEST_COLUMNS)
# The `label` of a clip with no fault label: it trains the category head only.
AUX_ONLY = ""
TRAIN_ONLY_FOLD = 0


@dataclass(frozen=True)
class ManifestRow:
    """One clip. `category` is "" when the source has none; `fold` 0 = train only;
    `duration` (seconds) is known once the clip has been decoded into the cache.
    `group` names the recording the clip comes from ("" = the clip is its own); `offset`
    and `length` (seconds) cut the clip out of the file (`length` None = to its end)."""

    id: str
    path: str
    category: str
    label: str
    fold: int
    source: str
    duration: float | None = None
    group: str = ""
    offset: float = 0.0
    length: float | None = None

    @property
    def recording(self) -> str:
        """The group this clip splits with: its `group`, else its own id."""
        return self.group or self.id

    @property
    def is_segment(self) -> bool:
        """True when the clip is a part of its file, not the whole file."""
        return self.offset > 0 or self.length is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ManifestRow:
        """A row from `as_dict()` output or a manifest CSV line (text fields parsed)."""
        fields = dict(row)
        if _LEGACY_CATEGORY in fields:
            fields["category"] = fields.pop(_LEGACY_CATEGORY)
        fields["duration"] = _float_or_none(fields.get("duration"))
        fields["length"] = _float_or_none(fields.get("length"))
        fields["offset"] = _float_or_none(fields.get("offset")) or 0.0
        fields["group"] = fields.get("group") or ""
        fields["fold"] = int(fields["fold"])
        return cls(**fields)


def _float_or_none(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def read_csv_table(path: str | Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    """The rows of a CSV file that must have the `required` columns; every failure (missing
    file, unreadable, not CSV, a missing column) is a DataError naming `path` and what it
    is (`what`, e.g. "ESC-50")."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path} is missing the {what} column(s) {', '.join(missing)} "
                    f"(expected {','.join(required)}; has {','.join(reader.fieldnames or []) or 'none'})."
                )
            return list(reader)
    except OSError as err:
        raise DataError(f"Cannot read the {what} file {path}: {err.strerror}.") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a valid CSV file: {err}.") from None


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `rows` (dicts with `columns`) as CSV to `path` atomically; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, text.getvalue())


def write_manifest(rows: Iterable[ManifestRow], path: str | Path) -> Path:
    """Write the manifest CSV (MANIFEST_COLUMNS, + SEGMENT_COLUMNS when a row has a group
    or is a segment) atomically; returns `path`."""
    rows = list(rows)
    columns = MANIFEST_COLUMNS
    if any(r.group or r.is_segment for r in rows):
        columns += SEGMENT_COLUMNS
    fields = [_csv_fields(row) for row in rows]
    return write_csv(path, columns, ({c: f[c] for c in columns} for f in fields))


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a manifest written by `write_manifest`."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            known = (MANIFEST_COLUMNS, MANIFEST_COLUMNS + SEGMENT_COLUMNS, _LEGACY_COLUMNS)
            if tuple(reader.fieldnames or ()) not in known:
                raise DataError(
                    f"{path} is not a FaultSense manifest (columns {reader.fieldnames})."
                )
            return [ManifestRow.from_dict(r) for r in reader]
    except OSError as err:
        raise DataError(f"Cannot read manifest {path}: {err.strerror}.") from None


def _csv_fields(row: ManifestRow) -> dict[str, Any]:
    fields = row.as_dict()
    fields["duration"] = "" if row.duration is None else f"{row.duration:.3f}"
    fields["length"] = "" if row.length is None else repr(row.length)
    fields["offset"] = repr(row.offset)
    return fields
