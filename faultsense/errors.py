"""One small error hierarchy. The library raises these with the offending file or field
named; the server maps them to 4xx; CLIs print them without a traceback."""

from __future__ import annotations


class FaultSenseError(Exception):
    """Base of every error FaultSense raises on purpose. `str(err)` is user-facing."""


class AudioError(FaultSenseError):
    """Audio that cannot be used: empty, undecodable, silent/NaN, bad rate, too long."""


class LabelError(FaultSenseError):
    """A label that is not in the taxonomy."""


class DataError(FaultSenseError):
    """Missing or inconsistent dataset, manifest, cache or uploads."""


class ConfigError(FaultSenseError):
    """A configuration value that cannot work."""


class ModelError(FaultSenseError):
    """A model that cannot be built or loaded (e.g. a missing pretrained encoder)."""


class RegistryError(FaultSenseError):
    """A registry or bundle problem: unknown version, tampered or half-written bundle."""
