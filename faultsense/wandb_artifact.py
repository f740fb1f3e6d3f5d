"""A registered bundle as a W&B model artifact, when a W&B run is active; best effort.

The local registry is the source of truth: training and retraining call this after
registering, and a failure here is only logged. wandb is used only if something already
imported it (an active run implies that), so this module never pulls it in.
"""

from __future__ import annotations

import logging
import sys

from .registry import Bundle

log = logging.getLogger(__name__)

ARTIFACT_NAME = "faultsense-model"


def log_bundle_artifact(bundle: Bundle, *, promoted: bool) -> None:
    """Log `bundle`'s folder as artifact `faultsense-model`, aliased with its version (and
    `current` when `promoted`); its bundle.json, less the run config, is the metadata."""
    if "wandb" not in sys.modules:
        return
    try:
        import wandb

        run = wandb.run
        if run is None:
            return
        artifact = wandb.Artifact(
            name=ARTIFACT_NAME,
            type="model",
            metadata={k: v for k, v in bundle.meta.items() if k != "config"},
        )
        artifact.add_dir(str(bundle.path))
        aliases = [bundle.version] + (["current"] if promoted else [])
        run.log_artifact(artifact, aliases=aliases)
    except Exception as err:  # never let tracking break registration
        log.warning("Could not log %s to W&B: %s", bundle.version, err)
