"""Leak-free splits for sources without official folds: stratified group k-fold, where a
group is a recording, so chunks of one recording never sit on both sides of a split.

`recording_of(stem, group_by)` names a file's recording: the first capture group of the
`data.group_by` regular expression applied to the file name without its extension
(e.g. `(.*)_[0-9]+` for `<recording>_<chunk>.wav`). `assign_folds` gives every row a
fold 1..k, balancing each label's clips across folds (deterministic for a seed).
`split_table` counts clips and groups per label per split and lists what looks wrong
(a label missing from a split, a share far from the others', a group in two splits).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DataError
from .manifest import AUX_ONLY, TRAIN_ONLY_FOLD, ManifestRow

SPLITS = ("train", "val", "test")
# A label's share of a held-out split beyond this factor of its share of train is flagged.
UNBALANCED_FACTOR = 2.0


def compile_group_by(group_by: str | None) -> re.Pattern[str] | None:
    """`data.group_by` compiled; a ConfigError when it is not a regex with a capture group."""
    if group_by is None or str(group_by) == "":
        return None
    try:
        pattern = re.compile(str(group_by))
    except re.error as err:
        raise ConfigError(
            f"data.group_by={group_by!r} is not a regular expression: {err}."
        ) from None
    if pattern.groups < 1:
        raise ConfigError(
            f"data.group_by={group_by!r} has no capture group: wrap the part of the file name "
            "that names the recording in parentheses, e.g. '(.*)_[0-9]+'."
        )
    return pattern


def recording_of(stem: str, pattern: re.Pattern[str] | None) -> str | None:
    """The recording a file belongs to by `pattern` (first capture group of a full match on
    its name without extension), or None when there is no pattern or it does not match."""
    if pattern is None:
        return None
    match = pattern.fullmatch(stem)
    return match.group(1) if match and match.group(1) else None


def stratified_group_folds(
    labels: Sequence[str], groups: Sequence[str], num_folds: int, seed: int = 0
) -> list[int]:
    """A fold 1..`num_folds` per item: items of one group share a fold, and each label's
    items spread as evenly as the groups allow. Deterministic for `seed`.

    Greedy, like scikit-learn's StratifiedGroupKFold: groups in a seeded random order,
    then the largest first; each goes to the fold where it leaves the per-label counts
    most even (ties: the fold with fewest items, then the lowest)."""
    names = sorted(set(labels))
    column = {name: i for i, name in enumerate(names)}
    per_group: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(names)))
    for label, group in zip(labels, groups, strict=True):
        per_group[group][column[label]] += 1
    order = sorted(per_group)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -per_group[g].sum())  # stable: the shuffle breaks ties
    totals = np.maximum(sum(per_group.values(), np.zeros(len(names))), 1)
    counts = np.zeros((num_folds, len(names)))
    fold_of: dict[str, int] = {}
    for group in order:
        best = None
        for fold in range(num_folds):
            counts[fold] += per_group[group]
            spread = float(np.std(counts / totals, axis=0).mean())
            key = (spread, counts[fold].sum(), fold)
            counts[fold] -= per_group[group]
            best = key if best is None or key < best else best
        fold_of[group] = best[2]
        counts[best[2]] += per_group[group]
    return [fold_of[g] + 1 for g in groups]


def assign_folds(
    rows: list[ManifestRow], *, num_folds: int, seed: int, where: str
) -> list[ManifestRow]:
    """`rows` with folds: kept when every row has one (> 0), else stratified group k-fold
    over all of them (rows' `recording`). Some rows with a fold and some without is a
    DataError naming `where`."""
    given = [r.fold > 0 for r in rows]
    if all(given):
        return rows
    if any(given):
        raise DataError(
            f"{where}: {sum(given)} of {len(rows)} clips have a fold; give every clip a fold "
            "or none (then folds are made by stratified group k-fold)."
        )
    if num_folds < 2:
        raise ConfigError(f"data.num_folds must be >= 2, got {num_folds}.")
    recordings = {r.recording for r in rows}
    if len(recordings) < num_folds:
        raise DataError(
            f"{where}: {len(recordings)} recording(s) cannot fill data.num_folds={num_folds} "
            "folds (chunks of one recording share a fold); lower data.num_folds or check "
            "data.group_by."
        )
    folds = stratified_group_folds(
        [r.label for r in rows], [r.recording for r in rows], num_folds, seed
    )
    return [dataclasses.replace(r, fold=f) for r, f in zip(rows, folds, strict=True)]


def split_of(fold: int, val_fold: int, test_fold: int | None) -> str:
    """ "val", "test" or "train" for a clip of `fold` (uploads, fold 0, train)."""
    if fold == val_fold and fold != TRAIN_ONLY_FOLD:
        return "val"
    return "test" if test_fold is not None and fold == test_fold else "train"


@dataclass
class SplitTable:
    """Clips and groups per (label, split); `warnings` says what looks unbalanced or leaky."""

    labels: list[str]
    clips: Counter = field(default_factory=Counter)
    groups: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    warnings: list[str] = field(default_factory=list)


def split_table(
    rows: Sequence[ManifestRow], labels: Sequence[str], val_fold: int, test_fold: int | None
) -> SplitTable:
    """Count clips and groups per label per split (`test_fold` None = no test split) and
    warn about a label absent from a split, a share off by UNBALANCED_FACTOR, or a group
    found in two splits (a leak: only possible with folds given by the data)."""
    table = SplitTable(list(labels))
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.label == AUX_ONLY:
            continue
        split = split_of(row.fold, val_fold, test_fold)
        table.clips[row.label, split] += 1
        table.groups[row.label, split].add(row.recording)
        if row.source != "upload":
            splits_of[row.recording].add(split)
    held_out = ["val"] + (["test"] if test_fold is not None else [])
    table.warnings += _balance_warnings(table, held_out)
    leaks = sorted(g for g, s in splits_of.items() if len(s) > 1)
    if leaks:
        table.warnings.append(
            f"{len(leaks)} group(s) have clips in two splits (e.g. {leaks[0]!r}): the folds "
            "given by the data split recordings; give each recording's clips one fold."
        )
    return table


def _balance_warnings(table: SplitTable, held_out: list[str]) -> list[str]:
    totals = {s: sum(table.clips[label, s] for label in table.labels) for s in SPLITS}
    warnings = []
    for label in table.labels:
        train_share = table.clips[label, "train"] / max(totals["train"], 1)
        for split in ["train", *held_out]:
            n = table.clips[label, split]
            if n == 0:
                warnings.append(f"label {label!r} has no clip in {split}.")
                continue
            share = n / max(totals[split], 1)
            if split != "train" and not (
                train_share / UNBALANCED_FACTOR <= share <= train_share * UNBALANCED_FACTOR
            ):
                warnings.append(
                    f"label {label!r} is {share:.0%} of {split} but {train_share:.0%} of train."
                )
    return warnings
