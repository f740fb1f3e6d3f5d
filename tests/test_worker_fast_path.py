"""The inference worker's fast paths (issue 16): the 16-bit PCM WAV decoder gives the
same samples and the same refusals as `faultsense.audio.decode`, and a request's phases
come out of its stamps in order (the request path itself: tests/test_channel.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from faultsense.audio import _pcm16_frames, decode
from faultsense.errors import AudioError
from serving.channel import NO_STAMPS
from serving.worker import PHASES, STAMPS, phases

RATE = 16_000


def wav(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def outcome(fn, data: bytes, max_seconds: float | None) -> np.ndarray | str:
    try:
        return fn(data, sample_rate=RATE, max_seconds=max_seconds, name="clip.wav")
    except AudioError as err:
        return f"AudioError: {err}"


rng = np.random.default_rng(0)
MONO = wav(rng.uniform(-1, 1, 8000).astype(np.float32))
CASES = {
    "mono": (MONO, True),
    "stereo": (wav(rng.uniform(-1, 1, (8001, 2)).astype(np.float32)), True),
    "three channels": (wav(rng.uniform(-1, 1, (4000, 3)).astype(np.float32)), True),
    "silent": (wav(np.zeros(4000, np.float32)), True),
    "no samples": (wav(np.zeros(0, np.float32)), True),
    "too long": (wav(rng.uniform(-1, 1, 3 * RATE).astype(np.float32)), True),
    "other rate": (wav(rng.uniform(-1, 1, 8000).astype(np.float32), 8000), False),
    "float wav": (wav(rng.uniform(-1, 1, 8000).astype(np.float32), subtype="FLOAT"), False),
    "24-bit": (wav(rng.uniform(-1, 1, 8000).astype(np.float32), subtype="PCM_24"), False),
    "truncated": (MONO[:-101], False),
    "trailing chunk": (MONO + b"LIST\x04\x00\x00\x00abcd", False),
    "not audio": (b"RIFF\x00\x00\x00\x00WAVEjunk" * 4, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_wav_decode_matches_decode(case):
    data, fast = CASES[case]
    assert (_pcm16_frames(data, RATE) is not None) == fast
    for max_seconds in (2.0, None):
        # A file object always goes through libsndfile; the same bytes take the fast path.
        expected = outcome(lambda d, **kw: decode(io.BytesIO(d), **kw), data, max_seconds)
        got = outcome(decode, data, max_seconds)
        if isinstance(expected, str) or isinstance(got, str):
            assert got == expected
        else:
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, expected)


def test_phases_follow_the_stamps():
    stamps = (1.000, 1.002, 1.003, 1.004, 1.006, 1.016, 1.017)  # as in STAMPS
    assert len(stamps) == len(STAMPS)
    spent = phases(0.999, 1.000, stamps, 1.020)
    assert list(spent) == list(PHASES)
    expected = [1, 2, 1, 1, 2, 10, 1, 3]  # read queue wait decode batch model encode back
    assert list(spent.values()) == pytest.approx(expected, abs=1e-6)
    # An answer no worker stamped (a lost request's 504) still has a stamp per stage.
    assert len(NO_STAMPS) == len(STAMPS)
