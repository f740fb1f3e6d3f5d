"""Knowledge distillation (faultsense/distill.py): the KD loss is Hinton's formula, the
student's training loss is alpha * CE + (1 - alpha) * KD, and `experiment=distill` trains a
teacher on the training split and the student on its stored soft labels."""

from __future__ import annotations

import json

import numpy as np
import torch

from faultsense.distill import kd_loss, soft_targets
from faultsense.models.classifier import FaultClassifier
from tests.fixtures.data import compose_config
from tests.test_embeddings import experiment_overrides


def test_kd_loss_is_t_squared_times_the_kl_divergence_of_the_softened_outputs():
    torch.manual_seed(0)
    student, teacher, t = torch.randn(5, 4), torch.randn(5, 4), 3.0
    p = torch.softmax(teacher / t, dim=1)
    q = torch.softmax(student / t, dim=1)
    expected = t * t * (p * (p.log() - q.log())).sum(dim=1).mean()
    torch.testing.assert_close(kd_loss(student, soft_targets(teacher, t), t), expected)
    assert float(kd_loss(teacher, soft_targets(teacher, t), t)) < 1e-6  # equal outputs: 0


def tiny_student(alpha: float, temperature: float) -> FaultClassifier:
    net = {
        "frontend": {"kind": "logmel", "n_mels": 16, "hop_ms": 32},
        "backbone": {"_target_": "faultsense.models.cnn.FaultCNN", "widths": [4, 8]},
        "head": {"dropout": 0.0},
    }
    quiet = {"gain_db": 0.0, "shift": 0.0, "noise_p": 0.0}
    return FaultClassifier(
        net,
        sample_rate=16_000,
        clip_samples=8_000,
        augment=quiet,
        label_smoothing=0.1,
        distill={"alpha": alpha, "temperature": temperature},
    )


def test_the_student_loss_mixes_hard_labels_and_soft_targets_by_alpha():
    torch.manual_seed(0)
    student = tiny_student(alpha=0.3, temperature=2.0).eval()  # eval: no dropout / SpecAugment
    waves, labels = torch.randn(6, 8_000) * 0.1, torch.tensor([0, 1, 2, 3, 0, 1])
    teacher = torch.randn(6, 4) * 3
    batch = (waves, labels, torch.full((6,), -1), teacher)
    loss = student.training_step(batch, 0)
    with torch.no_grad():
        logits = student(waves)
    hard = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    soft = kd_loss(logits, soft_targets(teacher, 2.0), 2.0)
    torch.testing.assert_close(loss.detach(), 0.3 * hard + 0.7 * soft)
    # without teacher logits in the batch the same model trains on the hard labels alone
    torch.testing.assert_close(student.training_step(batch[:3], 0).detach(), hard)


def test_distill_experiment_trains_a_teacher_then_the_student_on_its_soft_labels(
    tmp_path, synthetic_source, data_cache_dir
):
    from faultsense.train import train

    extra = [
        "distill.teacher.net.backbone.weights=null",  # a random frozen teacher: mechanics only
        "distill.teacher_epochs=2",
    ]
    overrides = experiment_overrides(
        tmp_path, synthetic_source, data_cache_dir, "[smoke,distill]", 2, extra
    )
    cfg = compose_config("train", overrides)
    assert cfg.model.net.backbone.widths == [8, 16, 32]  # the smoke student, distilled
    result = train(cfg)
    logits = np.load(tmp_path / "run" / "teacher_logits.npy")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert logits.shape == (summary["timing"]["train_clips"], 4)  # every training clip
    assert sum(summary["confidence_histogram"]["val"]) > 0  # scored on the val clips
    assert np.isfinite(logits).all() and logits.std() > 0
    teacher = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert teacher["net"]["backbone"]["_target_"].endswith("YamnetBackbone")
    assert np.isfinite(result["train/loss"])
