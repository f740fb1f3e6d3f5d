"""Knowledge distillation: a pretrained teacher's soft labels train a fast student.

`faultsense-train` with a `distill: {teacher, alpha, temperature, teacher_epochs}` section
(configs/experiment/distill.yaml) first trains the teacher, a frozen-encoder model (e.g.
YAMNet + head), on the run's own training split only, from cached embeddings
(models/embeddings.py): seconds. Its logits on every training clip (aux-only clips and
uploads included), taken once on the un-augmented clips, are stored in the run folder
(`teacher_logits.npy`) and ride along each training batch. The student (the model config)
then learns from

    loss = alpha * CE(hard labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al., 2015), plus its usual aux-category loss; with mixup the soft targets are
mixed like the inputs. The teacher never sees the val or test fold, is not selected on
them (its last epoch is used), and is not part of the bundle: the registered model is the
student alone, at the student's serving cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import plain
from .errors import ConfigError
from .fileio import write_json_atomic
from .models.embeddings import BatchRows

log = logging.getLogger(__name__)


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher logits [B, C] -> probabilities softened by `temperature`."""
    return torch.softmax(teacher_logits / float(temperature), dim=1)


def kd_loss(student_logits: torch.Tensor, probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(probs || softmax(student / T)), averaged over the batch (the T^2 keeps the
    soft term's gradients on the hard term's scale as T changes)."""
    t = float(temperature)
    log_student = torch.log_softmax(student_logits / t, dim=1)
    kl = torch.nn.functional.kl_div(log_student, probs, reduction="batchmean")
    return kl * t * t


class SoftLabeled(BatchRows):
    """A batch-reading Dataset (`__getitems__` -> stacked tuple) plus the teacher's logits of
    each of its rows as one more tensor: (x, label, category, teacher logits [B, C])."""

    def __init__(self, base: Any, logits: np.ndarray) -> None:
        if len(base) != len(logits):
            raise ConfigError(f"{len(logits)} teacher logits for {len(base)} training clips.")
        self.base, self.logits = base, np.asarray(logits, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        idx = np.asarray(indices, dtype=np.int64)
        return (*self.base.__getitems__(idx), torch.from_numpy(self.logits[idx]))


def training_data(cfg: Any, datamodule: Any, model: Any) -> Any:
    """The datamodule `faultsense-train` fits `model` on: cached embeddings when
    `embedding_cache` is set (the model then trains on them), soft-labelled training clips
    when `distill` is set, else `datamodule` itself."""
    from .models.embeddings import DerivedDataModule, embedding_datamodule

    if cfg.get("embedding_cache"):
        model.inputs = "embedding"
        return embedding_datamodule(datamodule, model.net, int(datamodule.batch_size))
    if not cfg.get("distill"):
        return datamodule
    if not (model.hparams.get("distill") or {}).get("temperature"):
        raise ConfigError(
            "distill is set but model.distill has no temperature (use experiment=distill)."
        )
    logits = teacher_logits(cfg, datamodule, Path(cfg.paths.output_dir))
    return DerivedDataModule(
        datamodule,
        SoftLabeled(datamodule.train_set, logits),
        datamodule.val_set,
        datamodule.test_set,
        int(datamodule.batch_size),
    )


def teacher_logits(cfg: Any, datamodule: Any, output_dir: Path) -> np.ndarray:
    """Train the teacher (`cfg.distill.teacher`, a model config with a frozen encoder) on the
    training split's cached embeddings for `distill.teacher_epochs`, and return its logits
    [len(train_set), C] on the un-augmented training clips; also written to `output_dir`
    (teacher_logits.npy, and teacher.json with its val metrics, for the record only)."""
    import lightning as L

    from .models.embeddings import embedding_datamodule
    from .train import build_model

    settings = plain(cfg.distill)
    teacher = build_model(cfg.distill.teacher, datamodule, bool(cfg.get("class_weighted", True)))
    teacher.inputs = "embedding"
    data = embedding_datamodule(
        datamodule, teacher.net, int(settings.get("teacher_batch_size", 64))
    )
    trainer = L.Trainer(
        max_epochs=int(settings.get("teacher_epochs", 30)),
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=5.0,
    )
    trainer.fit(teacher, datamodule=data)
    metrics = {
        k: float(v) for k, v in trainer.validate(teacher, datamodule=data, verbose=False)[0].items()
    }
    teacher.eval()
    with torch.no_grad():
        embeddings = data.train_set.__getitems__(np.arange(len(data.train_set)))[0]
        logits = teacher.net.head(embeddings.to(teacher.device)).cpu().numpy()
    output_dir.mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "teacher_logits.npy", logits)
    write_json_atomic(
        output_dir / "teacher.json",
        {"metrics": metrics, "net": teacher.net_spec(), "train_clips": len(logits)},
    )
    log.info("teacher val macro F1 %.3f", metrics.get("val/f1_macro", float("nan")))
    return logits
