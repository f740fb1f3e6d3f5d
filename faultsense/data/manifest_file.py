"""Manifest-file source (`data=manifest`, `data.kind=manifest`): a CSV or JSON-lines file
listing labeled clips, NeMo/SpeechBrain-style.

Fields: `path` (or NeMo's `audio_filepath`, SpeechBrain's `wav`, `file_name`) and
`label`; optional `fold`, `group`, `offset` and `duration` (seconds: the segment
`offset .. offset + duration` of a long recording; no duration = to its end) and `id`.
A relative path resolves against the manifest's folder. `.jsonl`/`.json` is read as one
JSON object per line, anything else as CSV with a header. Without folds, folds are made
by stratified group k-fold where a group is the `group` given, else the `data.group_by`
match on the file name, else the file: segments of one recording never split.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .labeled import LabeledSource, source_path
from .manifest import ManifestRow
from .sources import register_source

PATH_FIELDS = ("path", "audio_filepath", "wav", "file_name")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@register_source("manifest")
class ManifestFileSource(LabeledSource):
    """The clips listed in the manifest file `source` as manifest rows.

    `group_by`, `num_folds`, `split_seed`: as for `faultsense.data.folder.FolderSource`.
    """

    def rows(self, *, create: bool) -> list[ManifestRow]:
        path = source_path(self.source, "manifest", "FILE (a .csv or .jsonl manifest)")
        if not path.is_file():
            raise DataError(f"data.source={self.source} is not a file (data=manifest).")
        files = self.files(path.parent, "manifest")
        for where, entry in read_entries(path):
            name = next((str(entry[k]) for k in PATH_FIELDS if entry.get(k) not in (None, "")), "")
            if not name.strip():
                raise DataError(f"{where}: no path (one of the fields {', '.join(PATH_FIELDS)}).")
            clip = Path(name.strip()).expanduser()
            files.add(
                clip if clip.is_absolute() else path.parent / clip,
                entry.get("label"),
                where,
                fold=entry.get("fold"),
                group=entry.get("group"),
                offset=entry.get("offset"),
                length=entry.get("duration"),
                id=entry.get("id") or entry.get("ID"),
            )
        rows = self.finish(files)
        self.stats.root = path
        return rows


def read_entries(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("<file> line N", fields) per listed clip of a CSV or JSON-lines manifest."""
    try:
        with open(path, newline="") as f:
            if path.suffix.lower() in JSON_SUFFIXES:
                yield from _json_lines(f, path)
            else:
                for line, entry in enumerate(csv.DictReader(f), start=2):
                    yield f"{path} line {line}", entry
    except OSError as err:
        raise DataError(f"Cannot read manifest {path}: {err.strerror}.") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a valid manifest file: {err}.") from None


def _json_lines(f: Any, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line, text in enumerate(f, start=1):
        if not text.strip():
            continue
        where = f"{path} line {line}"
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not a JSON object: {err.msg}.") from None
        if not isinstance(entry, dict):
            raise DataError(f"{where} is not a JSON object.")
        yield where, entry
