"""Training entry point: `faultsense-train [overrides]` (Hydra, configs/train.yaml).

`train(cfg)` is the plain function tests and sweeps call: it seeds, builds the datamodule,
model, callbacks, loggers and trainer from the config, fits (optionally resuming from
`ckpt_path`), re-validates the best checkpoint, tests it when the test fold is present,
optionally registers it, and returns the metrics.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from . import CONFIG_DIR
from .confidence import confidence_histogram
from .config import instantiate, instantiate_all, plain, resolved_config, run_cli
from .errors import ConfigError
from .fileio import write_json_atomic

log = logging.getLogger(__name__)


class TrainResult(dict):
    """Metric name -> float (what sweepers read), plus where the run left its artifacts."""

    best_ckpt_path: str = ""
    version: str | None = None
    output_dir: str = ""


def wandb_logger(offline: bool | None = None, log_model: bool = True, **kwargs: Any):
    """A WandbLogger that never prompts: online only when the user is logged in.

    `offline=None` decides from the environment: WANDB_MODE wins when set; otherwise online
    iff an API key is available (WANDB_API_KEY or a ~/.netrc entry for the wandb host).
    The best checkpoint is uploaded as an artifact only when online.
    """
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        offline = mode in ("offline", "dryrun", "disabled") or (not mode and not _wandb_key())
    return WandbLogger(offline=offline, log_model=bool(log_model and not offline), **kwargs)


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc().authenticators(host or "api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


def finish_wandb_run() -> None:
    """End the W&B run if one was started (every job finishes its run; wandb only if loaded)."""
    if "wandb" in sys.modules:
        import wandb

        wandb.finish()


def loggers_and_callbacks(cfg: DictConfig) -> tuple[list[Any], list[Any]]:
    """The configured loggers plus the run's curves log, and the configured callbacks
    (without progress bars when `trainer.enable_progress_bar=false`: Lightning refuses
    the pair, and the override alone is what a user means)."""
    loggers = with_curves_log(instantiate_all(cfg.get("logger")), cfg.paths.output_dir)
    callbacks = instantiate_all(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return loggers, callbacks


def with_curves_log(loggers: list[Any], output_dir: str | os.PathLike[str]) -> list[Any]:
    """`loggers` plus Lightning's CSVLogger at `<output_dir>/csv` unless one is there: the
    per-epoch metrics in one plain file whatever else logs them (W&B keeps its own run
    files), so Insights can draw every registered model's curves."""
    from lightning.pytorch.loggers import CSVLogger

    if any(isinstance(logger, CSVLogger) for logger in loggers):
        return loggers
    return [*loggers, CSVLogger(save_dir=str(output_dir), name="csv")]


def curves_log(trainer: L.Trainer, output_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Where a fitted run left its curves: `{run_dir, metrics_csv}` (the first CSVLogger's
    file) for the bundle, so Insights finds them without guessing from the config."""
    from lightning.pytorch.loggers import CSVLogger

    record = {"run_dir": str(Path(output_dir).resolve())}
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            record["metrics_csv"] = str((Path(logger.log_dir) / "metrics.csv").resolve())
            break
    return record


def _hydra_job_info() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "overrides": list(hc.overrides.task),
        "choices": {k: v for k, v in hc.runtime.choices.items() if isinstance(v, str)},
    }


def train(cfg: DictConfig) -> TrainResult:
    """Fit the configured model; return {metric name: float} with `.best_ckpt_path`."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule, model = _data_and_model(cfg)
    loggers, callbacks = loggers_and_callbacks(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    result = TrainResult()
    result.output_dir = str(output_dir)
    try:
        for logger in loggers:
            logger.log_hyperparams(plain(cfg))
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        timing = {"fit_seconds": time.perf_counter() - started, "epochs": trainer.current_epoch}
        result.update(metric_floats(trainer.callback_metrics, ("train/", "val/f1_macro_best")))
        result.best_ckpt_path = _best_checkpoint(trainer)
        _validate_best(trainer, model, datamodule, result)
        if cfg.get("test", True):
            _test_best(cfg, trainer, model, datamodule, result)
        if trainer.is_global_zero:
            result.update(recording_scores(model, datamodule, bool(cfg.get("test", True))))
            if cfg.get("register") and result.best_ckpt_path:
                result.version = register_run(
                    result.best_ckpt_path,
                    datamodule,
                    cfg,
                    result,
                    training_log=curves_log(trainer, output_dir),
                )
                log.info("registered %s as %s", result.best_ckpt_path, result.version)
            write_summary(output_dir / "metrics.json", cfg, result, datamodule, model, timing)
    finally:
        finish_wandb_run()
    return result


def _data_and_model(cfg: DictConfig) -> tuple[Any, L.LightningModule]:
    """The prepared datamodule and the configured model, sized to its labels and clips;
    with `embedding_cache` or `distill` set, the datamodule serves what the model trains on
    (faultsense/distill.py: cached embeddings, or clips with a teacher's soft labels)."""
    from .data.datamodule import prepared_datamodule

    # Clips with no fault label only cost time for a model without a category head.
    no_aux = {} if cfg.model.get("aux_weight") else {"aux_clips": False}
    datamodule = prepared_datamodule(cfg.data, **no_aux)
    model = build_model(cfg.model, datamodule, bool(cfg.get("class_weighted", True)))
    if cfg.get("embedding_cache") or cfg.get("distill"):
        from .distill import training_data

        datamodule = training_data(cfg, datamodule, model)
    return datamodule, model


def build_model(model_cfg: Any, datamodule: Any, class_weighted: bool) -> L.LightningModule:
    """A model config instantiated for a prepared datamodule's labels, clips and categories."""
    return instantiate(
        model_cfg,
        num_classes=len(datamodule.labels),
        labels=list(datamodule.labels),
        sample_rate=int(datamodule.sample_rate),
        clip_samples=int(datamodule.clip_samples),
        class_weights=list(datamodule.class_weights) if class_weighted else None,
        num_categories=len(datamodule.categories),
        category_labels=list(datamodule.category_labels),
        _recursive_=False,
    )


def recording_scores(model: Any, datamodule: Any, test: bool) -> dict[str, float]:
    """Val (and test) metrics of each windowed recording scored whole, as serving scores
    it (faultsense/recordings.py); {} when no recording was cut into windows."""
    from .recordings import recording_metrics

    base = getattr(datamodule, "inner", datamodule)  # cached embeddings: the clips behind them
    splits = [("val/", base.val_set)] + ([("test/", base.test_set)] if test else [])
    out: dict[str, float] = {}
    for prefix, split in splits:
        if split is not None:
            out.update(recording_metrics(model.net, model.labels, base.caches, split, prefix))
    return out


def _validate_best(
    trainer: L.Trainer, model: L.LightningModule, datamodule: Any, result: TrainResult
) -> None:
    """Put the best checkpoint's val metrics in `result` (the model one would ship), not
    the last epoch's; the best-so-far is kept as logged during training."""
    best = result.best_ckpt_path
    if not best:
        result.update(metric_floats(trainer.callback_metrics, ("val/",)))
        return
    validated = trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    best_so_far = result.get("val/f1_macro_best")
    result.update(metric_floats(validated[0], ("val/",)))
    if best_so_far is not None:
        result["val/f1_macro_best"] = best_so_far


def _test_best(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: Any,
    result: TrainResult,
) -> None:
    """Test the best checkpoint into `result` when the test fold is present; warn otherwise."""
    if not datamodule.has_test:
        log.warning(
            "test fold %s not present in %s (folds present: %s), skipping test",
            cfg.data.get("test_fold"),
            cfg.data.get("source") or "the dataset",
            list(datamodule.folds_present),
        )
        return
    tested = trainer.test(model, datamodule=datamodule, ckpt_path=result.best_ckpt_path or None)
    result.update(metric_floats(tested[0], ("test/",)))


def register_run(
    ckpt_path: str | os.PathLike[str],
    datamodule: Any,
    cfg: DictConfig,
    metrics: Mapping[str, Any],
    *,
    training_log: Mapping[str, str] | None = None,
) -> str:
    """Register a run's best checkpoint: the config is read here, once, into plain values.
    `training_log` (from `curves_log`) tells the bundle where the run's curves are.

    `paths.registry_dir` is the registry; `promote` (default true: `make train` should
    make the fresh model the one served; the first version always is) and `export.onnx`
    (an ONNX file checked against PyTorch) are the options.
    """
    from .export import TrainingRecord, float_metrics, register_from_training

    record = TrainingRecord(
        metrics=float_metrics(metrics),
        labels=list(datamodule.labels),
        data_fingerprint=getattr(datamodule, "fingerprint", None),
        mapping=plain(getattr(datamodule, "mapping", None)),
        config=resolved_config(cfg),
        training_log=dict(training_log) if training_log else None,
    )
    promote = cfg.get("promote")
    return register_from_training(
        ckpt_path,
        record,
        registry_dir=(cfg.get("paths") or {}).get("registry_dir") or None,
        promote=True if promote is None else bool(promote),
        onnx=bool((cfg.get("export") or {}).get("onnx", False)),
    )


def _best_checkpoint(trainer: L.Trainer) -> str:
    """Best path of the first ModelCheckpoint that monitors a metric ('' if none)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) and callback.best_model_path:
            return str(callback.best_model_path)
    return ""


def metric_floats(metrics: Any, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The scalar entries of `metrics` whose names start with one of `prefixes`, as floats."""
    return {
        str(k): float(v)
        for k, v in dict(metrics).items()
        if str(k).startswith(prefixes) and getattr(v, "numel", lambda: 1)() == 1
    }


def write_summary(
    path: Path,
    cfg: DictConfig,
    result: TrainResult,
    datamodule: Any,
    model: L.LightningModule,
    timing: Mapping[str, float],
    confidence: list[int] | None = None,
) -> None:
    """metrics.json next to the run: what the CV aggregator and humans read.
    `confidence`: the val confidence histogram when the caller has it (else computed)."""
    if confidence is None:
        confidence = confidence_histogram(model, datamodule.val_dataloader())
    train_clips = len(datamodule.train_set)  # aux-only clips included: they cost as much
    fit_seconds, epochs = float(timing["fit_seconds"]), int(timing["epochs"])
    summary = {
        "metrics": dict(result),
        "best_ckpt_path": result.best_ckpt_path,
        "version": result.version,
        "val_fold": cfg.data.get("val_fold"),
        "test_fold": cfg.data.get("test_fold"),
        "seed": cfg.get("seed"),
        "confusion": model.confusion,
        # the drift check's reference for served confidences (serving/monitor.py)
        "confidence_histogram": {"val": confidence},
        "labels": list(datamodule.labels),
        "timing": {
            "fit_seconds": round(fit_seconds, 2),
            "epochs": epochs,
            "train_clips": train_clips,
            "train_clips_per_s": round(train_clips * max(epochs, 1) / max(fit_seconds, 1e-9), 1),
        },
        **_hydra_job_info(),
    }
    write_json_atomic(path, summary)


def _train_for_sweep(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} was not logged; have: {sorted(metrics)}")
    return metrics.get(name) if name else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli("faultsense-train", _train_for_sweep, cfg)


if __name__ == "__main__":
    main()
