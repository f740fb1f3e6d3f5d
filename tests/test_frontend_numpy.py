"""The numpy twins of the log-mel / MFCC frontends and of YAMNet's log-mel patches
(serving's CPU fast path): same features as the torch modules for every setting they
accept, refused for any they don't, and used by the ONNX Runtime runner only while they
agree with torch."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import scipy.sparse
import torch

from faultsense.inference import Predictor
from faultsense.models.frontend import build_frontend
from faultsense.models.frontend_numpy import (
    NUMPY_FRONTEND_ATOL,
    NumpyYamnetPatches,
    numpy_frontend,
)
from faultsense.models.yamnet import YamnetFrontend

SR = 16_000


def waves(n_samples: int = 24_000) -> torch.Tensor:
    """Noise, a tone, digital silence and a loud clip: [4, n_samples]."""
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(n_samples) / SR
    return torch.stack(
        [
            0.1 * torch.randn(n_samples, generator=gen),
            0.3 * torch.sin(2 * torch.pi * 440 * t),
            torch.zeros(n_samples),
            3.0 * torch.randn(n_samples, generator=gen),
        ]
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "logmel", "n_mels": 128, "n_fft": 1024, "win_ms": 32, "hop_ms": 20},
        {"kind": "logmel", "n_mels": 64, "n_fft": 512, "hop_ms": 10, "top_db": 80.0},
        {"kind": "logmel", "n_mels": 40, "n_fft": 400, "hop_ms": 10, "normalize": False},
        {"kind": "mfcc", "n_mfcc": 20, "n_mels": 64, "n_fft": 512, "hop_ms": 16},
    ],
)
def test_numpy_twin_computes_the_torch_features(spec):
    frontend = build_frontend({**spec, "sample_rate": SR}).eval()
    twin = numpy_frontend(frontend)
    assert twin is not None
    x = waves()
    with torch.inference_mode():
        want = frontend(x).numpy()
        exact = copy.deepcopy(frontend).double()(x.double()).numpy()
    got = twin(x.numpy())
    assert got.shape == want.shape and got.dtype == np.float32
    scale = 1.0 if spec.get("normalize", True) else np.abs(want).max()
    # Noise, silence and the loud clip: the same numbers.
    assert np.abs(got - want)[[0, 2, 3]].max() <= NUMPY_FRONTEND_ATOL * scale
    # A pure tone leaves most mel bands near the log floor, where either float32 FFT
    # rounds its leakage differently: both must be as close to the float64 features.
    numpy_err = np.abs(got - exact).max(axis=(1, 2, 3))
    torch_err = np.abs(want - exact).max(axis=(1, 2, 3))
    assert (numpy_err <= 2 * torch_err + 1e-5 * scale).all(), (numpy_err, torch_err)


def test_settings_the_twin_does_not_implement_get_none():
    assert numpy_frontend(build_frontend({"kind": "waveform"})) is None
    frontend = build_frontend({"kind": "logmel", "n_mels": 32})
    frontend.features.mel.spectrogram.pad_mode = "constant"
    assert numpy_frontend(frontend) is None


def test_onnx_runner_takes_the_numpy_frontend_only_while_it_agrees(
    trained_registry, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="faultsense")
    fast = Predictor.from_registry(trained_registry, runtime="onnx", onnx_cache=tmp_path)
    assert "numpy frontend" in caplog.text
    assert fast._loaded.runner.frontend_kind == "numpy"

    # A twin that drifts from torch (here: a filterbank off by up to 2x a band) is not used.
    import faultsense.models.frontend_numpy as module

    real = module.numpy_frontend

    def drifting(frontend):
        twin = real(frontend)
        bands = twin.mel_sparse.shape[1]
        twin.mel_sparse = twin.mel_sparse @ scipy.sparse.diags(np.linspace(0.5, 2.0, bands))
        return twin

    monkeypatch.setattr(module, "numpy_frontend", drifting)
    caplog.clear()
    slow = Predictor.from_registry(trained_registry, runtime="onnx", onnx_cache=tmp_path)
    assert slow._loaded.runner.frontend_kind == "torch"
    assert "numpy frontend differs from torch" in caplog.text
    clip = [waves(slow.clip_samples)[0].numpy()]
    got, want = fast.predict(clip)[0], slow.predict(clip)[0]
    assert got["label"] == want["label"]
    assert abs(got["confidence"] - want["confidence"]) < 1e-4


def test_twin_works_in_and_out_of_inference_mode_and_returns_fresh_arrays():
    frontend = build_frontend({"kind": "logmel", "n_mels": 32, "sample_rate": SR}).eval()
    twin = numpy_frontend(frontend)
    x = waves().numpy()
    with torch.inference_mode():
        first = twin(x)
    second = twin(x[::-1].copy())  # outside inference mode, same shape: the same work arrays
    again = twin(x)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, second)


@pytest.mark.parametrize(
    ("patch_hop_s", "patch_select", "seconds"),
    [(0.48, 0, 1.5), (0.96, 0, 0.5), (0.96, 2, 5.0), (0.48, 3, 2.2)],
)
def test_numpy_twin_computes_yamnet_patches(patch_hop_s, patch_select, seconds):
    frontend = YamnetFrontend(patch_hop_s, patch_select).eval()
    x = waves(int(seconds * SR))
    x[0, : x.shape[1] // 3] *= 10.0  # the noise is loudest early: the selection matters
    with torch.inference_mode():
        want = frontend(x).numpy()
        exact = copy.deepcopy(frontend).double()(x.double()).numpy()
    got = NumpyYamnetPatches(frontend)(x.numpy())
    assert got.shape == want.shape and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.abs(got - want)[[0, 2, 3]].max() <= NUMPY_FRONTEND_ATOL
    # The tone's bands near the log floor: as close to the float64 numbers as torch's.
    assert np.abs(got - exact)[1].max() <= 2 * np.abs(want - exact)[1].max() + 1e-5
    if patch_select:  # the noise's loud start is what it kept: the grid's first patches
        with torch.inference_mode():
            grid = YamnetFrontend(patch_hop_s).eval()(x[:1]).numpy()
        assert np.abs(got[0] - grid[0, :patch_select]).max() <= NUMPY_FRONTEND_ATOL


def test_equally_loud_patches_are_chosen_as_torch_chooses_them():
    # A looped clip can hold grid patches of bit-identical energy (1 of the 1 600 ESC-50
    # development clips does): the twin must keep the same one as the torch frontend.
    frontend = YamnetFrontend(0.96, patch_select=2).eval()
    gen = torch.Generator().manual_seed(5)
    wave = 0.01 * torch.randn(5 * SR, generator=gen)
    n, hop = frontend.min_samples, frontend.hop_samples
    wave[:hop] = 3.0 * torch.randn(hop, generator=gen)  # grid patch 0: the loudest
    loud = torch.randn(n, generator=gen)
    signs = torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1.0
    wave[2 * hop : 2 * hop + n] = loud  # patch 2
    wave[4 * hop : 4 * hop + n] = loud * signs  # patch 4: other sounds, the same energy
    x = wave[None]
    with torch.inference_mode():
        energy = frontend.segments(frontend.pad(x)).square().sum(-1)[0]
        want = frontend(x).numpy()
    assert energy[2] == energy[4] and energy.argmax() == 0
    assert energy[[1, 3, 5]].max() < energy[2]  # the second patch kept is 2 or 4
    got = NumpyYamnetPatches(frontend)(x.numpy())
    assert np.abs(got - want).max() <= NUMPY_FRONTEND_ATOL
