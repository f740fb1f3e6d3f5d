"""Feature frontends (log-mel, MFCC, raw waveform), SpecAugment and waveform augmentation.

The frontend is part of the model (`FaultNet`), so serving feeds raw waveforms and the
features can never drift from training. Everything here works on batches, on whatever
device the batch is on. Augmentations are active only in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torchaudio
from torch import nn

from ..errors import ConfigError

_EPS = 1e-10


def _per_clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per clip over all but the batch dim (batch-independent)."""
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + 1e-5)


class LogMel(nn.Module):
    """Waveform [B, T] at `sample_rate` -> log-mel [B, 1, n_mels, frames].

    Power mel spectrogram in dB (10 log10, floor 1e-10), optionally clipped to `top_db`
    below the clip's own peak (per clip, so batch-independent), then normalized per clip
    so loudness differences between recordings do not dominate. Without `top_db`, digital
    silence (zero padding, common in ESC-50) sits at -100 dB and its contrast with the
    sound dominates the normalization. frames = T // hop + 1 (centered STFT).
    """

    def __init__(
        self,
        sample_rate: int = 16_000,
        n_mels: int = 64,
        n_fft: int = 512,
        win_ms: float | None = None,
        hop_ms: float = 20.0,
        f_min: float = 20.0,
        f_max: float | None = None,
        normalize: bool = True,
        top_db: float | None = None,
    ) -> None:
        super().__init__()
        if top_db is not None and top_db <= 0:
            raise ConfigError(f"model.net.frontend.top_db must be > 0 (or null), got {top_db}.")
        hop = max(1, round(sample_rate * hop_ms / 1000))
        win = n_fft if win_ms is None else min(n_fft, round(sample_rate * win_ms / 1000))
        self.hop_length = hop
        self.n_mels = n_mels
        self.normalize = normalize
        self.top_db = top_db
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win,
            hop_length=hop,
            f_min=f_min,
            f_max=f_max,
            n_mels=n_mels,
            power=2.0,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.mel(wave)  # [B, n_mels, frames]
        spec = 10.0 * torch.log10(spec.clamp_min(_EPS))
        if self.top_db is not None:
            spec = torch.maximum(spec, spec.amax(dim=(1, 2), keepdim=True) - self.top_db)
        if self.normalize:
            spec = _per_clip_normalize(spec)
        return spec.unsqueeze(1)


class MFCC(nn.Module):
    """Waveform [B, T] -> MFCC [B, 1, n_mfcc, frames] (DCT of the dB log-mel), per-clip normalized.

    `logmel` are LogMel's other options (n_mels=64, n_fft, win_ms, hop_ms, f_min, f_max,
    top_db); the log-mel itself is left unnormalized, the MFCCs are normalized.
    """

    def __init__(
        self, sample_rate: int = 16_000, n_mfcc: int = 40, normalize: bool = True, **logmel: Any
    ) -> None:
        super().__init__()
        n_mels = int(logmel.setdefault("n_mels", 64))
        if n_mfcc > n_mels:
            raise ConfigError(f"model.net.frontend.n_mfcc={n_mfcc} exceeds n_mels={n_mels}.")
        self.logmel = LogMel(sample_rate, **logmel, normalize=False)
        self.normalize = normalize
        dct = torchaudio.functional.create_dct(n_mfcc, n_mels, norm="ortho")  # [n_mels, n_mfcc]
        self.register_buffer("dct", dct, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        logmel = self.logmel(wave).squeeze(1)  # [B, n_mels, frames]
        mfcc = torch.matmul(logmel.transpose(1, 2), self.dct).transpose(1, 2)
        if self.normalize:
            mfcc = _per_clip_normalize(mfcc)
        return mfcc.unsqueeze(1)


class Waveform(nn.Module):
    """Waveform [B, T] -> waveform [B, T], optionally normalized per clip (what wav2vec2 expects)."""

    def __init__(self, sample_rate: int = 16_000, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return _per_clip_normalize(wave) if self.normalize else wave


class SpecAugment(nn.Module):
    """Time and frequency masks on features [B, C, F, frames]; identity in eval mode.

    Masks are drawn independently per example; masked cells become 0 (the per-clip mean
    after normalization).
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 8,
        time_masks: int = 2,
        time_width: int = 20,
    ) -> None:
        super().__init__()
        self.freq = nn.ModuleList(
            torchaudio.transforms.FrequencyMasking(freq_width, iid_masks=True)
            for _ in range(freq_masks if freq_width > 0 else 0)
        )
        self.time = nn.ModuleList(
            torchaudio.transforms.TimeMasking(time_width, iid_masks=True)
            for _ in range(time_masks if time_width > 0 else 0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        for mask in [*self.freq, *self.time]:
            x = mask(x)
        return x


class Frontend(nn.Module):
    """Waveform [B, T] -> features (+ SpecAugment in training). `out_channels` and `kind` describe it."""

    def __init__(self, features: nn.Module, kind: str, spec_augment: SpecAugment | None) -> None:
        super().__init__()
        self.features = features
        self.kind = kind
        self.spec_augment = spec_augment

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.features(wave)
        if self.spec_augment is not None:
            x = self.spec_augment(x)
        return x


_FEATURES: dict[str, type[nn.Module]] = {"logmel": LogMel, "mfcc": MFCC, "waveform": Waveform}


def build_frontend(spec: dict[str, Any]) -> Frontend:
    """Build a frontend from a plain dict: `{kind: logmel|mfcc|waveform, sample_rate, ...,
    spec_augment: {freq_masks, freq_width, time_masks, time_width} | null}`."""
    spec = dict(spec)
    kind = spec.pop("kind", "logmel")
    if kind not in _FEATURES:
        raise ConfigError(
            f"model.net.frontend.kind={kind!r} is not supported; choose one of {sorted(_FEATURES)}."
        )
    augment = spec.pop("spec_augment", None)
    if augment and kind == "waveform":
        raise ConfigError(
            "model.net.frontend.spec_augment needs a spectral frontend, not 'waveform'."
        )
    try:
        features = _FEATURES[kind](**spec)
    except TypeError as err:
        raise ConfigError(f"model.net.frontend ({kind}): {err}") from None
    return Frontend(features, kind, SpecAugment(**augment) if augment else None)


class WaveAugment(nn.Module):
    """Random gain, circular time shift, additive noise at a random SNR and (optional) speed
    and pitch perturbation, applied per example to waveforms [B, T] -> [B, T].

    Runs on the batch, on its device, only in training mode. `speed` (resampling by a random
    factor, then crop/pad) is cheap; `pitch_semitones` uses torchaudio's phase-vocoder pitch
    shift (one random shift per batch) and is slow, so both are off by default.
    """

    def __init__(
        self,
        gain_db: float = 6.0,
        shift: float = 0.5,
        noise_p: float = 0.5,
        snr_db: tuple[float, float] | list[float] = (10.0, 40.0),
        speed: tuple[float, float] | list[float] | None = None,
        pitch_semitones: float | None = None,
        pitch_p: float = 0.3,
        sample_rate: int = 16_000,
    ) -> None:
        super().__init__()
        self.gain_db = gain_db
        self.shift = shift
        self.noise_p = noise_p
        self.snr_db = tuple(snr_db)
        self.speed = tuple(speed) if speed else None
        self.pitch_semitones = pitch_semitones
        self.pitch_p = pitch_p
        self.sample_rate = sample_rate

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return wave
        b, t = wave.shape
        dev = wave.device
        if self.speed:
            wave = self._speed(wave)
        if self.pitch_semitones and torch.rand(()) < self.pitch_p:
            steps = float(torch.empty(()).uniform_(-self.pitch_semitones, self.pitch_semitones))
            wave = torchaudio.functional.pitch_shift(wave, self.sample_rate, steps)[..., :t]
        if self.gain_db > 0:
            gain = torch.empty(b, 1, device=dev).uniform_(-self.gain_db, self.gain_db)
            wave = wave * torch.pow(10.0, gain / 20.0)
        if self.shift > 0:
            max_shift = int(self.shift * t)
            offsets = torch.randint(-max_shift, max_shift + 1, (b, 1), device=dev)
            index = (torch.arange(t, device=dev).unsqueeze(0) - offsets) % t
            wave = torch.gather(wave, 1, index)
        if self.noise_p > 0:
            lo, hi = self.snr_db
            snr = torch.empty(b, 1, device=dev).uniform_(lo, hi)
            power = wave.pow(2).mean(dim=1, keepdim=True).clamp_min(_EPS)
            scale = torch.sqrt(power / torch.pow(10.0, snr / 10.0))
            apply = (torch.rand(b, 1, device=dev) < self.noise_p).to(wave.dtype)
            wave = wave + apply * scale * torch.randn_like(wave)
        return wave

    def _speed(self, wave: torch.Tensor) -> torch.Tensor:
        # One factor per batch keeps it a single interpolate call; crop/pad back to T.
        t = wave.shape[1]
        factor = float(torch.empty(()).uniform_(*self.speed))
        new_t = max(2, round(t / factor))
        out = nn.functional.interpolate(wave.unsqueeze(1), size=new_t, mode="linear").squeeze(1)
        if new_t >= t:
            return out[:, :t]
        return nn.functional.pad(out, (0, t - new_t))


def mixup(
    wave: torch.Tensor, target: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a shuffled copy of itself: wave [B, T], target [B, ...] ->
    (mixed [B, T], target_a [B, ...], target_b [B, ...], lam);
    loss = lam*CE(a) + (1-lam)*CE(b)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    lam = max(lam, 1.0 - lam)  # keep the first clip dominant so its label stays the main one
    perm = torch.randperm(wave.shape[0], device=wave.device)
    return lam * wave + (1.0 - lam) * wave[perm], target, target[perm], lam
