"""`retrain(cfg)`: fine-tunes the current model, registers the result with its parent,
and promotes it only through the gate (or when forced), recording the decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultsense.errors import RegistryError
from faultsense.registry import Registry
from tests.fixtures.data import compose_config
from tests.fixtures.model import train_overrides

# Tolerances that make the gate's outcome certain whatever the scores (F1 is in [0, 1]).
IMPOSSIBLE = -1.01  # new F1 would have to beat the current one by more than 1
CERTAIN = 1.01


def _cfg(root: Path, registry: Path, synthetic_source: Path, data_cache_dir: Path, *extra: str):
    overrides = train_overrides(root, synthetic_source, data_cache_dir) + [
        f"paths.registry_dir={registry}",
        f"paths.uploads_dir={root / 'uploads'}",
        f"job_dir={root / 'job'}",
        "epochs=1",
        *extra,
    ]
    return compose_config("retrain", overrides)


@pytest.mark.timeout(300)
def test_gate_refuses_then_force_promotes_then_pass_promotes(
    trained_registry_copy, tmp_path, synthetic_source, data_cache_dir
):
    from faultsense.retrain import retrain

    registry = Registry(trained_registry_copy)
    assert registry.current_version() == "v1"

    # Refused: registered with its parent, not promoted, and the decision says why.
    refused = retrain(
        _cfg(tmp_path / "a", trained_registry_copy, synthetic_source, data_cache_dir,
             f"tolerance={IMPOSSIBLE}")
    )  # fmt: skip
    assert refused["version"] == "v2" and refused["promoted"] is False
    assert registry.current_version() == "v1"
    decision = refused["decision"]
    assert decision["passed_gate"] is False and decision["forced"] is False
    assert decision["parent_version"] == "v1" and decision["split"] == "test"
    assert "kept v1" in decision["reason"]
    assert set(decision["new_metrics"]) >= {"test/f1_macro", "val/f1_macro"}
    bundle = registry.get("v2")
    assert bundle.meta["parent_version"] == "v1"
    assert bundle.meta["retrain"]["promoted"] is False
    on_disk = json.loads((tmp_path / "a" / "job" / "decision.json").read_text())
    assert on_disk["version"] == "v2" and on_disk["promoted"] is False
    status = json.loads((tmp_path / "a" / "job" / "status.json").read_text())
    assert status["state"] == "succeeded" and status["epoch"] == 1 and status["version"] == "v2"

    # Forced: the same refused gate, promoted anyway, and marked as forced.
    forced = retrain(
        _cfg(tmp_path / "b", trained_registry_copy, synthetic_source, data_cache_dir,
             f"tolerance={IMPOSSIBLE}", "force=true")
    )  # fmt: skip
    assert forced["version"] == "v3" and forced["promoted"] is True
    assert forced["decision"]["forced"] is True and forced["decision"]["passed_gate"] is False
    assert registry.current_version() == "v3"
    assert registry.get("v3").meta["parent_version"] == "v1"

    # Passed: fine-tunes the new current (v3) and promotes without force.
    passed = retrain(
        _cfg(tmp_path / "c", trained_registry_copy, synthetic_source, data_cache_dir,
             f"tolerance={CERTAIN}")
    )  # fmt: skip
    assert passed["promoted"] is True and passed["decision"]["forced"] is False
    assert registry.current_version() == passed["version"] == "v4"
    assert registry.get("v4").meta["parent_version"] == "v3"


def test_retrain_without_a_current_model_fails_clearly(tmp_path, synthetic_source, data_cache_dir):
    from faultsense.retrain import retrain

    empty = tmp_path / "models"
    with pytest.raises(RegistryError, match="No current model"):
        retrain(_cfg(tmp_path, empty, synthetic_source, data_cache_dir))
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["state"] == "failed" and "No current model" in status["error"]
