"""FaultClassifier, the LightningModule that trains a FaultNet (`models/net.py`).

`FaultClassifier` wires loss, waveform augmentation, mixup, metrics and the
optimizer around it; its hparams are primitives only, so checkpoints load with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from ..config import plain
from ..errors import ConfigError
from ..figures import confusion_figure, rgba_image
from ..taxonomy import LABELS
from .frontend import WaveAugment, mixup
from .net import BACKBONES, CategoryHead, FaultNet, Head, build_net  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def _labels_and_classes(labels: Any, num_classes: int | None) -> tuple[list[str], int]:
    """(labels, num_classes) of a model: the labels given (num_classes defaults to their
    count), else the ESC-50 mapping's default labels, which only fit a 4-class model.
    ConfigError when they disagree."""
    labels = [str(x) for x in plain(labels) or []]
    if not labels:
        if num_classes not in (None, len(LABELS)):
            raise ConfigError(
                f"num_classes={num_classes} needs its labels (the default ones are the "
                f"{len(LABELS)} of the ESC-50 mapping): pass labels=[...]."
            )
        labels = list(LABELS)
    num_classes = len(labels) if num_classes is None else int(num_classes)
    if len(labels) != num_classes:
        raise ConfigError(f"{len(labels)} labels given for num_classes={num_classes}.")
    return labels, num_classes


def _category_head(
    net: dict[str, Any], category_labels: list[int] | None, labels: list[str]
) -> dict[str, Any]:
    """`net` with `head.by_category` turned into the head's `category_labels` (a spec that
    rebuilds without the data), or dropped when false. "auto": the category head when
    every label has source categories (ESC-50), else the plain head (your own labels)."""
    head = dict(net.get("head") or {})
    mode = head.pop("by_category", False)
    if not mode:
        return {**net, "head": head}
    covered = {i for i in category_labels or [] if i >= 0}
    missing = [label for i, label in enumerate(labels) if i not in covered]
    if missing and mode == "auto":
        log.info("head.by_category=auto: no source categories for %s; plain head.", missing)
        return {**net, "head": head}
    if missing:
        raise ConfigError(
            "model.net.head.by_category=true needs source categories (e.g. ESC-50's) for every "
            f"label; none for: {', '.join(missing)}. Set model.net.head.by_category=false."
        )
    return {**net, "head": {**head, "category_labels": [int(i) for i in category_labels or []]}}


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "precision_macro": MulticlassPrecision(num_classes, average="macro"),
            "recall_macro": MulticlassRecall(num_classes, average="macro"),
        },
        prefix=prefix,
    )


class _KeepLength:
    """Mixin for LR schedulers: on resume keep this run's schedule length (a run resumed
    with a larger max_epochs continues along the longer schedule instead of failing)."""

    _length_keys: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keep = {k: self.__dict__[k] for k in self._length_keys}
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self.__dict__.update(keep)


class OneCycleLR(_KeepLength, torch.optim.lr_scheduler.OneCycleLR):
    _length_keys = ("total_steps", "_schedule_phases")


class CosineAnnealingLR(_KeepLength, torch.optim.lr_scheduler.CosineAnnealingLR):
    _length_keys = ("T_max",)


class FaultClassifier(L.LightningModule):
    """Trains a FaultNet: class-weighted cross-entropy (optional label smoothing), waveform
    augmentation + mixup on the batch (training only), torchmetrics on val/test.

    Batches are `(waves [B, T] float32, labels [B] int64, categories [B] int64)`; a label
    or category of -1 is ignored by its loss. With `aux_weight > 0` and `num_categories`,
    a training-only auxiliary head on the same embedding also learns the ESC-50 category:
    each fault label lumps several unrelated sounds together, and the finer target gives
    the small dataset more to learn from. The aux head is not part of the FaultNet, so
    bundles and serving never see it.

    All constructor arguments are plain values (Hydra configs are converted), and are what
    the checkpoint stores.
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        num_classes: int | None = None,
        sample_rate: int = 16_000,
        clip_samples: int = 80_000,
        labels: list[str] | None = None,
        class_weights: list[float] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        num_categories: int = 0,
        aux_weight: float = 0.0,
        distill: Mapping[str, Any] | None = None,
        category_labels: list[int] | None = None,
    ) -> None:
        super().__init__()
        labels, num_classes = _labels_and_classes(labels, num_classes)
        net = _category_head(plain(net), category_labels, labels)
        self.net = build_net(
            {
                **net,
                "num_classes": num_classes,
                "sample_rate": sample_rate,
                "clip_samples": clip_samples,
            }
        )
        augment = dict(plain(augment) or {})
        self.mixup_alpha = float(augment.pop("mixup_alpha", 0.0))
        self.mixup_p = float(augment.pop("mixup_p", 0.0))
        self.wave_augment = WaveAugment(sample_rate=sample_rate, **augment)
        hp = {
            # the resolved spec (for wav2vec2 it carries the encoder config: no hub on reload)
            "net": {k: self.net.spec[k] for k in ("frontend", "backbone", "head")},
            "num_classes": int(num_classes),
            "sample_rate": int(sample_rate),
            "clip_samples": int(clip_samples),
            "labels": labels,
            "class_weights": [float(w) for w in class_weights] if class_weights else None,
            "optimizer": dict(plain(optimizer) or {"name": "adamw", "lr": 1e-3}),
            "scheduler": dict(plain(scheduler) or {"name": "none"}),
            "augment": {
                **augment,
                "mixup_alpha": self.mixup_alpha,
                "mixup_p": self.mixup_p,
            },
            "label_smoothing": float(label_smoothing),
            "num_categories": int(num_categories),
            "aux_weight": float(aux_weight),
            # Knowledge distillation: {alpha, temperature} (faultsense/distill.py); training
            # batches then carry the teacher's logits as a fourth tensor.
            "distill": {k: float(v) for k, v in (plain(distill) or {}).items()} or None,
        }
        self.save_hyperparameters(hp)
        # "wave" batches, or "embedding" batches of a frozen encoder's cached output
        # (models/embeddings.py): set by the trainer's caller, never saved (serving = waves).
        self.inputs = "wave"
        self.aux_head: Head | None = None
        if aux_weight > 0 and num_categories > 1 and not isinstance(self.net.head, CategoryHead):
            head_spec = dict(self.net.spec.get("head") or {})
            self.aux_head = Head(
                self.net.backbone.out_dim,
                int(num_categories),
                dropout=head_spec.get("dropout", 0.2),
            )
        weights = torch.tensor(hp["class_weights"]) if hp["class_weights"] else None
        self.register_buffer("class_weights", weights, persistent=False)

        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_metrics = _metrics(num_classes, "val/")
        self.test_metrics = _metrics(num_classes, "test/")
        self.val_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.val_f1_best = MaxMetric()
        self.val_f1_best.persistent(True)  # resume keeps the best-so-far
        self.confusion: dict[str, list[list[int]]] = {}

    # --- what the registry and serving need -------------------------------------------
    def net_spec(self) -> dict[str, Any]:
        """The plain dict `build_net` turns back into this model's FaultNet."""
        return dict(self.net.spec)

    @property
    def labels(self) -> list[str]:
        return list(self.hparams["labels"])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net(wave)

    # --- steps --------------------------------------------------------------------------
    def _loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy over the targets that are not -1 (0 when there are none)."""
        known = target >= 0
        if not bool(known.any()):
            return logits.sum() * 0.0  # keeps the graph (DDP) without a NaN mean
        return nn.functional.cross_entropy(
            logits[known],
            target[known],
            weight=weight,
            label_smoothing=self.hparams["label_smoothing"],
        )

    def _embedding_loss(
        self, embedding: torch.Tensor, targets: torch.Tensor, hard_weight: float = 1.0
    ) -> torch.Tensor:
        """hard_weight x fault loss + aux_weight x category loss, targets [B, 2] = (label,
        category)."""
        loss = hard_weight * self._loss(self.net.head(embedding), targets[:, 0], self.class_weights)
        head = self.net.head
        scorer = head.category_logits if isinstance(head, CategoryHead) else self.aux_head
        if scorer is not None and self.hparams["aux_weight"] > 0:
            aux = self._loss(scorer(embedding), targets[:, 1])
            loss = loss + self.hparams["aux_weight"] * aux
        return loss

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """A batch's embedding: the net's on waves, the batch itself on cached embeddings."""
        return x if self.inputs == "embedding" else self.net.embed(x)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of what this model's loaders yield: waves, or cached embeddings."""
        return self.net.head(self._embed(x))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int):
        x, target, category, *teacher = batch
        targets = torch.stack([target, category], dim=1)
        if self.inputs != "embedding":  # cached embeddings: mixup is their only augmentation
            x = self.wave_augment(x)
        perm, lam = None, 1.0
        if self.mixup_alpha > 0 and torch.rand(()) < self.mixup_p:
            # one mixing draw for hard targets, categories and soft targets alike
            x, _, perm, lam = mixup(x, torch.arange(len(x), device=x.device), self.mixup_alpha)
        embedding = self._embed(x)
        kd = self.hparams["distill"] if teacher else None
        hard = float(kd["alpha"]) if kd else 1.0
        loss = lam * self._embedding_loss(embedding, targets, hard)
        if perm is not None:
            loss = loss + (1 - lam) * self._embedding_loss(embedding, targets[perm], hard)
        if kd:
            from ..distill import kd_loss, soft_targets

            probs = soft_targets(teacher[0], kd["temperature"])
            if perm is not None:
                probs = lam * probs + (1 - lam) * probs[perm]
            kd_term = kd_loss(self.net.head(embedding), probs, kd["temperature"])
            loss = loss + (1 - float(kd["alpha"])) * kd_term
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> None:
        x, target, *_ = batch
        logits = self.eval_logits(x)
        loss_metric = self.val_loss if stage == "val" else self.test_loss
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        confmat = self.val_confmat if stage == "val" else self.test_confmat
        loss_metric(self._loss(logits, target, self.class_weights), weight=target.numel())
        preds = logits.argmax(dim=1)
        metrics.update(preds, target)
        confmat.update(preds, target)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        f1 = self.val_metrics["f1_macro"].compute()
        if not self.trainer.sanity_checking:
            self.val_f1_best(f1)
        best = self.val_f1_best.compute() if self.val_f1_best.update_count else f1
        self.log("val/f1_macro_best", best, sync_dist=True, prog_bar=True)
        self._confusion("val", self.val_confmat)

    def on_test_epoch_end(self) -> None:
        self._confusion("test", self.test_confmat)

    def _confusion(self, stage: str, confmat: MulticlassConfusionMatrix) -> None:
        matrix = confmat.compute().tolist()  # synced across ranks by torchmetrics
        confmat.reset()
        self.confusion[stage] = matrix
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                fig = confusion_figure(matrix, self.labels, f"{stage} epoch {self.current_epoch}")
                logger.log_image(key=f"{stage}/confusion_matrix", images=[rgba_image(fig)])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Each checkpoint carries the val metrics it was saved with (eval reproduces them)
        # and the plain spec + labels the registry exports; all primitives.
        checkpoint["metrics"] = {
            k: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if k.startswith("val/") and torch.as_tensor(v).numel() == 1
        }
        checkpoint["net_spec"] = self.net_spec()
        checkpoint["labels"] = self.labels

    # --- optimization -------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg = dict(self.hparams["optimizer"])
        name = opt_cfg.pop("name", "adamw").lower()
        lr = float(opt_cfg.pop("lr", 1e-3))
        weight_decay = float(opt_cfg.pop("weight_decay", 0.0))
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        # No weight decay on norms and biases: decaying them only hurts small nets.
        groups = [
            {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
        if name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr, **opt_cfg)
        elif name == "adam":
            optimizer = torch.optim.Adam(groups, lr=lr, **opt_cfg)
        elif name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, **{"momentum": 0.9, **opt_cfg})
        else:
            raise ConfigError(f"model.optimizer.name={name!r}: choose adamw, adam or sgd.")

        sched_cfg = dict(self.hparams["scheduler"])
        kind = sched_cfg.pop("name", "none").lower()
        if kind == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if kind == "onecycle":
            scheduler = OneCycleLR(optimizer, max_lr=lr, total_steps=total, **sched_cfg)
        elif kind == "cosine":
            warmup = int(float(sched_cfg.pop("warmup_fraction", 0.05)) * total)
            cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), **sched_cfg)
            if warmup:
                ramp = torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, warmup)
                scheduler = torch.optim.lr_scheduler.SequentialLR(
                    optimizer, [ramp, cosine], milestones=[warmup]
                )
            else:
                scheduler = cosine
        else:
            raise ConfigError(f"model.scheduler.name={kind!r}: choose onecycle, cosine or none.")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
