"""The one decoder: each way audio can be unusable gets an AudioError naming the file."""

import io

import numpy as np
import pytest
import soundfile as sf

from faultsense import audio
from faultsense.errors import AudioError


def wav_bytes(wave: np.ndarray, rate: int = 44_100, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def tone(seconds: float = 1.0, rate: int = 44_100, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def test_wav_is_resampled_to_model_rate_and_mono(tmp_path):
    path = tmp_path / "pump.wav"
    sf.write(path, tone(1.0, 44_100, channels=2), 44_100)
    wave = audio.decode(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == 16_000
    assert 0.25 < np.abs(wave).max() < 0.35


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_compressed_formats_decode(tmp_path, fmt, ext):
    path = tmp_path / f"clip.{ext}"
    sf.write(path, tone(1.0, 16_000), 16_000, format=fmt)
    wave = audio.decode(path.read_bytes(), name=path.name)
    assert abs(wave.shape[0] - 16_000) < 2_000


def test_empty_file_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "pump.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"pump\.wav.*empty"):
        audio.decode(path)


def test_truncated_wav_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "pump.wav"
    path.write_bytes(wav_bytes(tone())[:30])
    with pytest.raises(AudioError, match=r"pump\.wav"):
        audio.decode(path)


def test_not_audio_is_rejected(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("<html><body>not audio</body></html>")
    with pytest.raises(AudioError, match=r"notes\.wav.*could not be decoded"):
        audio.decode(path)


def test_silent_clip_is_rejected():
    with pytest.raises(AudioError, match="silent"):
        audio.decode(wav_bytes(np.zeros(4410, np.float32)), name="quiet.wav")


def test_nan_samples_are_rejected():
    wave = tone(0.2)
    wave[100] = np.nan
    with pytest.raises(AudioError, match=r"nan\.wav.*NaN"):
        audio.decode(wav_bytes(wave, subtype="FLOAT"), name="nan.wav")


def test_absurd_sample_rate_is_rejected():
    with pytest.raises(AudioError, match="sample rate of 1 Hz"):
        audio.decode(wav_bytes(tone(0.1), rate=1), name="slow.wav")


def test_too_long_is_rejected_without_decoding_it_all():
    with pytest.raises(AudioError, match=r"long\.wav.*longer than the limit of 2 s"):
        audio.decode(wav_bytes(tone(5.0, 16_000), rate=16_000), name="long.wav", max_seconds=2)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(AudioError, match="nowhere.wav.*does not exist"):
        audio.decode(tmp_path / "nowhere.wav")


def test_fix_length_crops_and_pads():
    assert audio.fix_length(np.ones(10, np.float32), 4).tolist() == [1, 1, 1, 1]
    assert audio.fix_length(np.ones(2, np.float32), 4).tolist() == [1, 1, 0, 0]


def test_sliding_windows_cover_the_whole_clip():
    windows = audio.sliding_windows(np.arange(10, dtype=np.float32), window=4, hop=4)
    assert windows.shape == (3, 4)
    assert windows[-1].tolist() == [6, 7, 8, 9]
    assert audio.sliding_windows(np.ones(3, np.float32), 4, 2).shape == (1, 4)


def test_resampling_keeps_the_tone_and_removes_what_would_alias():
    """44.1 kHz -> 16 kHz: a 1 kHz tone keeps its pitch and level; a 12 kHz tone (above the
    new 8 kHz Nyquist) is filtered out instead of folding back to 4 kHz."""
    rate = 44_100
    t = np.arange(rate) / rate
    low = audio.resample((0.5 * np.sin(2 * np.pi * 1_000 * t)).astype(np.float32), rate, 16_000)
    high = audio.resample((0.5 * np.sin(2 * np.pi * 12_000 * t)).astype(np.float32), rate, 16_000)
    assert low.dtype == np.float32 and low.shape == (16_000,)
    spectrum = np.abs(np.fft.rfft(low))  # 1 Hz per bin
    assert int(spectrum.argmax()) == 1_000
    assert np.sqrt(np.mean(low**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    assert np.sqrt(np.mean(high[100:-100] ** 2)) < 1e-3
