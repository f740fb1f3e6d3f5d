"""The ONNX Runtime serving path: `Predictor(runtime="onnx")` against torch, its graph
cache, its fallbacks to torch, `server.runtime` in ServeSettings, and a server on it."""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from faultsense.audio import to_wav_bytes
from faultsense.errors import ConfigError
from faultsense.inference import Predictor
from faultsense.models.net import build_net
from faultsense.onnx_export import FRONTEND_CHUNK
from serving.settings import ServeSettings, serve_settings
from tests.fixtures.server import start_server


def noisy_tone(seconds: float, seed: int, sr: int = 16_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (150 + 250 * seed) * t)
    return (tone + rng.normal(0, 0.05, t.size)).astype(np.float32)


def probabilities(results: list[dict]) -> np.ndarray:
    return np.array([list(r["probabilities"].values()) for r in results])


@pytest.fixture(scope="module")
def torch_predictor(trained_registry) -> Predictor:
    return Predictor.from_registry(trained_registry)


def test_onnx_runtime_matches_torch(trained_registry, torch_predictor, tmp_path):
    predictor = Predictor.from_registry(trained_registry, runtime="onnx", onnx_cache=tmp_path)
    assert predictor.runtime == "onnx" and predictor.fast_path == "onnx"
    assert torch_predictor.runtime == "torch"
    # Short, exact, long (several windows) clips; a batch not a multiple of the chunk.
    clip_s = predictor.clip_samples / predictor.sample_rate
    clips = [noisy_tone(s, i) for i, s in enumerate([0.3, clip_s, 2.6 * clip_s, 1.0, 0.7])]
    assert len(clips) % FRONTEND_CHUNK
    got, want = predictor.predict(clips), torch_predictor.predict(clips)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert np.abs(probabilities(got) - probabilities(want)).max() < 1e-4
    for g, w in zip(got, want, strict=True):
        assert len(g["windows"]) == len(w["windows"])


def test_exported_graph_is_cached_and_a_broken_cache_is_replaced(
    trained_registry, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="faultsense.inference")
    first = Predictor.from_registry(trained_registry, runtime="onnx", onnx_cache=tmp_path)
    cached = list(tmp_path.glob("*.onnx"))
    assert len(cached) == 1 and "graph from export" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))  # the export went there atomically

    caplog.clear()
    second = Predictor.from_registry(trained_registry, runtime="onnx", onnx_cache=tmp_path)
    assert second.runtime == "onnx" and "graph from cache" in caplog.text

    cached[0].write_bytes(b"not an onnx graph")
    caplog.clear()
    third = Predictor.from_registry(trained_registry, runtime="onnx", onnx_cache=tmp_path)
    assert third.runtime == "onnx" and "graph from export" in caplog.text
    wave = [noisy_tone(1.0, 3)]
    assert (
        np.abs(probabilities(third.predict(wave)) - probabilities(first.predict(wave))).max() < 1e-6
    )


class _NoFrontend(nn.Module):
    """A net with no frontend/backbone/head split: the ONNX path cannot take it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.linear(wave)


def test_a_net_that_cannot_split_falls_back_to_torch_and_says_why(caplog):
    meta = {"labels": ["a", "b", "c"], "sample_rate": 16_000, "clip_samples": 64}
    with caplog.at_level(logging.WARNING, logger="faultsense.inference"):
        predictor = Predictor(_NoFrontend(), meta, runtime="onnx")
    assert predictor.runtime == "torch" and predictor.fast_path == "jit"
    assert "not on ONNX Runtime" in caplog.text and "frontend" in caplog.text
    assert predictor.predict([np.ones(64, dtype=np.float32)])[0]["label"] in meta["labels"]


def test_unknown_runtime_is_refused():
    meta = {"labels": ["a", "b", "c"], "sample_rate": 16_000, "clip_samples": 64}
    with pytest.raises(ConfigError, match="runtime='tflite'"):
        Predictor(_NoFrontend(), meta, runtime="tflite")


def serve_config(overrides: list[str]) -> dict:
    """configs/serve.yaml with `overrides`, resolved to plain values (outside a Hydra run)."""
    from omegaconf import open_dict

    from faultsense.config import plain
    from tests.fixtures.data import compose_config

    cfg = compose_config("serve", overrides)
    with open_dict(cfg):
        del cfg.paths["output_dir"]  # ${hydra:...}: only resolvable inside a Hydra run
    return plain(cfg)


def test_serve_settings_read_and_check_the_runtime():
    cfg = serve_config(["server.runtime=torch"])
    settings = serve_settings(cfg)
    assert settings.runtime == "torch"
    assert settings.onnx_cache_dir == f"{cfg['paths']['cache_dir']}/onnx"
    assert ServeSettings.from_cfg(serve_config([])).runtime == "onnx"
    cfg["server"]["runtime"] = "tensorrt"
    with pytest.raises(ConfigError, match="server.runtime='tensorrt'"):
        serve_settings(cfg)


def test_server_serves_on_onnx_runtime(tmp_path, trained_registry, torch_predictor):
    # The default runtime, with a single worker (the other server tests run two).
    extra = ["server.workers_per_device=1"]
    with start_server(tmp_path / "srv", trained_registry, extra=extra) as s:
        wave = noisy_tone(2.0, 5, torch_predictor.sample_rate)
        body = to_wav_bytes(wave, torch_predictor.sample_rate)
        resp = httpx.post(
            f"{s.url}/predict", content=body, headers={"Content-Type": "audio/wav"}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        log_text = s.log_text()
    assert "runtime onnx" in log_text
    assert list((tmp_path / "srv" / "data" / "cache" / "onnx").glob("*.onnx"))
    want = torch_predictor.predict_bytes(body)
    got = resp.json()
    assert got["label"] == want["label"]
    assert max(abs(got["probabilities"][k] - v) for k, v in want["probabilities"].items()) < 1e-4


def test_overflowing_samples_give_the_torch_answer_not_nan(trained_registry, torch_predictor):
    # 1e30 samples overflow the split graph's power spectrum; those rows go through torch.
    predictor = Predictor.from_registry(trained_registry, runtime="onnx")
    clips = [np.full(4000, 1e30, dtype=np.float32), noisy_tone(1.0, 2)]
    got, want = (
        probabilities(predictor.predict(clips)),
        probabilities(torch_predictor.predict(clips)),
    )
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() < 1e-4


def yamnet_net(clip_samples: int = 16_000) -> nn.Module:
    """A YAMNet FaultNet with random weights and a CategoryHead (the accurate preset's shape).
    He-initialised convs: the default init fades to one embedding for every input."""
    spec = {
        "frontend": {"kind": "waveform", "normalize": False},
        "backbone": {"_target_": "faultsense.models.yamnet.YamnetBackbone", "weights": None},
        "head": {"category_labels": [0, 1, 2, 0, -1, 1]},
        "num_classes": 3,
        "sample_rate": 16_000,
        "clip_samples": clip_samples,
    }
    torch.manual_seed(0)
    net = build_net(spec).eval()
    for module in net.backbone.encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


def test_yamnet_runs_its_encoder_on_onnx_runtime(tmp_path, caplog):
    # YAMNet frames the waveform with unfold (no ONNX export): its backbone's features
    # (log-mel patches) stay in torch, the encoder, pooling and head go to ONNX Runtime.
    import onnxruntime as ort

    caplog.set_level(logging.INFO, logger="faultsense.inference")
    net = yamnet_net()
    meta = {"labels": ["a", "b", "c"], "sample_rate": 16_000, "clip_samples": 16_000}
    onnx = Predictor(net, {**meta, "weights_sha256": "w"}, onnx_cache=tmp_path, runtime="onnx")
    assert onnx.runtime == "onnx" and onnx.fast_path == "onnx"
    assert "graph from export" in caplog.text  # runner.source
    assert onnx._loaded.runner.frontend_kind == "numpy"  # its log-mel patches: numpy's twin
    (graph,) = tmp_path.glob("*.onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [2, 96, 64]  # a second's two patches
    # Exported in its folded form (YamnetBackbone.export_module): every layer one Conv,
    # no Pad, Transpose or MatMul between them (ONNX Runtime's fast layout).
    import onnx as onnx_lib

    ops = [node.op_type for node in onnx_lib.load(str(graph)).graph.node]
    assert ops.count("Conv") == 27 and not {"Pad", "Transpose", "MatMul"} & set(ops)
    # Short, exact and long (several windows) clips.
    clips = [noisy_tone(s, i) for i, s in enumerate([0.3, 1.0, 2.6, 0.05, 1.7])]
    got, want = (
        probabilities(onnx.predict(clips)),
        probabilities(Predictor(net, meta).predict(clips)),
    )
    assert np.abs(got - want).max() < 1e-5
    assert np.ptp(want, axis=0).max() > 1e-2  # the clips get different answers
