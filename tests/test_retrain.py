"""`retrain(cfg)`: fine-tunes the current model, registers the result with its parent,
and promotes it only through the gate (or when forced), recording the decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultsense.errors import RegistryError
from faultsense.registry import Registry
from faultsense.retrain import gate
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
    # The current model is measured now on the same split it was scored on when it was
    # registered: the same clips, the same model, the same number.
    parent = registry.get("v1").metrics
    assert decision["current_metrics"]["test/f1_macro"] == pytest.approx(
        parent["test/f1_macro"], abs=1e-6
    )
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
    stored_v3 = registry.get("v3").metrics["test/f1_macro"]
    assert passed["decision"]["current_metrics"]["test/f1_macro"] == pytest.approx(
        stored_v3, abs=1e-6
    )


def test_retrain_without_a_current_model_fails_clearly(tmp_path, synthetic_source, data_cache_dir):
    from faultsense.retrain import retrain

    empty = tmp_path / "models"
    with pytest.raises(RegistryError, match="No current model"):
        retrain(_cfg(tmp_path, empty, synthetic_source, data_cache_dir))
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["state"] == "failed" and "No current model" in status["error"]


# -- the gate: a pure function of the two models' metrics ----------------------------------

METRIC = "test/f1_macro"


def _gate(new: float | None, current: float | None, **options):
    options = {"metric": METRIC, "parent_version": "v1", "current_version": "v1", **options}
    new_metrics = {} if new is None else {METRIC: new, "val/f1_macro": 0.5}
    current_metrics = {} if current is None else {METRIC: current}
    return gate(new_metrics, current_metrics, **options)


def test_gate_promotes_a_better_model():
    decision = _gate(0.80, 0.70)
    assert decision["promoted"] is True and decision["passed_gate"] is True
    assert decision["forced"] is False
    assert decision["reason"] == f"{METRIC} 0.8000 >= 0.7000 - 0: promoted"
    assert decision["gate_metric"] == METRIC and decision["parent_version"] == "v1"
    assert decision["new_metrics"] == {METRIC: 0.80, "val/f1_macro": 0.5}
    assert decision["current_metrics"] == {METRIC: 0.70}


def test_gate_refuses_a_worse_model_beyond_the_tolerance():
    decision = _gate(0.60, 0.70, tolerance=0.05)
    assert decision["promoted"] is False and decision["passed_gate"] is False
    assert decision["forced"] is False
    assert decision["reason"] == f"{METRIC} 0.6000 < 0.7000 - 0.05: kept v1"
    # Within the tolerance a slightly worse model still passes.
    assert _gate(0.66, 0.70, tolerance=0.05)["promoted"] is True


def test_gate_with_zero_tolerance_promotes_an_equal_model_and_refuses_a_hair_worse():
    assert _gate(0.75, 0.75, tolerance=0.0)["promoted"] is True
    assert _gate(0.75 - 1e-9, 0.75, tolerance=0.0)["promoted"] is False


@pytest.mark.parametrize(("new", "current", "side"), [(None, 0.7, "new"), (0.8, None, "current")])
def test_gate_refuses_when_the_metric_is_missing(new, current, side):
    decision = _gate(new, current)
    assert decision["promoted"] is False and decision["passed_gate"] is False
    assert f"{METRIC} is missing from the {side} model's metrics: kept v1" == decision["reason"]
    forced = _gate(new, current, force=True)
    assert forced["promoted"] is True and forced["forced"] is True


def test_gate_force_promotes_a_refused_model_and_says_so():
    decision = _gate(0.50, 0.70, force=True)
    assert decision["promoted"] is True and decision["forced"] is True
    assert decision["passed_gate"] is False
    assert decision["reason"].endswith(": promoted anyway (force)")
    # Forcing a model that passes anyway is not recorded as forced.
    passing = _gate(0.80, 0.70, force=True)
    assert passing["promoted"] is True and passing["forced"] is False


def test_gate_does_not_promote_over_a_promotion_made_while_retraining_ran():
    decision = _gate(0.90, 0.70, current_version="v3")
    assert decision["passed_gate"] is True and decision["promoted"] is False
    assert decision["reason"] == (
        "not promoted: the current model changed from v1 to v3 while retraining ran"
    )
    assert _gate(0.90, 0.70, current_version="v3", force=True)["promoted"] is True


def test_gate_is_pure():
    new, current = {METRIC: 0.8}, {METRIC: 0.7}
    first = gate(new, current, metric=METRIC, parent_version="v1", current_version="v1")
    first["new_metrics"][METRIC] = 0.0
    assert new == {METRIC: 0.8} and current == {METRIC: 0.7}  # inputs untouched, copies out
    again = gate(new, current, metric=METRIC, parent_version="v1", current_version="v1")
    assert again["promoted"] is True
