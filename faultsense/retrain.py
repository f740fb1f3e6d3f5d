"""Retraining entry point: `faultsense-retrain [overrides]` (Hydra, configs/retrain.yaml).

`retrain(cfg)` fine-tunes the registry's current model on the base training split plus
the labeled uploads. The base data is the data the current model was trained on: its
bundle's recorded data config (kind, source, labels, mapping, folds), with this run's
machine-local keys (cache, manifest, batching) and the operator's explicit `data.*`
overrides on top (`data_from=config`, or a `data=...` choice, uses this run's data
config instead). A model whose labels differ from what the data yields is another
lineage: the retrain refuses it (train it with `faultsense-train`). It evaluates the new and the current model on the same fixed split
(the test fold; the val fold when the test fold is absent, and the decision says so),
registers the new version with `parent_version` = the current one, and promotes it only
if it passes the gate (new macro F1 >= current macro F1 - `tolerance`; `force` overrides).
The decision is recorded in the new bundle's `retrain` entry and, with `job_dir` set, in
`job_dir/decision.json`; progress goes to `job_dir/status.json` for the server to read
(`faultsense.retrain_job`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from . import CONFIG_DIR
from .confidence import bin_counts, predict_loader
from .config import instantiate, plain, resolved_config, run_cli, utc_now
from .errors import ConfigError, FaultSenseError, ModelError
from .registry import Bundle, Registry, fault_point
from .retrain_job import JobStatus
from .train import curves_log, finish_wandb_run, loggers_and_callbacks
from .wandb_artifact import log_bundle_artifact

log = logging.getLogger(__name__)

# The gate compares this metric, on the evaluation split (`test/...` or `val/...`).
GATE_METRIC = "f1_macro"
# Keys of the data config that say where this machine keeps things and how it batches,
# not which data: a retrain takes them from its own config, everything else from the bundle.
LOCAL_DATA_KEYS = (
    "cache_dir", "manifest_path", "uploads_dir", "include_uploads", "aux_clips",
    "batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers",
    "progress", "predict_files", "sample_rate", "clip_seconds",
)  # fmt: skip


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


@dataclass
class SplitScores:
    """A net on one split: its metrics, confusion matrix (rows = true label) and the top
    probability of each clip."""

    metrics: dict[str, float]
    confusion: list[list[int]]
    confidences: list[float]


def score_split(net: torch.nn.Module, loader: Any, num_classes: int) -> SplitScores:
    """Accuracy, macro F1, confusion and confidences of `net` over a loader of (waves [B, T],
    labels [B], ...), in one pass."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
    )

    probs, t = predict_loader(net, loader)
    if not len(probs):
        raise ConfigError("The evaluation split is empty: nothing to compare models on.")
    top, p = probs.max(dim=1)
    return SplitScores(
        metrics={
            "acc": float(multiclass_accuracy(p, t, num_classes, average="micro")),
            "f1_macro": float(multiclass_f1_score(p, t, num_classes, average="macro")),
        },
        confusion=multiclass_confusion_matrix(p, t, num_classes).tolist(),
        confidences=top.tolist(),
    )


def split_metrics(scores: Mapping[str, SplitScores]) -> dict[str, float]:
    """{"<split>/<metric>": value} over the splits scored."""
    return {f"{name}/{key}": v for name, s in scores.items() for key, v in s.metrics.items()}


def evaluate(net: torch.nn.Module, loader: Any, num_classes: int) -> dict[str, float]:
    """Accuracy and macro F1 of a net over a loader of (waves [B, T], labels [B], ...)."""
    return score_split(net, loader, num_classes).metrics


def gate(
    new: Mapping[str, float],
    current: Mapping[str, float],
    *,
    metric: str,
    tolerance: float = 0.0,
    force: bool = False,
    parent_version: str | None = None,
    current_version: str | None = None,
) -> dict[str, Any]:
    """Decide whether the new model replaces the current one. Pure: metrics in, decision out.

    Passes when `new[metric] >= current[metric] - tolerance`; a metric missing (or NaN) on
    either side fails it. Promotes when it passes and the registry's current version is
    still `parent_version` (another promotion while retraining ran wins), or when `force`.
    Returns {promoted, forced, passed_gate, reason, gate_metric, tolerance,
    parent_version, new_metrics, current_metrics}.
    """
    new_score, current_score = new.get(metric), current.get(metric)
    if new_score is None or current_score is None:
        side = "new" if new_score is None else "current"
        comparison, passed = f"{metric} is missing from the {side} model's metrics", False
    else:
        passed = new_score >= current_score - tolerance  # False for NaN
        sign = ">=" if passed else "<"
        comparison = f"{metric} {new_score:.4f} {sign} {current_score:.4f} - {tolerance:g}"
    still_current = current_version == parent_version
    if not still_current and not force:
        reason = (
            f"not promoted: the current model changed from {parent_version} to "
            f"{current_version} while retraining ran"
        )
    elif passed:
        reason = f"{comparison}: promoted"
    elif force:
        reason = f"{comparison}: promoted anyway (force)"
    else:
        reason = f"{comparison}: kept {parent_version}"
    return {
        "promoted": bool(force or (passed and still_current)),
        "forced": bool(force and not (passed and still_current)),
        "passed_gate": passed,
        "reason": reason,
        "gate_metric": metric,
        "tolerance": tolerance,
        "parent_version": parent_version,
        "new_metrics": dict(new),
        "current_metrics": dict(current),
    }


def retrain(cfg: DictConfig, data_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fine-tune, evaluate, gate and register; returns {version, promoted, decision, metrics}.

    `data_overrides` are the run's command-line overrides (the entry point passes Hydra's);
    those of `data` win over the bundle's recorded data config (`base_data`).
    Writes `state: failed` with the error to the job status before re-raising.
    """
    status = JobStatus(cfg.get("job_dir"))
    status.update(state="running", stage="preparing", max_epochs=int(cfg.get("epochs", 0)))
    try:
        result = _retrain(cfg, status, data_overrides)
    except BaseException as err:
        message = str(err) if isinstance(err, FaultSenseError) else f"{type(err).__name__}: {err}"
        status.update(state="failed", stage="failed", error=message)
        raise
    finally:
        finish_wandb_run()
    status.update(
        state="succeeded",
        stage="done",
        version=result["version"],
        decision=result["decision"],
        metrics={**status.data.get("metrics", {}), **result["metrics"]},
    )
    return result


def _retrain(cfg: DictConfig, status: JobStatus, data_overrides: Sequence[str]) -> dict[str, Any]:
    """The steps: fine-tune the current model, evaluate both, gate, register."""
    epochs = _epochs(cfg)
    L.seed_everything(cfg.seed, workers=True)
    registry = Registry(cfg.paths.registry_dir)
    parent = registry.current()  # RegistryError when there is nothing to fine-tune
    cfg, data_from = base_data(cfg, parent.meta, data_overrides)
    parent_net = parent.load_net()
    log.info("Fine-tuning %s for %d epochs on data from %s", parent.version, epochs, data_from)
    datamodule = _datamodule(cfg, parent)
    tuned = fine_tune(cfg, parent, parent_net, datamodule, status, epochs)

    status.update(stage="evaluating")
    split, scores, current_metrics = evaluate_both(tuned.net, parent_net, datamodule)
    new_metrics = split_metrics(scores)
    decision = gate(
        new_metrics,
        current_metrics,
        metric=f"{split}/{GATE_METRIC}",
        tolerance=float(cfg.get("tolerance", 0.0)),
        force=bool(cfg.get("force", False)),
        parent_version=parent.version,
        current_version=registry.current_version(),
    )
    decision.update(_decision_context(cfg, datamodule, split, epochs))
    decision["data"] = {"from": data_from, "kind": cfg.data.get("kind"),
                        "source": cfg.data.get("source")}  # fmt: skip

    status.update(stage="registering")
    version = register(registry, tuned.net, tuned.meta, decision, datamodule, cfg)
    write_run_summary(cfg, datamodule, tuned, scores, version)
    status.write_decision(decision)
    log.info("Registered %s (parent %s): %s", version, parent.version, decision["reason"])
    return {
        "version": version,
        "promoted": decision["promoted"],
        "decision": decision,
        "metrics": new_metrics,
    }


def _epochs(cfg: DictConfig) -> int:
    epochs = cfg.get("epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}.")
    return epochs


def _datamodule(cfg: DictConfig, parent: Bundle) -> Any:
    """The configured data at the bundle's input (rate, clip length), uploads joining train.
    A bundle has no category head: clips without a fault label would teach it nothing."""
    from .data.datamodule import prepared_datamodule

    rate, clip = parent.sample_rate, parent.clip_samples
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
            f"Model {parent.version} predicts {parent.labels} but the data yields the labels "
            f"{datamodule.labels}: a model with another label set (or order) is a new "
            f"lineage, not a fine-tune of {parent.version}. Train it with a full "
            '`faultsense-train` (e.g. `make train ARGS="data=... data.source=..."`).'
        )
    return datamodule


def base_data(
    cfg: DictConfig, meta: Mapping[str, Any], overrides: Sequence[str] = ()
) -> tuple[DictConfig, str]:
    """(`cfg` with the data to fine-tune on, where it came from: "bundle" or "config").

    The bundle's recorded `config.data` (the data the current model was trained on), with
    this run's LOCAL_DATA_KEYS and the `data.*` values of `overrides` on top. This run's
    own data config is kept with `data_from=config`, when `overrides` choose another data
    config (`data=...`), or when the bundle records no data config.
    """
    recorded = (meta.get("config") or {}).get("data")
    keys = _data_override_keys(overrides)
    if cfg.get("data_from", "bundle") == "config" or keys is None or not recorded:
        if not recorded:
            log.warning("The current bundle records no data config: using this run's.")
        return cfg, "config"
    own = OmegaConf.to_container(cfg.data, resolve=False)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data = OmegaConf.create(recorded)
        for key in LOCAL_DATA_KEYS:
            if key in own:  # unresolved: `${.name}` then names the bundle's data
                out.data[key] = own[key]
        for key, delete in keys:
            if delete:
                parent_key, _, leaf = key.rpartition(".")
                node = OmegaConf.select(out.data, parent_key) if parent_key else out.data
                if isinstance(node, DictConfig) and leaf in node:
                    node.pop(leaf)
                continue
            value = OmegaConf.select(cfg.data, key, throw_on_missing=False)
            OmegaConf.update(out.data, key, plain(value), merge=False, force_add=True)
    return out, "bundle"


def _data_override_keys(overrides: Sequence[str]) -> list[tuple[str, bool]] | None:
    """[(key under data, is a deletion)] of the `data.*` overrides; None when one chooses
    another data config (`data=...`)."""
    if not overrides:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        name = override.key_or_group
        if name == "data":
            return None
        if name.startswith("data."):
            keys.append((name[len("data.") :], override.is_delete()))
    return keys


@dataclass
class FineTuned:
    """What `fine_tune` leaves: the best (eval-mode) net, its bundle meta (net_spec, labels,
    sample_rate, clip_samples, training_log), the LightningModule holding that net, the
    checkpoint it came from ('' when none) and the fit's timing (fit_seconds, epochs)."""

    net: torch.nn.Module
    meta: dict[str, Any]
    model: L.LightningModule
    best_ckpt_path: str
    timing: dict[str, float]


def fine_tune(
    cfg: DictConfig,
    parent: Bundle,
    parent_net: torch.nn.Module,
    datamodule: Any,
    status: JobStatus,
    epochs: int,
) -> FineTuned:
    """Train a copy of `parent_net` for `epochs`; returns the best net and what goes with it."""
    from .export import export_checkpoint

    model = _classifier(cfg, parent, datamodule)
    model.net.load_state_dict(parent_net.state_dict())
    loggers, callbacks = loggers_and_callbacks(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_epochs=epochs,
        min_epochs=1,
        callbacks=[*callbacks, _Progress(status)],
        logger=loggers or False,
    )
    status.update(stage="training", max_epochs=epochs)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    timing = {"fit_seconds": time.perf_counter() - started, "epochs": trainer.current_epoch}

    fault_point("export")
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None else ""
    if best:
        net, meta = export_checkpoint(best)
        model.net.load_state_dict(net.state_dict())  # the module now holds the shipped net
    else:
        net, meta = (
            model.net.eval(),
            {
                "net_spec": model.net_spec(),
                "labels": parent.labels,
                "sample_rate": parent.sample_rate,
                "clip_samples": parent.clip_samples,
            },
        )
    meta["training_log"] = curves_log(trainer, cfg.paths.output_dir)
    return FineTuned(net, meta, model, best, timing)


def _classifier(cfg: DictConfig, parent: Bundle, datamodule: Any) -> Any:
    """A FaultClassifier with the parent's architecture and the configured training options
    (learning rate scaled by `lr_scale`)."""
    from .models.classifier import FaultClassifier

    optimizer = dict(plain(cfg.model.get("optimizer")) or {"name": "adamw", "lr": 1e-3})
    optimizer["lr"] = float(optimizer.get("lr", 1e-3)) * float(cfg.get("lr_scale", 1.0))
    spec = parent.meta["net_spec"]
    return FaultClassifier(
        net={k: spec[k] for k in ("frontend", "backbone", "head") if k in spec},
        num_classes=len(parent.labels),
        sample_rate=parent.sample_rate,
        clip_samples=parent.clip_samples,
        labels=parent.labels,
        class_weights=list(datamodule.class_weights) if cfg.get("class_weighted", True) else None,
        optimizer=optimizer,
        scheduler=plain(cfg.model.get("scheduler")),
        augment=plain(cfg.model.get("augment")),
        label_smoothing=float(cfg.model.get("label_smoothing", 0.0)),
    )


def evaluate_both(
    net: torch.nn.Module, parent_net: torch.nn.Module, datamodule: Any
) -> tuple[str, dict[str, SplitScores], dict[str, float]]:
    """(split, the new net's scores per split, current metrics): the new net on val (+ test),
    the current one on the evaluation split only (test; val when the test fold is absent)."""
    num_classes = len(datamodule.labels)
    split = "test" if datamodule.has_test else "val"
    splits = [("val", datamodule.val_dataloader())]
    if datamodule.has_test:
        splits.append(("test", datamodule.test_dataloader()))
    scores = {name: score_split(net, loader, num_classes) for name, loader in splits}
    current = evaluate(parent_net, splits[-1][1], num_classes)
    return split, scores, {f"{split}/{key}": value for key, value in current.items()}


def write_run_summary(
    cfg: DictConfig,
    datamodule: Any,
    tuned: FineTuned,
    scores: Mapping[str, SplitScores],
    version: str,
) -> Path:
    """The run's metrics.json in train.py's shape (its `write_summary`), for the new
    bundle's Insights and drift reference: the registered net's metrics and confusion
    matrices, and its validation confidence histogram (`confidence_histogram.val`)."""
    from .train import TrainResult, write_summary

    path = Path(cfg.paths.output_dir) / "metrics.json"
    result = TrainResult(split_metrics(scores))
    result.best_ckpt_path, result.version = tuned.best_ckpt_path, version
    tuned.model.confusion = {name: s.confusion for name, s in scores.items()}
    confidence = bin_counts(scores["val"].confidences)
    write_summary(path, cfg, result, datamodule, tuned.model, tuned.timing, confidence)
    return path


def _decision_context(cfg: DictConfig, datamodule: Any, split: str, epochs: int) -> dict[str, Any]:
    """What the decision record says about the run besides the gate itself."""
    context: dict[str, Any] = {
        "split": split,
        "epochs": epochs,
        "train_clips": int(sum(datamodule.class_counts.values())),
        "uploads": _upload_counts(cfg),
        "decided_at": utc_now(),
    }
    if split == "val":
        context["note"] = (
            f"test fold {cfg.data.get('test_fold')} is absent: the gate compared the models on "
            f"the val fold {datamodule.val_fold}, which also selected the checkpoint (optimistic)."
        )
    return context


def register(
    registry: Registry,
    net: torch.nn.Module,
    meta: dict[str, Any],
    decision: dict[str, Any],
    datamodule: Any,
    cfg: DictConfig,
) -> str:
    """Register the fine-tuned net with its parent, data and decision; promote it if the
    decision says so. Sets `decision["version"]`; returns the version."""
    promoted = bool(decision["promoted"])
    meta.update(
        metrics=decision["new_metrics"],
        parent_version=decision["parent_version"],
        data_fingerprint=getattr(datamodule, "fingerprint", None),
        mapping=copy.deepcopy(getattr(datamodule, "mapping", None)),
        config=resolved_config(cfg),
        retrain=decision,
    )
    reason = f"retrain: {decision['reason']}"
    version = registry.register(net, meta, promote=promoted, reason=reason)
    decision["version"] = version
    log_bundle_artifact(registry.get(version), promoted=promoted)
    return version


def _upload_counts(cfg: DictConfig) -> dict[str, int]:
    from .data.uploads import UploadStore

    try:
        return UploadStore(cfg.paths.uploads_dir).counts()
    except OSError:
        return {}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="retrain")
def main(cfg: DictConfig) -> None:
    """`faultsense-retrain`: fine-tune, gate and (maybe) promote; prints the decision."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    result = run_cli("faultsense-retrain", retrain, cfg, overrides)
    print(result["decision"]["reason"])


if __name__ == "__main__":
    main()
