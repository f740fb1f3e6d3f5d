"""Evaluation entry point: `faultsense-eval ckpt_path=PATH [data overrides]`.

Loads a training checkpoint (weights only, nothing unpickled), re-runs it on the val fold
(and the test fold when present) and compares with the val metrics stored in the checkpoint.
Pass the same `data.*` overrides the training run used (its `.hydra/config.yaml` has them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from . import CONFIG_DIR
from .config import instantiate, run_cli
from .errors import ConfigError, ModelError
from .train import metric_floats

log = logging.getLogger(__name__)

# Not reproducible by one evaluation: the best-so-far is a max over training epochs.
_NOT_COMPARED = ("val/f1_macro_best",)


def load_checkpoint_metrics(ckpt_path: str | Path) -> dict[str, float]:
    """The val metrics a checkpoint was saved with (loaded with weights_only=True)."""
    try:
        checkpoint = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a ModelError for the user
        raise ModelError(f"Cannot read checkpoint {ckpt_path}: {err}") from None
    return {k: float(v) for k, v in dict(checkpoint.get("metrics") or {}).items()}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Re-run `cfg.ckpt_path` on val (+ test if present); return the reproduced metrics plus
    `stored/<name>` for each metric the checkpoint recorded."""
    from .models.classifier import FaultClassifier

    ckpt = cfg.get("ckpt_path")
    if not ckpt or not Path(str(ckpt)).is_file():
        raise ConfigError(
            f"ckpt_path={ckpt!r} is not a checkpoint file. Pass ckpt_path=PATH, e.g. "
            "logs/train/runs/<run>/checkpoints/last.ckpt"
        )
    L.seed_everything(cfg.get("seed", 42), workers=True)
    stored = load_checkpoint_metrics(ckpt)
    model = FaultClassifier.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    from .data.datamodule import prepared_datamodule

    datamodule = prepared_datamodule(cfg.data)
    if list(datamodule.labels) != model.labels:
        raise ConfigError(
            f"The checkpoint was trained on labels {model.labels}, the data has "
            f"{list(datamodule.labels)}; pass the data.* overrides of the training run."
        )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    metrics = metric_floats(
        trainer.validate(model, datamodule=datamodule, verbose=False)[0], ("val/",)
    )
    if datamodule.has_test:
        metrics.update(metric_floats(trainer.test(model, datamodule=datamodule)[0], ("test/",)))
    else:
        log.warning("test fold %s not present, skipping test", cfg.data.get("test_fold"))
    from .train import recording_scores

    metrics.update(recording_scores(model, datamodule, datamodule.has_test))

    tolerance = float(cfg.get("tolerance", 1e-4))
    for name, value in stored.items():
        metrics[f"stored/{name}"] = value
        if name in _NOT_COMPARED or name not in metrics:
            continue
        diff = abs(metrics[name] - value)
        status = "ok" if diff <= tolerance else "DIFFERS"
        log.info("%-22s stored %.4f  now %.4f  %s", name, value, metrics[name], status)
        if diff > tolerance:
            log.warning(
                "%s differs from the checkpoint's (%.4f vs %.4f): different data.* than the "
                "training run?",
                name,
                metrics[name],
                value,
            )
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli("faultsense-eval", evaluate, cfg)


if __name__ == "__main__":
    main()
