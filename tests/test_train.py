"""Training and evaluation: presets compose, a real short run learns, checkpoints are safe
to load, resume continues, eval reproduces the stored metrics, CLIs fail cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from faultsense.errors import ConfigError
from tests.fixtures.data import SYNTH_CLIP_SECONDS, compose_config
from tests.fixtures.model import SMOKE_EPOCHS, compose_train, train_overrides

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.root_dir={tmp_path}"])
    assert cfg.model._target_ == "faultsense.models.classifier.FaultClassifier"
    assert cfg.data._target_ and cfg.trainer._target_
    if cfg.model.net.backbone._target_.endswith("FaultCNN"):
        # CNN presets also build (wav2vec2 needs the hub or a local folder).
        # A head over categories needs the data's categories: four, one per label here.
        by_category = cfg.model.net.head.get("by_category")
        extra = {"category_labels": [0, 1, 2, 3], "num_categories": 4} if by_category else {}
        model = instantiate(cfg.model, _recursive_=False, **extra)
        logits = model(torch.randn(2, int(cfg.data.sample_rate * cfg.data.clip_seconds)))
        assert logits.shape == (2, 4)


def _trainer(cfg: DictConfig) -> tuple:
    t = cfg.trainer
    return t.accelerator, t.devices, t.get("strategy", "auto")


# Each override and what it must change in the composed config (the default is W&B on one
# auto device with the basic launcher, the CNN, no sweeper).
CONFIG_GROUP_EFFECTS = {
    "trainer=cpu": lambda c: _trainer(c) == ("cpu", 1, "auto"),
    "trainer=gpu": lambda c: _trainer(c) == ("gpu", 1, "auto"),
    "trainer=ddp": lambda c: _trainer(c) == ("gpu", "auto", "ddp") and c.trainer.sync_batchnorm,
    "trainer=ddp_cpu": lambda c: _trainer(c) == ("cpu", 2, "ddp") and not c.trainer.sync_batchnorm,
    "logger=csv": lambda c: (
        list(c.logger) == ["csv"] and c.logger.csv._target_.endswith("CSVLogger")
    ),
    "logger=none": lambda c: not c.get("logger"),
    "model=wav2vec2": lambda c: (
        c.model.net.backbone._target_.endswith("Wav2Vec2Backbone")
        and c.model.net.frontend.kind == "waveform"
    ),
    "hparams_search=cnn_optuna": lambda c: (
        c.hydra.sweeper._target_.endswith("OptunaSweeper")
        and c.hydra.sweeper.direction == "maximize"
        and "model.optimizer.lr" in c.hydra.sweeper.params
    ),
    "hydra/launcher=joblib": lambda c: c.hydra.launcher._target_.endswith("JoblibLauncher"),
    "hydra/launcher=submitit_slurm": lambda c: c.hydra.launcher._target_.endswith("SlurmLauncher"),
    "experiment=smoke": lambda c: (
        c.data.name == "synthetic"
        and c.trainer.max_epochs == 3
        and list(c.model.net.backbone.widths) == [8, 16, 32]
        and list(c.logger) == ["csv"]
    ),
}


@pytest.mark.parametrize("override", sorted(CONFIG_GROUP_EFFECTS))
def test_config_groups_compose(override):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        default = compose("train", return_hydra_config=True)
        cfg = compose("train", overrides=[override], return_hydra_config=True)
    assert cfg.optimized_metric == "val/f1_macro_best"
    assert CONFIG_GROUP_EFFECTS[override](cfg), OmegaConf.to_yaml(cfg, resolve=False)[:3000]
    # ... and the default does not already have it (the override is what made it so).
    assert not CONFIG_GROUP_EFFECTS[override](default), override


def test_short_cnn_run_learns_the_synthetic_set(smoke_checkpoint):
    ckpt, metrics, cfg = smoke_checkpoint
    assert all(isinstance(v, float) for v in metrics.values())
    for name in ("train/loss", "val/loss", "val/acc", "val/precision_macro", "val/recall_macro"):
        assert name in metrics
    # 4 balanced classes: chance is 0.25.
    assert metrics["val/f1_macro"] >= 0.7, metrics
    assert metrics["val/f1_macro_best"] >= metrics["val/f1_macro"] - 1e-6
    assert metrics["test/f1_macro"] >= 0.6, metrics  # fold 5 is present in the fixture
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["best_ckpt_path"] == str(ckpt)
    assert summary["metrics"]["val/f1_macro"] == metrics["val/f1_macro"]
    assert sum(map(sum, summary["confusion"]["val"])) == 16  # every val clip counted once


def test_checkpoints_load_with_weights_only(smoke_checkpoint):
    from faultsense.models.classifier import FaultClassifier, build_net

    ckpt, metrics, _ = smoke_checkpoint
    for path in ckpt.parent.glob("*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["labels"] == [
            "mechanical_fault",
            "electrical_fault",
            "fluid_leak",
            "normal",
        ]
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["metrics"]["val/f1_macro"] == pytest.approx(metrics["val/f1_macro"], abs=1e-6)
    model = FaultClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    net = build_net(checkpoint["net_spec"]).eval()
    net.load_state_dict(model.net.state_dict())
    wave = torch.randn(3, int(16_000 * SYNTH_CLIP_SECONDS))
    with torch.no_grad():
        assert torch.allclose(net(wave), model.eval()(wave), atol=1e-6)


def test_eval_reproduces_the_stored_metrics(smoke_checkpoint, tmp_path):
    from faultsense.eval import evaluate

    ckpt, metrics, cfg = smoke_checkpoint
    data = [
        o
        for o in train_overrides(tmp_path, cfg.data.source, cfg.data.cache_dir)
        if o.startswith("data.")
    ]
    eval_cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}",
            "trainer.enable_progress_bar=false",
            *data,
        ],
    )
    result = evaluate(eval_cfg)
    for name in ("val/loss", "val/acc", "val/f1_macro", "val/precision_macro", "val/recall_macro"):
        assert result[name] == pytest.approx(result[f"stored/{name}"], abs=1e-5), name
        assert result[name] == pytest.approx(metrics[name], abs=1e-5), name
    assert result["test/f1_macro"] == pytest.approx(metrics["test/f1_macro"], abs=1e-5)


def test_eval_without_a_checkpoint_is_a_config_error(tmp_path):
    from faultsense.eval import evaluate

    cfg = compose_config(
        "eval", [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"paths.root_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="missing.ckpt"):
        evaluate(cfg)


def test_resume_continues_with_wandb_offline_and_skips_an_absent_test_fold(
    smoke_checkpoint, tmp_path, synthetic_source, data_cache_dir, monkeypatch, caplog
):
    from faultsense.train import train

    ckpt, metrics, _ = smoke_checkpoint
    last = ckpt.parent / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train(
        tmp_path,
        synthetic_source,
        data_cache_dir,
        [
            f"ckpt_path={last}",
            f"trainer.max_epochs={SMOKE_EPOCHS + 2}",
            "logger=wandb",
            "data.test_fold=7",  # not in the data: testing must be skipped, not fail
        ],
    )
    with caplog.at_level("WARNING", logger="faultsense.train"):
        result = train(cfg)
    assert "test fold 7 not present" in caplog.text
    assert not any(k.startswith("test/") for k in result)
    resumed = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert resumed["epoch"] == before["epoch"] + 2
    assert resumed["global_step"] > before["global_step"]
    # The best-so-far survives the resume (it is part of the checkpointed state).
    assert result["val/f1_macro_best"] >= metrics["val/f1_macro_best"] - 1e-6
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    import wandb

    assert wandb.run is None  # every job finishes its run


def test_wandb_is_offline_unless_logged_in(monkeypatch, tmp_path):
    from faultsense.train import wandb_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_logger(save_dir=str(tmp_path))._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    logger = wandb_logger(save_dir=str(tmp_path))
    assert logger._offline is False and logger._log_model is True
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_logger(save_dir=str(tmp_path))._offline is True


def _train_cli(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faultsense.train", "experiment=smoke", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def test_cli_refuses_a_backbone_outside_the_allowlist_by_its_field(synthetic_overrides):
    # Valid data, so the run reaches the model and the allowlist is what refuses.
    out = _train_cli([*synthetic_overrides, "model.net.backbone._target_=os.system"])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "ConfigError" in out.stderr, out.stderr[-3000:]
    assert "model.net.backbone._target_='os.system' is not an allowed backbone" in out.stderr


def test_cli_reports_a_missing_data_source_by_its_field(tmp_path):
    missing = tmp_path / "nowhere"
    out = _train_cli(
        [f"paths.root_dir={tmp_path}", f"data.source={missing}", "data.synthetic=null"]
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"DataError: data.source={missing} does not exist" in out.stderr, out.stderr[-3000:]


def test_turning_the_progress_bar_off_drops_the_progress_bar_callback(tmp_path):
    """`trainer.enable_progress_bar=false` alone is enough: Lightning refuses a progress-bar
    callback with the bar off, so training must not hand it one."""
    from lightning.pytorch.callbacks import ProgressBar

    from faultsense.train import loggers_and_callbacks

    base = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", "logger=none"]
    _, callbacks = loggers_and_callbacks(compose_config("train", base))
    assert any(isinstance(c, ProgressBar) for c in callbacks)  # the default has one
    off = compose_config("train", [*base, "trainer.enable_progress_bar=false"])
    _, callbacks = loggers_and_callbacks(off)
    assert callbacks and not any(isinstance(c, ProgressBar) for c in callbacks)
