"""The seam between where clips come from and the DataModule: a data source yields
labeled manifest rows, and `data.kind` picks the source by name.

A source is a class (or any callable) registered with `@register_source("<kind>")`. The
DataModule builds it as `factory(skip_bad=..., progress=..., **options)`, where
`options` are the data config's keys that the DataModule does not use itself (e.g.
`source`, `raw_dir`, `mapping`), null ones left out; then it calls `rows(create=...)`. A kind not registered
yet is looked up as the module `faultsense.data.<kind>` (or the one `_MODULES` names),
which registers it on import, so a new built-in source is one module plus one
`configs/data/<kind>.yaml`.

A source may also have `labels`: its label set in order once `rows()` has run (the
folder and manifest sources: the labels found, sorted). Without it, or None, the
DataModule uses the default labels of `faultsense.taxonomy` unless `data.labels` is set.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError
from .manifest import ManifestRow


@dataclass
class SourceStats:
    """What a source holds before and after mapping (for the `faultsense-data` report)."""

    root: Path
    clips: int = 0
    mapped: int = 0
    dropped_categories: list[str] = field(default_factory=list)
    missing_folds: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class DataSource(Protocol):
    """Labeled clips as manifest rows.

    `mapping`: the plain category -> label mapping the rows were labeled with (recorded in
    the cache fingerprint), or None when the source labels clips itself. `stats`: what
    the last `rows()` found, or None.
    """

    mapping: dict[str, Any] | None
    stats: SourceStats | None

    def rows(self, *, create: bool) -> list[ManifestRow]:
        """The clips, labeled. `create` (rank 0, in `prepare_data`) may download, extract or
        generate; without it nothing is written and missing data raises DataError."""
        ...


SourceFactory = Callable[..., DataSource]
F = TypeVar("F", bound=SourceFactory)

_SOURCES: dict[str, SourceFactory] = {}
_KIND = re.compile(r"[a-z][a-z0-9_]*")
# Built-in kinds whose module is not named after them (`manifest.py` holds the row).
_MODULES = {"manifest": "manifest_file"}


def register_source(kind: str) -> Callable[[F], F]:
    """Class decorator: make the source selectable as `data.kind=<kind>`."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"A source kind is a lowercase identifier, got {kind!r}.")

    def register(factory: F) -> F:
        known = _SOURCES.get(kind)
        if known is not None and _where(known) != _where(factory):  # a reload may re-register
            raise ValueError(f"Data source kind {kind!r} is already registered by {known}.")
        _SOURCES[kind] = factory
        return factory

    return register


def _where(factory: SourceFactory) -> str:
    return f"{factory.__module__}.{factory.__qualname__}"


def get_source(kind: str) -> SourceFactory:
    """The factory registered as `kind`, importing `faultsense.data.<kind>` if needed."""
    kind = str(kind).strip()
    if kind not in _SOURCES and _KIND.fullmatch(kind):
        module = f"{__package__}.{_MODULES.get(kind, kind)}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise  # the module exists but one of its imports is missing
    if kind not in _SOURCES:
        raise ConfigError(
            f"data.kind={kind!r} is not a data source. Known: {', '.join(_known_kinds())} "
            "(register one with faultsense.data.sources.register_source)."
        )
    return _SOURCES[kind]


def _known_kinds() -> list[str]:
    """Every kind registered once the package's own modules are imported (error path)."""
    for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    return sorted(_SOURCES)


def build_source(kind: str, *, skip_bad: bool, progress: bool, **options: Any) -> DataSource:
    """`get_source(kind)(skip_bad=..., progress=..., **options)`; an option the source does
    not take is a ConfigError naming it."""
    factory = get_source(kind)
    try:
        return factory(skip_bad=skip_bad, progress=progress, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise ConfigError(
            f"data.kind={kind}: {err}; remove that key from the data config."
        ) from None
