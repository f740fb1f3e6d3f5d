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
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from . import CONFIG_DIR
from .errors import ConfigError, FaultSenseError
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


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a FaultSenseError raised inside comes out as itself
    (Hydra wraps it in InstantiationException), so CLIs print it cleanly."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, FaultSenseError):
            raise err.__cause__ from None
        raise


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


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

    from .data.datamodule import prepared_datamodule

    # Clips with no fault label only cost time for a model without a category head.
    no_aux = {} if cfg.model.get("aux_weight") else {"aux_clips": False}
    datamodule = prepared_datamodule(cfg.data, **no_aux)
    class_weights = list(datamodule.class_weights) if cfg.get("class_weighted", True) else None
    model = instantiate(
        cfg.model,
        num_classes=len(datamodule.labels),
        labels=list(datamodule.labels),
        sample_rate=int(datamodule.sample_rate),
        clip_samples=int(datamodule.clip_samples),
        class_weights=class_weights,
        num_categories=len(datamodule.categories),
        _recursive_=False,
    )
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    result = TrainResult()
    result.output_dir = str(output_dir)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_seconds = time.perf_counter() - started
        epochs = int(trainer.current_epoch)
        result.update(_floats(trainer.callback_metrics, ("train/", "val/f1_macro_best")))

        best = _best_checkpoint(trainer)
        result.best_ckpt_path = str(best)
        # The reported val metrics are the best checkpoint's (the model one would ship),
        # not the last epoch's.
        if best:
            validated = trainer.validate(
                model, datamodule=datamodule, ckpt_path=best, verbose=False
            )
            best_so_far = result.get("val/f1_macro_best")
            result.update(_floats(validated[0], ("val/",)))
            if best_so_far is not None:
                result["val/f1_macro_best"] = best_so_far
        else:
            result.update(_floats(trainer.callback_metrics, ("val/",)))

        if cfg.get("test", True):
            if datamodule.has_test:
                tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
                result.update(_floats(tested[0], ("test/",)))
            else:
                log.warning(
                    "test fold %s not present in %s (folds present: %s), skipping test",
                    cfg.data.get("test_fold"),
                    cfg.data.get("source") or "the dataset",
                    list(datamodule.folds_present),
                )

        if trainer.is_global_zero:
            if cfg.get("register") and best:
                from .registry import register_from_training

                result.version = register_from_training(
                    ckpt_path=best, datamodule=datamodule, cfg=cfg, metrics=dict(result)
                )
                log.info("registered %s as %s", best, result.version)
            _write_summary(
                output_dir / "metrics.json", cfg, result, datamodule, model, fit_seconds, epochs
            )
    finally:
        if "wandb" in sys.modules:
            import wandb

            wandb.finish()
    return result


def _best_checkpoint(trainer: L.Trainer) -> str:
    """Best path of the first ModelCheckpoint that monitors a metric ('' if none)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) and callback.best_model_path:
            return str(callback.best_model_path)
    return ""


def _floats(metrics: Any, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in dict(metrics).items()
        if str(k).startswith(prefixes) and getattr(v, "numel", lambda: 1)() == 1
    }


def _write_summary(path, cfg, result, datamodule, model, fit_seconds, epochs) -> None:
    """metrics.json next to the run: what the CV aggregator and humans read."""
    train_clips = len(datamodule.train_set)  # aux-only clips included: they cost as much
    summary = {
        "metrics": dict(result),
        "best_ckpt_path": result.best_ckpt_path,
        "version": result.version,
        "val_fold": cfg.data.get("val_fold"),
        "test_fold": cfg.data.get("test_fold"),
        "seed": cfg.get("seed"),
        "confusion": model.confusion,
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


def run_cli(fn, cfg: DictConfig) -> Any:
    """Run an entry point's body: a FaultSenseError prints its message and exits 2, no traceback."""
    try:
        return fn(cfg)
    except FaultSenseError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _train_for_sweep(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} was not logged; have: {sorted(metrics)}")
    return metrics.get(name) if name else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli(_train_for_sweep, cfg)


if __name__ == "__main__":
    main()
