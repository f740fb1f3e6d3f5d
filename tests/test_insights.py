"""Insights draws the training curves of a model whatever logger trained it: every run
keeps a CSV curves log beside its chosen logger, and the bundle records where it is."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from faultsense.registry import Registry
from tests.fixtures.model import compose_train
from tests.fixtures.server import start_server

EPOCHS = 2


@pytest.fixture(scope="module")
def registry_of_two_loggers(tmp_path_factory, synthetic_source, data_cache_dir):
    """A registry with one model trained with `logger=wandb` (offline) and one with
    `logger=none`, registered the way `make train` does it."""
    from faultsense.train import train

    root = tmp_path_factory.mktemp("loggers")
    registry = root / "models"
    versions: dict[str, str] = {}
    runs: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        for logger in ("wandb", "none"):
            cfg = compose_train(
                root / logger,
                synthetic_source,
                data_cache_dir,
                [
                    f"logger={logger}",
                    "register=true",
                    f"paths.registry_dir={registry}",
                    f"trainer.max_epochs={EPOCHS}",
                ],
            )
            result = train(cfg)
            versions[logger], runs[logger] = result.version, Path(cfg.paths.output_dir)
    return registry, versions, runs


def test_every_logger_leaves_a_curves_log_the_bundle_points_to(registry_of_two_loggers):
    registry, versions, runs = registry_of_two_loggers
    # W&B still gets its run; the curves log sits beside it.
    assert len(list((runs["wandb"] / "wandb").glob("offline-run-*"))) == 1
    assert not (runs["none"] / "wandb").exists()
    for logger, version in versions.items():
        log = Registry(registry).get(version).meta["training_log"]
        assert log["run_dir"] == str(runs[logger].resolve())
        assert Path(log["metrics_csv"]).is_file()
        assert Path(log["metrics_csv"]).is_relative_to(runs[logger])


def test_insights_serve_curves_for_a_wandb_and_a_loggerless_model(
    registry_of_two_loggers, tmp_path
):
    registry, versions, _ = registry_of_two_loggers
    with start_server(tmp_path / "server", registry) as server:
        for logger, version in versions.items():
            Registry(server.registry_dir).promote(version, reason=f"insights of {logger}")
            report = httpx.get(f"{server.url}/insights", timeout=30).json()
            assert report["version"] == version
            assert "curves" not in report["missing"], report["missing"]
            curves = report["curves"]
            assert {"train/loss", "val/loss", "val/acc", "val/f1_macro"} <= set(curves)
            for name in ("val/loss", "val/f1_macro"):
                # one point per epoch, epochs 0..EPOCHS-1
                assert [e for e, _ in curves[name]] == [float(e) for e in range(EPOCHS)], name
