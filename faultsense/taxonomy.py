"""Label names: the ESC-50 mapping's default fault labels, and the checks every label
passes. A model's own labels live in its bundle (`Bundle.labels`); the server, the app
and retraining use those, never this default list."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import LabelError

# The default labels of the ESC-50 mapping (configs/data/esc50_fault.yaml), in class order.
LABELS: tuple[str, ...] = ("mechanical_fault", "electrical_fault", "fluid_leak", "normal")
NUM_LABELS = len(LABELS)
LABEL_TO_INDEX: dict[str, int] = {label: i for i, label in enumerate(LABELS)}

# A label names a folder (uploads, `<root>/<label>/<file>` datasets): letters, digits,
# `_` and `-` only, so it can never be a path, a dot file or a shell word.
MAX_LABEL_CHARS = 64
_LABEL_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_LABEL_CHARS}}}")


def _shown(label: object) -> str:
    """`label` quoted for a message, at most 80 characters (a request can send a megabyte)."""
    text = str(label)
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def check_label_name(label: object) -> str:
    """`label` stripped if it is a safe label name (1..MAX_LABEL_CHARS of [A-Za-z0-9_-]),
    else LabelError saying what a label may contain."""
    cleaned = str(label).strip()
    if not _LABEL_NAME.fullmatch(cleaned):
        raise LabelError(
            f"Invalid label {_shown(label)}: a label is 1 to {MAX_LABEL_CHARS} letters, "
            "digits, '_' or '-'."
        )
    return cleaned


def validate_label(label: object, labels: Sequence[str] = LABELS, *, owner: str = "") -> str:
    """`label` stripped if it is one of `labels` (default: the ESC-50 mapping's), else
    LabelError naming the labels it could be; `owner` says whose labels they are."""
    cleaned = str(label).strip()
    if cleaned not in labels:
        whose = f" {owner}" if owner else ""
        raise LabelError(
            f"Unknown label {_shown(label)}. The labels{whose} are: {', '.join(labels)}."
        )
    return cleaned
