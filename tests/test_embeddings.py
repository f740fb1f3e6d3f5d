"""Embedding cache (faultsense/models/embeddings.py): a frozen encoder's clip embeddings are
computed once, keyed by the encoder and the data, and a head trained on them registers as
the whole net (encoder + head) that serves the same logits from waveforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from faultsense.errors import ConfigError
from faultsense.models.embeddings import embedding_datamodule, embeddings_path, encoder_key
from faultsense.models.net import build_net
from tests.fixtures.data import compose_config
from tests.fixtures.model import train_overrides

YAMNET_RANDOM = {  # random weights: the cache's mechanics, without the wheel's load time
    "frontend": {"kind": "waveform", "normalize": False},
    "backbone": {"_target_": "faultsense.models.yamnet.YamnetBackbone", "weights": None},
    "num_classes": 4,
    "sample_rate": 16_000,
}


def experiment_overrides(tmp_path, source, cache, experiment: str, epochs: int, extra=()):
    """The session's synthetic-data training overrides with `experiment` in place of smoke."""
    overrides = train_overrides(tmp_path, source, cache, epochs=epochs)
    overrides.remove("experiment=smoke")
    return [*overrides, f"experiment={experiment}", "test=false", *extra]


def yamnet_net(datamodule, seed: int = 0, **backbone):
    torch.manual_seed(seed)
    spec = {**YAMNET_RANDOM, "clip_samples": datamodule.clip_samples}
    spec["backbone"] = {**spec["backbone"], **backbone}
    return build_net(spec)


def test_a_second_run_reads_the_cache_and_the_key_follows_encoder_and_data(
    synthetic_datamodule, synthetic_overrides
):
    net = yamnet_net(synthetic_datamodule)
    first = embedding_datamodule(synthetic_datamodule, net)
    path = embeddings_path(synthetic_datamodule.caches[0].path, encoder_key(net))
    stamp = path.stat().st_mtime_ns
    again = embedding_datamodule(synthetic_datamodule, yamnet_net(synthetic_datamodule))
    assert path.stat().st_mtime_ns == stamp  # same encoder, same data: read, not rewritten
    batch = np.arange(len(first.train_set))
    assert torch.equal(
        first.train_set.__getitems__(batch)[0], again.train_set.__getitems__(batch)[0]
    )
    assert len(again.train_set) == len(synthetic_datamodule.train_set)

    # another weight, another patch hop: another key; other data: another cache folder
    assert encoder_key(yamnet_net(synthetic_datamodule, seed=1)) != encoder_key(net)
    assert encoder_key(yamnet_net(synthetic_datamodule, patch_hop_s=0.96)) != encoder_key(net)
    from faultsense.data.datamodule import build_datamodule

    other = build_datamodule(
        compose_config("prepare", [*synthetic_overrides, "data.clip_seconds=1.5"]).data
    )
    other.prepare_data()
    other.setup()
    other_net = yamnet_net(other)
    embedding_datamodule(other, other_net)
    other_path = embeddings_path(other.caches[0].path, encoder_key(other_net))
    assert other_path.exists() and other_path != path


def test_embedding_cache_refuses_an_encoder_that_trains(synthetic_datamodule):
    with pytest.raises(ConfigError, match="frozen encoder"):
        embedding_datamodule(synthetic_datamodule, yamnet_net(synthetic_datamodule, train_blocks=2))


def test_a_head_trained_on_cached_embeddings_registers_the_whole_net(
    tmp_path, synthetic_source, data_cache_dir
):
    from faultsense.registry import Registry
    from faultsense.train import train

    extra = ["data=synthetic", "model.net.backbone.weights=null", "register=true"]
    overrides = experiment_overrides(
        tmp_path, synthetic_source, data_cache_dir, "accurate", 3, extra
    )
    cfg = compose_config("train", [*overrides, "trainer.accelerator=cpu"])
    result = train(cfg)
    assert result.version and 0.0 <= result["val/f1_macro"] <= 1.0
    net = Registry(cfg.paths.registry_dir).current().load_net()
    assert net.spec["backbone"]["_target_"] == "faultsense.models.yamnet.YamnetBackbone"
    assert "category_labels" in net.spec["head"]  # the preset's head scores categories

    from faultsense.data.datamodule import prepared_datamodule

    datamodule = prepared_datamodule(cfg.data, aux_clips=False)
    waves = datamodule.val_set.__getitems__(np.arange(len(datamodule.val_set)))[0]
    # scored on cached embeddings, one count per val clip: the drift check's reference
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sum(summary["confidence_histogram"]["val"]) == len(waves)
    # the bundle's net keys the cache training wrote: served and trained on the same thing
    assert embeddings_path(datamodule.caches[0].path, encoder_key(net)).exists()
    cached = embedding_datamodule(datamodule, net).val_set
    embeddings = cached.__getitems__(np.arange(len(cached)))[0]
    with torch.no_grad():
        served, trained_on = net(waves), net.head(embeddings)
    torch.testing.assert_close(served, trained_on, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(served, torch.zeros_like(served))
