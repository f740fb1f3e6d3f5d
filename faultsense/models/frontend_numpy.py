"""The eval-mode LogMel / MFCC frontends and YAMNet's log-mel patches in numpy, for the
CPU serving path (`numpy_torch_part(net)` picks the twin of what onnx_export runs in torch).

`numpy_frontend(frontend)` reads a trained `Frontend`'s settings and buffers (STFT
window, mel filterbank, DCT) and computes the same features with scipy's FFT, the mel
filterbank as a sparse matrix and the MFCC's DCT in torch (`_matmul`): ~0.9 ms per 5-s
clip on one core against 1.5-1.6 ms for the traced torch frontend, whose `torch.stft` +
complex `abs().pow(2)` cost most of it (experiments/README.md, issue 16). The features
agree with torch's to ~2e-5 (normalized units), and are as close as torch's to the
float64 features where float32 rounding shows (bands near the log floor);
`build_onnx_runner` checks them on every load and keeps the torch frontend when they
don't agree. Training always uses the torch modules: this is a fast path, not a second
definition.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import scipy.fft
import scipy.sparse
from numpy.lib.stride_tricks import sliding_window_view

# Agree with the torch frontend to this (normalized features: unit variance per clip).
NUMPY_FRONTEND_ATOL = 1e-3
_EPS = 1e-10  # models/frontend.py's floor before the log


class NumpyLogMel:
    """Waveforms [B, T] float32 -> features [B, 1, n, frames] float32, n = n_mels (LogMel)
    or n_mfcc (MFCC, `dct` given): a centered, reflect-padded STFT (torchaudio's
    Spectrogram), power, mel filterbank, 10 log10 with a 1e-10 floor, optional `top_db`
    clip, optional DCT, optional per-clip normalization."""

    def __init__(
        self,
        window: np.ndarray,
        n_fft: int,
        hop: int,
        mel_fb: np.ndarray,
        top_db: float | None,
        normalize: bool,
        dct: np.ndarray | None = None,
    ) -> None:
        # torch.stft centres a window shorter than n_fft inside the frame.
        lo = (n_fft - len(window)) // 2
        self.window = np.zeros(n_fft, dtype=np.float32)
        self.window[lo : lo + len(window)] = window
        self.n_fft, self.hop = n_fft, hop
        self.mel_sparse = scipy.sparse.csc_matrix(mel_fb, dtype=np.float32)  # [n_freq, n_mels]
        self.top_db, self.normalize = top_db, normalize
        self.dct = None if dct is None else np.ascontiguousarray(dct, dtype=np.float32)
        self._local = threading.local()  # work arrays, per thread (see `_work`)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, dtype=np.float32)
        work = self._work(wave.shape)
        half = self.n_fft // 2
        with np.errstate(over="ignore", invalid="ignore"):  # huge samples: inf, as in torch
            padded = work["padded"]
            padded[:, half:-half] = wave
            padded[:, :half] = wave[:, half:0:-1]  # reflect, as torch.stft pads
            padded[:, -half:] = wave[:, -2 : -half - 2 : -1]
            frames = sliding_window_view(padded, self.n_fft, axis=1)
            windowed = np.multiply(frames[:, :: self.hop], self.window, out=work["windowed"])
            spectrum = scipy.fft.rfft(windowed, axis=-1, workers=1, overwrite_x=True)
            power = np.square(spectrum.real, out=work["power"])  # [B, frames, n_freq]
            power += np.square(spectrum.imag, out=work["imag"])
            # The filterbank is sparse (~1 000 of 65 664 weights for 128 bands): 2x a dense
            # product here.
            db = np.asarray(power.reshape(-1, power.shape[-1]) @ self.mel_sparse)
            db = db.reshape(*power.shape[:2], -1)  # [B, frames, n_mels]
            np.maximum(db, _EPS, out=db)
            np.log10(db, out=db)
            db *= 10.0
            if self.top_db is not None:
                np.maximum(db, db.max(axis=(1, 2), keepdims=True) - self.top_db, out=db)
            if self.dct is not None:
                db = _matmul(db, self.dct)  # [B, frames, n_mfcc]
            if self.normalize:
                mean = db.mean(axis=(1, 2), keepdims=True)
                db = (db - mean) / (db.std(axis=(1, 2), keepdims=True, ddof=1) + 1e-5)
        # A fresh C-contiguous array: the caller keeps it while the work arrays are reused.
        return db.transpose(0, 2, 1)[:, None].astype(np.float32, order="C", copy=True)

    def _work(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Work arrays for a batch of this shape, kept between calls: allocating the ~5 MB
        afresh on every call cost ~0.3 ms a clip in page faults. One set per thread."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        if shape not in buffers:
            batch, samples = shape
            frames = samples // self.hop + 1
            n_freq = self.n_fft // 2 + 1
            buffers[shape] = {
                "padded": np.empty((batch, samples + self.n_fft), np.float32),
                "windowed": np.empty((batch, frames, self.n_fft), np.float32),
                "power": np.empty((batch, frames, n_freq), np.float32),
                "imag": np.empty((batch, frames, n_freq), np.float32),
            }
        return buffers[shape]


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through torch, so it runs on torch's intra-op threads (one per serving
    worker): numpy's OpenBLAS would start a spinning thread per core in every worker,
    and two workers' spinning threads took 28 ms of CPU per request on 2 cores."""
    import torch

    return torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def numpy_torch_part(net: Any) -> NumpyLogMel | NumpyYamnetPatches | None:
    """The numpy twin of what runs in torch on the ONNX Runtime path (onnx_export's torch
    part): the net's LogMel / MFCC frontend, or a YAMNet backbone's log-mel patches behind a
    plain waveform frontend; None when there is no twin for it."""
    from .frontend import Waveform
    from .yamnet import YamnetBackbone

    if isinstance(net.backbone, YamnetBackbone):
        plain = isinstance(net.frontend.features, Waveform) and not net.frontend.features.normalize
        return NumpyYamnetPatches(net.backbone.frontend) if plain else None
    return numpy_frontend(net.frontend)


def numpy_frontend(frontend: Any) -> NumpyLogMel | None:
    """The numpy twin of an eval-mode `Frontend` over LogMel or MFCC, or None when its
    features are of another kind or use settings the twin does not implement."""
    from .frontend import MFCC, LogMel

    features = getattr(frontend, "features", None)
    if isinstance(features, MFCC):
        return _twin(features.logmel, features.normalize, features.dct.cpu().numpy())
    if isinstance(features, LogMel):
        return _twin(features, features.normalize)
    return None


class NumpyYamnetPatches:
    """Waveforms [B, T] float32 at 16 kHz -> YAMNet's log-mel patches [B, P, 96, 64] float32:
    `YamnetFrontend`'s numbers (padding, periodic Hann window, 512-point FFT magnitude,
    its mel matrix as a sparse matrix, log with offset 0.001, patches on the hop grid or
    only the `patch_select` loudest, as the torch frontend chooses them), with scipy's FFT:
    ~1.5x faster than the eager torch frontend on one core (experiments/README.md, issue 16)."""

    def __init__(self, frontend: Any) -> None:
        from .yamnet import LOG_OFFSET

        # The frontend itself pads, cuts the patch grid and picks the loudest patches (cheap
        # tensor views and a top-k): one definition of them, ties included.
        self.frontend = frontend
        self.hann = frontend.hann.cpu().numpy().astype(np.float32)
        self.mel_sparse = scipy.sparse.csc_matrix(frontend.mel.cpu().numpy(), dtype=np.float32)
        self.log_offset = np.float32(LOG_OFFSET)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        import torch

        f = self.frontend
        with torch.inference_mode():
            padded = f.pad(torch.from_numpy(np.asarray(wave, dtype=np.float32)))
            segments = f.segments(padded) if f.patch_select else None  # a view
            loudest = f.loudest(segments).numpy() if f.patch_select else None
        with np.errstate(over="ignore", invalid="ignore"):  # huge samples: inf, as in torch
            if loudest is None:
                spec = self._log_mel(padded.numpy())  # [B, frames, 64]
                grid = sliding_window_view(spec, f.patch_frames, axis=1)
                patches = grid[:, :: f.patch_hop_frames]  # [B, P, 64, 96]
                return np.ascontiguousarray(patches.transpose(0, 1, 3, 2))
            batch, keep = loudest.shape
            chosen = segments.numpy()[np.arange(batch)[:, None], loudest]  # [B, keep, samples]
            spec = self._log_mel(chosen.reshape(batch * keep, f.min_samples))
        return spec.reshape(batch, keep, *spec.shape[1:])

    def _log_mel(self, wave: np.ndarray) -> np.ndarray:
        """[N, T] -> log-mel [N, frames, 64], frames = 1 + (T - 400) // 160."""
        f = self.frontend
        frames = sliding_window_view(wave, f.window, axis=1)[:, :: f.hop] * self.hann
        spectrum = scipy.fft.rfft(frames, n=f.n_fft, axis=-1, workers=1, overwrite_x=True)
        magnitude = np.abs(spectrum)  # [N, frames, 257]
        mel = np.asarray(magnitude.reshape(-1, magnitude.shape[-1]) @ self.mel_sparse)
        mel += self.log_offset
        np.log(mel, out=mel)
        return np.ascontiguousarray(mel).reshape(*magnitude.shape[:2], -1)


def _twin(logmel: Any, normalize: bool, dct: np.ndarray | None = None) -> NumpyLogMel | None:
    spec, mel_scale = logmel.mel.spectrogram, logmel.mel.mel_scale
    plain = (
        spec.center
        and spec.pad_mode == "reflect"
        and spec.power == 2.0
        and not spec.normalized
        and spec.onesided
        and spec.pad == 0
    )
    if not plain:
        return None
    return NumpyLogMel(
        window=spec.window.cpu().numpy(),
        n_fft=int(spec.n_fft),
        hop=int(spec.hop_length),
        mel_fb=mel_scale.fb.cpu().numpy(),
        top_db=logmel.top_db,
        normalize=normalize,
        dct=dct,
    )
