"""Folder source (`data=folder`, `data.kind=folder`): one sub-folder per label, the
`audiofolder` convention of Hugging Face datasets.

    <root>/<label>/<file>          any audio file the decoder reads (WAV, FLAC, OGG, MP3, ...),
    <root>/<label>/<sub>/<file>    any sample rate and length; sub-folders belong to the label
    <root>/metadata.csv            optional: file_name (relative to root), label, fold, group

A `metadata.csv` row overrides what the folders say for its file (an empty cell keeps
it); a file it lists outside any label folder needs its `label`. Without folds in the
data, folds are made by stratified group k-fold (`faultsense.data.splits`): groups from
the `group` column, else `data.group_by`, else each file alone. Labels are the folder
(or metadata) names, sorted.
"""

from __future__ import annotations

from pathlib import Path

from .. import audio
from ..errors import DataError
from .labeled import LabeledSource, source_path
from .manifest import ManifestRow, read_csv_table
from .sources import register_source

METADATA_FILE = "metadata.csv"


@register_source("folder")
class FolderSource(LabeledSource):
    """The audio files under `source` as manifest rows labeled by folder (or metadata).

    `group_by`: regex naming a file's recording (first capture group); `num_folds`,
    `split_seed`: the group k-fold made when the data has no folds.
    """

    def rows(self, *, create: bool) -> list[ManifestRow]:
        root = source_path(self.source, "folder", "DIR (a folder with one sub-folder per label)")
        if not root.is_dir():
            raise DataError(f"data.source={self.source} is not a folder (data=folder).")
        files = self.files(root, "folder")
        listed = read_metadata(root)
        for path in audio_files(root):
            rel = path.relative_to(root).as_posix()
            meta = listed.pop(rel, {})
            folder_label = rel.split("/", 1)[0] if "/" in rel else ""
            label = meta.get("label") or folder_label
            if label:
                where = f"{root / METADATA_FILE}: {rel}" if meta else str(path)
                files.add(path, label, where, fold=meta.get("fold"), group=meta.get("group"))
        for rel, meta in listed.items():  # listed, but not an audio file under root
            where = f"{root / METADATA_FILE}: {rel}"
            files.add(
                root / rel, meta.get("label"), where, fold=meta.get("fold"), group=meta.get("group")
            )
        return self.finish(files)


def audio_files(root: Path) -> list[Path]:
    """Audio files (by suffix) under `root`, sorted, hidden files and folders left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in audio.AUDIO_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_metadata(root: Path) -> dict[str, dict[str, str]]:
    """`root/metadata.csv` as {file_name: {label, fold, group}} (empty cells left out);
    {} when there is none."""
    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    entries = read_csv_table(path, ("file_name",), "metadata.csv")
    listed: dict[str, dict[str, str]] = {}
    for line, entry in enumerate(entries, start=2):
        name = Path(str(entry.get("file_name") or "").strip()).as_posix()
        if name in ("", "."):
            raise DataError(f"{path} line {line}: empty file_name.")
        keep = ("label", "fold", "group")
        listed[name] = {k: str(entry[k]).strip() for k in keep if (entry.get(k) or "").strip()}
    return listed
