"""Retraining entry point: `faultsense-retrain [overrides]` (Hydra, configs/retrain.yaml).

`retrain(cfg)` fine-tunes the registry's current model on the base training split plus
the labeled uploads, evaluates the new and the current model on the same fixed split
(the test fold; the val fold when the test fold is absent, and the decision says so),
registers the new version with `parent_version` = the current one, and promotes it only
if it passes the gate (new macro F1 >= current macro F1 - `tolerance`; `force` overrides).
The decision is recorded in the new bundle's `retrain` entry and, with `job_dir` set, in
`job_dir/decision.json`; progress goes to `job_dir/status.json` for the server to read.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from . import CONFIG_DIR
from .errors import ConfigError, FaultSenseError, ModelError
from .registry import Registry, export_checkpoint, fault_point, write_json_atomic

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
DECISION_FILE = "decision.json"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class JobStatus:
    """Progress of one retrain run in `job_dir/status.json` (atomic writes); no-op without a dir."""

    def __init__(self, job_dir: str | Path | None) -> None:
        self.path = Path(job_dir) / STATUS_FILE if job_dir else None
        self.data: dict[str, Any] = {"state": "running", "epoch": 0, "metrics": {}}

    def update(self, **fields: Any) -> None:
        self.data.update(fields, updated_at=_now())
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)


class _Progress(L.Callback):
    """Writes epoch and the latest logged metrics to the job status after every epoch."""

    def __init__(self, status: JobStatus) -> None:
        self.status = status

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            str(k): float(v)
            for k, v in trainer.callback_metrics.items()
            if torch.as_tensor(v).numel() == 1
        }
        self.status.update(epoch=int(trainer.current_epoch) + 1, metrics=metrics)


@torch.inference_mode()
def evaluate(net: torch.nn.Module, loader: Any, num_classes: int) -> dict[str, float]:
    """Accuracy and macro F1 of an eval-mode net over a loader of (waves [B, T], labels [B], ...)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    net.eval()
    preds, targets = [], []
    for waves, labels, *_ in loader:
        preds.append(net(waves).argmax(dim=1))
        targets.append(labels)
    if not preds:
        raise ConfigError("The evaluation split is empty: nothing to compare models on.")
    p, t = torch.cat(preds), torch.cat(targets)
    return {
        "acc": float(multiclass_accuracy(p, t, num_classes, average="micro")),
        "f1_macro": float(multiclass_f1_score(p, t, num_classes, average="macro")),
    }


def _plain(node: Any) -> Any:
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _instantiate_all(group: Any) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(n) for n in group.values() if n and "_target_" in n]


def retrain(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune, evaluate, register and gate; returns {version, promoted, decision, metrics}.

    Writes `state: failed` with the error to the job status before re-raising.
    """
    status = JobStatus(cfg.get("job_dir"))
    status.update(state="running", stage="preparing", max_epochs=int(cfg.get("epochs", 0)))
    try:
        result = _retrain(cfg, status)
    except BaseException as err:
        message = str(err) if isinstance(err, FaultSenseError) else f"{type(err).__name__}: {err}"
        status.update(state="failed", stage="failed", error=message)
        raise
    finally:
        if "wandb" in sys.modules:
            import wandb

            wandb.finish()
    status.update(
        state="succeeded",
        stage="done",
        version=result["version"],
        decision=result["decision"],
        metrics={**status.data.get("metrics", {}), **result["metrics"]},
    )
    return result


def _retrain(cfg: DictConfig, status: JobStatus) -> dict[str, Any]:
    from .data.datamodule import prepared_datamodule
    from .models.classifier import FaultClassifier

    epochs = cfg.get("epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}.")
    tolerance = float(cfg.get("tolerance", 0.0))
    force = bool(cfg.get("force", False))
    L.seed_everything(cfg.seed, workers=True)

    registry = Registry(cfg.paths.registry_dir)
    parent = registry.current()  # RegistryError when there is nothing to fine-tune
    parent_net = parent.load_net()
    rate, clip = parent.sample_rate, parent.clip_samples
    log.info("Fine-tuning %s for %d epochs", parent.version, epochs)

    # The data must match the bundle's input (rate, clip length); uploads join train. A
    # bundle has no category head: clips without a fault label would teach it nothing.
    datamodule = prepared_datamodule(
        cfg.data,
        sample_rate=rate,
        clip_seconds=clip / rate,
        uploads_dir=str(cfg.paths.uploads_dir),
        include_uploads=True,
        aux_clips=False,
    )
    if list(datamodule.labels) != parent.labels:
        raise ModelError(
            f"Model {parent.version} predicts {parent.labels} but the data has labels "
            f"{datamodule.labels}; retrain from scratch with `faultsense-train` instead."
        )

    optimizer = dict(_plain(cfg.model.get("optimizer")) or {"name": "adamw", "lr": 1e-3})
    optimizer["lr"] = float(optimizer.get("lr", 1e-3)) * float(cfg.get("lr_scale", 1.0))
    spec = parent.meta["net_spec"]
    model = FaultClassifier(
        net={k: spec[k] for k in ("frontend", "backbone", "head") if k in spec},
        num_classes=len(parent.labels),
        sample_rate=rate,
        clip_samples=clip,
        labels=parent.labels,
        class_weights=list(datamodule.class_weights) if cfg.get("class_weighted", True) else None,
        optimizer=optimizer,
        scheduler=_plain(cfg.model.get("scheduler")),
        augment=_plain(cfg.model.get("augment")),
        label_smoothing=float(cfg.model.get("label_smoothing", 0.0)),
    )
    model.net.load_state_dict(parent_net.state_dict())

    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=epochs,
        min_epochs=1,
        callbacks=[*callbacks, _Progress(status)],
        logger=loggers or False,
    )
    status.update(stage="training", max_epochs=epochs)
    trainer.fit(model, datamodule=datamodule)

    fault_point("export")
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None else ""
    if best:
        net, meta = export_checkpoint(best)
    else:
        net, meta = (
            model.net.eval(),
            {
                "net_spec": model.net_spec(),
                "labels": parent.labels,
                "sample_rate": rate,
                "clip_samples": clip,
            },
        )

    status.update(stage="evaluating")
    num_classes = len(parent.labels)
    split = "test" if datamodule.has_test else "val"
    new_metrics: dict[str, float] = {}
    current_metrics: dict[str, float] = {}
    splits = [("val", datamodule.val_dataloader())]
    if datamodule.has_test:
        splits.append(("test", datamodule.test_dataloader()))
    for name, loader in splits:
        for key, value in evaluate(net, loader, num_classes).items():
            new_metrics[f"{name}/{key}"] = value
    for key, value in evaluate(parent_net, splits[-1][1], num_classes).items():
        current_metrics[f"{split}/{key}"] = value

    gate = f"{split}/f1_macro"
    new_score, current_score = new_metrics[gate], current_metrics[gate]
    passed = new_score >= current_score - tolerance
    still_current = registry.current_version() == parent.version
    promote = force or (passed and still_current)
    if not still_current and not force:
        reason = (
            f"not promoted: the current model changed from {parent.version} to "
            f"{registry.current_version()} while retraining ran"
        )
    elif passed:
        reason = f"{gate} {new_score:.4f} >= {current_score:.4f} - {tolerance:g}: promoted"
    elif force:
        reason = (
            f"{gate} {new_score:.4f} < {current_score:.4f} - {tolerance:g}: promoted anyway (force)"
        )
    else:
        reason = (
            f"{gate} {new_score:.4f} < {current_score:.4f} - {tolerance:g}: kept {parent.version}"
        )
    decision: dict[str, Any] = {
        "promoted": promote,
        "forced": bool(force and not (passed and still_current)),
        "passed_gate": passed,
        "reason": reason,
        "gate_metric": gate,
        "tolerance": tolerance,
        "split": split,
        "parent_version": parent.version,
        "new_metrics": new_metrics,
        "current_metrics": current_metrics,
        "epochs": epochs,
        "train_clips": int(sum(datamodule.class_counts.values())),
        "uploads": _upload_counts(cfg),
        "decided_at": _now(),
    }
    if split == "val":
        decision["note"] = (
            f"test fold {cfg.data.get('test_fold')} is absent: the gate compared the models on "
            f"the val fold {datamodule.val_fold}, which also selected the checkpoint (optimistic)."
        )

    status.update(stage="registering")
    meta.update(
        metrics=new_metrics,
        parent_version=parent.version,
        data_fingerprint=getattr(datamodule, "fingerprint", None),
        mapping=copy.deepcopy(getattr(datamodule, "mapping", None)),
        config=_config(cfg),
        retrain=decision,
    )
    version = registry.register(net, meta, promote=promote, reason=f"retrain: {reason}")
    decision["version"] = version
    if cfg.get("job_dir"):
        write_json_atomic(Path(cfg.job_dir) / DECISION_FILE, decision)
    log.info("Registered %s (parent %s): %s", version, parent.version, reason)
    return {"version": version, "promoted": promote, "decision": decision, "metrics": new_metrics}


def _upload_counts(cfg: DictConfig) -> dict[str, int]:
    from .data.uploads import UploadStore

    try:
        return UploadStore(cfg.paths.uploads_dir).counts()
    except OSError:
        return {}


def _config(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # `${hydra:...}` resolves only inside a Hydra run
        return OmegaConf.to_container(cfg, resolve=False)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="retrain")
def main(cfg: DictConfig) -> None:
    """`faultsense-retrain`: fine-tune, gate and (maybe) promote; prints the decision."""
    try:
        result = retrain(cfg)
    except FaultSenseError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(result["decision"]["reason"])


if __name__ == "__main__":
    main()
