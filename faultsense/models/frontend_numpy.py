"""The eval-mode LogMel / MFCC frontends in numpy, for the CPU serving path.

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
import scipy.sparse

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
        import scipy.fft

        wave = np.asarray(wave, dtype=np.float32)
        work = self._work(wave.shape)
        half = self.n_fft // 2
        with np.errstate(over="ignore", invalid="ignore"):  # huge samples: inf, as in torch
            padded = work["padded"]
            padded[:, half:-half] = wave
            padded[:, :half] = wave[:, half:0:-1]  # reflect, as torch.stft pads
            padded[:, -half:] = wave[:, -2 : -half - 2 : -1]
            frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft, axis=1)
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
