"""Hostile inputs: the decoder and the real server refuse bad audio and bad requests cleanly.

Library level: `audio.decode` raises AudioError (naming the file) on every hostile payload,
reads no more than the duration limit even when a header lies or the clip is an hour long,
and accepts legal-but-unusual audio (8 channels, 24-bit, float, odd rates) as finite mono.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from faultsense import audio
from faultsense.errors import AudioError
from tests import hostile

SERVE_LIMITS = yaml.safe_load(Path("configs/serve.yaml").read_text())["limits"]
# The upload limit is the tighter one: it makes "reads only up to the limit" measurable.
MAX_SECONDS = float(SERVE_LIMITS["max_upload_seconds"])
# Decoding up to MAX_SECONDS of 8-channel 48 kHz float32 would need ~92 MB; none of the
# payloads carries more than a second of real audio, so their peak must stay far below
# what an unbounded read of a lying header (GBs) or of the hour-long stream (230 MB) takes.
DECODE_PEAK_BYTES = 32 * 2**20

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LIBRARY_CASES = hostile.catalog_payloads() + hostile.long_payloads(MAX_SECONDS)


def _decode(payload: hostile.Payload, max_seconds: float | None = MAX_SECONDS) -> np.ndarray:
    source = payload.open() if payload.stream is not None else payload.data
    return audio.decode(source, max_seconds=max_seconds, name=payload.filename)


def _check_outcome(payload: hostile.Payload) -> str:
    """Decode once; return "rejected" or "accepted" after checking the contract for each."""
    try:
        wave = _decode(payload)
    except AudioError as err:
        assert payload.filename in str(err) or not payload.filename, str(err)
        assert len(str(err)) > len(payload.filename) + 10, "the message must give a reason"
        return "rejected"
    assert payload.expect == hostile.ANY, f"{payload.name} must be refused, got {wave.shape}"
    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size > 0
    assert np.isfinite(wave).all()
    assert wave.size <= MAX_SECONDS * audio.MODEL_SAMPLE_RATE + 1
    return "accepted"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("payload", LIBRARY_CASES, ids=lambda p: p.name)
def test_decode_refuses_or_cleanly_accepts_each_hostile_payload(payload):
    _check_outcome(payload)  # warms the resampler caches so the traced run measures decode only
    tracemalloc.start()
    try:
        _check_outcome(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < DECODE_PEAK_BYTES, f"{payload.name}: decode peaked at {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "name,reason",
    [
        ("empty", "empty"),
        ("random_4k", "could not be decoded"),
        ("wav_zero_channels", "could not be decoded"),
        ("wav_rate_1hz", "sample rate of 1 Hz"),
        ("wav_rate_10mhz", "sample rate of 10000000 Hz"),
        ("flac_rate_1hz", "sample rate of 1 Hz"),
        ("wav_float_nan", "NaN or infinite"),
        ("wav_double_inf", "NaN or infinite"),
        ("wav_silent", "silent"),
        ("zip_archive", "could not be decoded"),
        ("png_image", "could not be decoded"),
        ("html_page", "could not be decoded"),
        ("wav_header_no_data", "no audio samples"),
    ],
)
def test_each_refusal_says_why(name, reason):
    payload = next(p for p in hostile.catalog_payloads() if p.name == name)
    with pytest.raises(AudioError, match=reason):
        _decode(payload)


@pytest.mark.timeout(60)
def test_hour_long_stream_is_refused_from_the_first_minute():
    """An hour of audio (115 MB) is refused after reading at most the limit, from a stream
    that never exists in memory; its header alone already tells the duration."""
    payload = hostile.hour_long_wav()
    assert audio.info_seconds(payload.open()) == hostile.HOUR_SECONDS
    f = payload.open()
    with pytest.raises(AudioError, match=f"longer than the limit of {MAX_SECONDS:g} s"):
        audio.decode(f, max_seconds=MAX_SECONDS, name="hour.wav")
    assert f.tell() < 4 * MAX_SECONDS * hostile.HOUR_RATE * 2, "read far past the limit"


@pytest.mark.timeout(300)
@FUZZ
@given(payload=hostile.payload_strategy())
def test_decode_fuzz(payload):
    _check_outcome(payload)
