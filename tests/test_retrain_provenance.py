"""Retraining uses the data the current model was trained on (issue 14): the retrain job
takes the base data config (kind, source, labels, mapping, folds) from the current
bundle unless the operator overrides it, and refuses a model whose labels are not what
that data yields (another lineage: a full `faultsense-train`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from faultsense.errors import ModelError
from faultsense.registry import Registry
from tests.fixtures.data import compose_config
from tests.fixtures.model import train_overrides
from tests.fixtures.server import start_server
from tests.test_labels import register_with_labels

RETRAIN_TIMEOUT_S = 300


def train_on(source: Path, root: Path, data_cache_dir: Path) -> Path:
    """`make train ARGS="data.source=<source>"` in miniature: one epoch of the smoke
    experiment on `source` (never regenerated), registered under root/models."""
    from faultsense.train import train

    overrides = train_overrides(root, source, data_cache_dir, epochs=1)
    train(compose_config("train", [*overrides, "register=true"]))
    registry = root / "models"
    assert Registry(registry).current_version() == "v1"
    return registry


def wait_for_job(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + RETRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/retrain/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(1.0)
    pytest.fail(f"retrain job {job_id} did not finish in {RETRAIN_TIMEOUT_S} s")


@pytest.mark.timeout(600)
def test_retrain_without_overrides_uses_the_bundles_local_data(
    tmp_path, synthetic_source, data_cache_dir
):
    # A local copy (its path is not the default one), read as it is: nothing regenerates
    # it and nothing may download ESC-50 (the defaults' data source).
    local = shutil.copytree(synthetic_source, tmp_path / "my-recordings")
    registry = train_on(local, tmp_path / "train", data_cache_dir)

    with (
        start_server(tmp_path / "server", registry, retrain_overrides=()) as server,
        httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as client,
    ):
        started = client.post("/retrain", json={"epochs": 1, "force": True})
        assert started.status_code == 202, started.text
        job = wait_for_job(client, started.json()["job_id"])
        assert job["state"] == "succeeded", f"{job.get('error')}\n" + "\n".join(job["log_tail"])
        assert client.get("/status").json()["model"]["version"] == "v2"

    decision = job["decision"]
    assert decision["data"] == {"from": "bundle", "kind": "synthetic", "source": str(local)}
    # The gate compared both models on the model's own held-out split (test fold 5).
    assert decision["split"] == "test" and "test/f1_macro" in decision["current_metrics"]
    # The new bundle records the data it was fine-tuned on, so the next retrain does too.
    v2 = Registry(server.registry_dir).get("v2")
    assert v2.meta["config"]["data"]["source"] == str(local)
    assert v2.meta["parent_version"] == "v1"


def test_a_model_with_another_label_set_is_not_fine_tuned(
    trained_registry_copy, tmp_path, synthetic_source, data_cache_dir
):
    from faultsense.retrain import retrain

    version = register_with_labels(trained_registry_copy, ["bearing_wear", "cavitation", "idle"])
    Registry(trained_registry_copy).promote(version, "test")
    cfg = compose_config(
        "retrain",
        train_overrides(tmp_path, synthetic_source, data_cache_dir)
        + [
            f"paths.registry_dir={trained_registry_copy}",
            f"job_dir={tmp_path / 'job'}",
            "epochs=1",
        ],
    )
    with pytest.raises(ModelError, match="new lineage") as err:
        retrain(cfg)
    assert "faultsense-train" in str(err.value) and "bearing_wear" in str(err.value)
    assert Registry(trained_registry_copy).versions() == ["v1", version]  # nothing registered


def test_the_operators_data_overrides_win_over_the_bundle(tmp_path):
    """`base_data`: the bundle's data, this run's local keys, explicit data.* on top."""
    from faultsense.retrain import base_data

    cfg = compose_config("retrain", [f"paths.root_dir={tmp_path}", "data.batch_size=3"])
    recorded = {
        "_target_": "faultsense.data.datamodule.FaultDataModule",
        "kind": "synthetic", "name": "mine", "source": "/data/mine", "val_fold": 2,
        "test_fold": 3, "cache_dir": "/elsewhere/cache", "batch_size": 64,
        "mapping": {"unmapped": "drop", "classes": {"idle": ["dog"], "run": ["engine"]}},
    }  # fmt: skip
    meta = {"config": {"data": recorded}}

    data, origin = base_data(cfg, meta)
    assert origin == "bundle"
    assert (data.data.kind, data.data.source, data.data.val_fold) == ("synthetic", "/data/mine", 2)
    assert data.data.mapping.classes.idle == ["dog"]
    # Where this machine keeps things and how it batches are this run's.
    assert data.data.cache_dir == cfg.data.cache_dir and data.data.batch_size == 3
    assert data.data.manifest_path.endswith("manifests/mine.csv")

    overrides = ["data.source=/data/new", "data.test_fold=4", "~data.mapping.classes.run"]
    cfg2 = compose_config(
        "retrain", [f"paths.root_dir={tmp_path}", "data.source=/data/new", "data.test_fold=4"]
    )
    data, origin = base_data(cfg2, meta, overrides)
    assert (data.data.source, data.data.test_fold, data.data.val_fold) == ("/data/new", 4, 2)
    assert list(data.data.mapping.classes) == ["idle"]

    # Another data config chosen, or data_from=config: this run's data as composed.
    for chosen, extra in ((["data=synthetic"], []), ([], ["data_from=config"])):
        cfg3 = compose_config("retrain", [f"paths.root_dir={tmp_path}", *chosen, *extra])
        data, origin = base_data(cfg3, meta, chosen)
        assert origin == "config" and data.data.source == cfg3.data.source
