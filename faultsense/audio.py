"""Decode audio from a path or bytes into mono float32 at the model rate, with clear errors.

This is the only decoder in the project: the data cache, uploads, the Predictor and the
server all call `decode`. It uses soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...) and
resamples with libsoxr (no torch, so the HTTP processes stay small); `torchaudio.load`
is never used.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

MODEL_SAMPLE_RATE = 16_000
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
# Peak amplitude below this is digital silence: nothing a classifier could hear.
SILENCE_PEAK = 1e-6
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")

AudioSource = str | Path | bytes | bytearray | memoryview | BinaryIO


def _describe(source: AudioSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, str | Path):
        return str(source)
    return "<audio bytes>"


def _open(source: AudioSource, what: str) -> sf.SoundFile:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise AudioError(f"{what} is empty (0 bytes).")
        source = io.BytesIO(bytes(source))
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{what} does not exist or is not a file.")
        if path.stat().st_size == 0:
            raise AudioError(f"{what} is empty (0 bytes).")
        source = str(path)
    try:
        return sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(
            f"{what} could not be decoded as audio (supported: WAV, FLAC, OGG, MP3): "
            f"{getattr(err, 'error_string', err)}"
        ) from None


def decode(
    source: AudioSource,
    *,
    sample_rate: int = MODEL_SAMPLE_RATE,
    max_seconds: float | None = None,
    name: str | None = None,
    allow_silent: bool = False,
) -> np.ndarray:
    """Decode `source` to a mono float32 waveform [T] at `sample_rate`.

    Multichannel audio is averaged to mono; other rates are resampled. Raises AudioError,
    naming `name` (or the path) and the reason, for: empty or missing input, undecodable
    or non-audio bytes, an absurd sample rate, no samples, NaN/Inf samples, digital
    silence (unless `allow_silent`), or a duration over `max_seconds`. Memory stays
    bounded by `max_seconds` even when a header lies about its length.
    """
    what = _describe(source, name)
    frames = _pcm16_frames(source, sample_rate)
    if frames is not None:  # what clients send most, read straight from the bytes
        data, rate = frames.astype(np.float32) * _PCM16_SCALE, sample_rate
    else:
        data, rate = _read(source, what, max_seconds)
    limit = None if max_seconds is None else int(max_seconds * rate) + 1
    channels = data.shape[1]
    if limit is not None and data.shape[0] >= limit:
        raise AudioError(
            f"{what} is longer than the limit of {max_seconds:g} s; trim it or split it into clips."
        )
    if data.shape[0] == 0:
        raise AudioError(f"{what} contains no audio samples.")
    if not np.isfinite(data).all():
        raise AudioError(f"{what} contains NaN or infinite samples.")
    wave = data.mean(axis=1, dtype=np.float32) if channels > 1 else data[:, 0]
    if not allow_silent and float(np.abs(wave).max()) < SILENCE_PEAK:
        raise AudioError(f"{what} is silent (every sample is zero).")
    return resample(np.ascontiguousarray(wave, dtype=np.float32), rate, sample_rate)


def _read(source: AudioSource, what: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Frames float32 [T, channels] (at most one past `max_seconds`) and the file's rate,
    through libsndfile."""
    with _open(source, what) as f:
        rate, channels = int(f.samplerate), int(f.channels)
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise AudioError(
                f"{what} has an unsupported sample rate of {rate} Hz "
                f"(expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)."
            )
        if channels < 1:
            raise AudioError(f"{what} declares {channels} channels.")
        limit = None if max_seconds is None else int(max_seconds * rate) + 1
        try:
            data = f.read(frames=-1 if limit is None else limit, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, MemoryError) as err:
            raise AudioError(
                f"{what} is corrupt or truncated: {getattr(err, 'error_string', err)}"
            ) from None
    return data, rate


# The WAV header fields the fast path reads ("fmt " chunk): format tag, channels, rate,
# byte rate, block align, bits per sample.
_FMT = struct.Struct("<HHIIHH")
_WAVE_PCM = 1
# libsndfile's int16 -> float32 scale: the fast path must give the same samples.
_PCM16_SCALE = np.float32(1.0 / 32768.0)


def _pcm16_frames(source: AudioSource, sample_rate: int) -> np.ndarray | None:
    """The int16 frames [T, channels] of in-memory bytes that are a plain 16-bit PCM WAV
    at `sample_rate` with consistent chunks (~0.1 ms for 5 s instead of ~0.6 ms through
    libsndfile, same samples); None for anything else (decode then uses libsndfile)."""
    if not isinstance(source, bytes | bytearray | memoryview):
        return None
    data = bytes(source) if isinstance(source, memoryview) else source
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt, pos = None, 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt " and size >= _FMT.size and body + size <= len(data):
            fmt = _FMT.unpack_from(data, body)
        elif chunk == b"data":
            if fmt is None or body + size != len(data):
                return None  # a data chunk before fmt, truncated, or trailing chunks
            tag, channels, rate, _, align, bits = fmt
            if tag != _WAVE_PCM or bits != 16 or rate != sample_rate or channels < 1:
                return None
            if align != 2 * channels or size % align:
                return None
            return np.frombuffer(data, dtype="<i2", count=size // 2, offset=body).reshape(
                -1, channels
            )
        pos = body + size + (size & 1)
    return None


def info_seconds(source: AudioSource, name: str | None = None) -> float:
    """Declared duration of `source` in seconds (header only, no full decode)."""
    what = _describe(source, name)
    with _open(source, what) as f:
        return f.frames / f.samplerate if f.samplerate else 0.0


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform [T] from `orig_rate` to `new_rate` (libsoxr, HQ).

    soxr rather than torchaudio: the HTTP processes validate uploads with this and would
    otherwise import torch (~500 MiB resident each) for it; soxr is also ~1000x faster on
    a first call (no kernel to build) and as fast after."""
    if orig_rate == new_rate:
        return wave
    return soxr.resample(wave, orig_rate, new_rate, quality="HQ").astype(np.float32, copy=False)


def fix_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Crop (keep the start) or zero-pad (at the end) a waveform [T] to exactly `length`."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])]
    return np.pad(wave, pad)


def sliding_windows(wave: np.ndarray, window: int, hop: int) -> np.ndarray:
    """Split a waveform [T] into windows [N, window] every `hop` samples.

    A clip no longer than `window` gives one zero-padded window; the tail of a longer
    clip gets its own window so no audio is dropped.
    """
    if wave.shape[0] <= window:
        return fix_length(wave, window)[None]
    starts = list(range(0, wave.shape[0] - window + 1, hop))
    if starts[-1] + window < wave.shape[0]:
        starts.append(wave.shape[0] - window)
    return np.stack([wave[s : s + window] for s in starts])


def to_wav_bytes(wave: np.ndarray, sample_rate: int = MODEL_SAMPLE_RATE) -> bytes:
    """Encode a mono float waveform [T] as 16-bit PCM WAV bytes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
