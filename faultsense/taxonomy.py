"""The four fault labels. Nothing else in the project defines them."""

from __future__ import annotations

from .errors import LabelError

LABELS: tuple[str, ...] = ("mechanical_fault", "electrical_fault", "fluid_leak", "normal")
NUM_LABELS = len(LABELS)
LABEL_TO_INDEX: dict[str, int] = {label: i for i, label in enumerate(LABELS)}


def validate_label(label: str) -> str:
    """Return `label` stripped if it is one of LABELS, else raise LabelError naming the choices."""
    cleaned = str(label).strip()
    if cleaned not in LABEL_TO_INDEX:
        # Quote at most 80 characters: a request can send a megabyte as its "label".
        shown = repr(label) if len(str(label)) <= 80 else repr(str(label)[:80]) + "..."
        raise LabelError(f"Unknown label {shown}. Expected one of: {', '.join(LABELS)}.")
    return cleaned
