"""From training to the registry: a Lightning checkpoint -> (FaultNet, bundle meta), and the
registration of a training run's best checkpoint.

Nothing here reads a Hydra config: the entry point (`faultsense.train`) extracts what a
bundle records into a `TrainingRecord` of plain values. The checkpoint is read with
`weights_only=True` (its hparams are primitives), so nothing is unpickled; only torch
is needed, not Lightning.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError, RegistryError
from .registry import Registry
from .wandb_artifact import log_bundle_artifact

if TYPE_CHECKING:
    from torch import nn

# What a FaultClassifier checkpoint carries besides its weights (`on_save_checkpoint`).
_CHECKPOINT_KEYS = ("state_dict", "net_spec", "labels")


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run adds to its bundle's meta, as plain JSON-able values."""

    metrics: dict[str, float]  # the run's final val/test metrics
    labels: list[str]  # the datamodule's labels (the checkpoint's order)
    data_fingerprint: str | None = None
    mapping: dict[str, Any] | None = None  # the source's category -> label mapping
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config
    training_log: dict[str, str] | None = None  # {run_dir, metrics_csv}: the run's curves


def export_checkpoint(ckpt_path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A Lightning checkpoint -> (eval-mode FaultNet, meta with net_spec, labels, sample_rate,
    clip_samples, the checkpoint's metrics and where it came from).

    The net is rebuilt from the checkpoint's `net_spec` and loaded from its `net.*` weights.
    RegistryError if the file is missing, unsafe or not a FaultSense checkpoint; ModelError
    if the weights do not fit the spec.
    """
    from .models.net import build_net

    path = Path(ckpt_path)
    ckpt = _load_checkpoint(path)
    spec = ckpt["net_spec"]
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net = build_net(copy.deepcopy(spec))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"Checkpoint {path}: weights do not fit the net_spec: {err}") from None
    meta = {
        "net_spec": net.spec,
        "labels": list(ckpt["labels"]),
        "sample_rate": int(spec["sample_rate"]),
        "clip_samples": int(spec["clip_samples"]),
        "metrics": {k: float(v) for k, v in (ckpt.get("metrics") or {}).items()},
        "checkpoint": {
            "file": path.name,
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
        },
    }
    return net.eval(), meta


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, loaded without unpickling; RegistryError unless it has what
    `export_checkpoint` needs."""
    import torch

    if not path.is_file():
        raise RegistryError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise RegistryError(f"Checkpoint {path} cannot be loaded safely: {err}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RegistryError(
            f"Checkpoint {path} is not a FaultSense training checkpoint (no {', '.join(missing)}); "
            "train it again with `faultsense-train`."
        )
    return ckpt


def register_from_training(
    ckpt_path: str | os.PathLike[str],
    record: TrainingRecord,
    *,
    registry_dir: str | os.PathLike[str] | None = None,
    promote: bool = True,
    onnx: bool = False,
) -> str:
    """Register the best checkpoint of a training run with `record`; returns its version.

    Promotes it when `promote` is true or the registry has no current version yet (the
    first model is always served). `onnx` adds an ONNX file checked against PyTorch.
    """
    net, meta = export_checkpoint(ckpt_path)
    meta["labels"] = list(record.labels)
    # The run's final metrics (val + test) override the ones stored with the checkpoint.
    meta["metrics"] = {**meta.get("metrics", {}), **float_metrics(record.metrics)}
    meta["data_fingerprint"] = record.data_fingerprint
    meta["mapping"] = record.mapping
    meta["config"] = record.config
    if record.training_log:
        meta["training_log"] = record.training_log
    registry = Registry(registry_dir)
    promote = promote or registry.current_version() is None
    version = registry.register(
        net, meta, promote=promote, reason=f"trained: {Path(ckpt_path).name}", onnx=onnx
    )
    log_bundle_artifact(registry.get(version), promoted=promote)
    return version


def float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of `metrics` that convert to float (tensors, numpy scalars, numbers)."""
    out = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
    return out
