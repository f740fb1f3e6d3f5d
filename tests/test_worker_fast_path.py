"""The inference worker's fast paths (issue 16): the 16-bit PCM WAV decoder gives the
same samples and the same refusals as `faultsense.audio.decode`, batches drain the queue
without waiting for more, and a request's phases come out of its stamps in order."""

from __future__ import annotations

import io
import queue

import numpy as np
import pytest
import soundfile as sf

from faultsense.audio import _pcm16_frames, decode
from faultsense.errors import AudioError
from serving.worker import PHASES, STAMPS, Payload, drain_queue, phases

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


def test_drain_takes_what_is_queued_up_to_the_batch_size():
    q: queue.Queue = queue.Queue()
    for i in range(5):
        q.put(i)
    assert [item for item, _ in drain_queue(q, 3, 0.0)] == [0, 1, 2]
    taken = drain_queue(q, 32, 0.0)  # the rest, without waiting to fill a batch
    assert [item for item, _ in taken] == [3, 4]
    assert taken[0][1] <= taken[1][1]  # stamped when taken
    assert q.empty()


def test_drain_of_an_empty_queue_gives_nothing(monkeypatch):
    monkeypatch.setattr("serving.worker.IDLE_WAIT_S", 0.01)
    assert drain_queue(queue.Queue(), 32, 0.0) == []


def test_phases_follow_the_stamps():
    stamps = (1.000, 1.002, 1.003, 1.004, 1.006, 1.016, 1.017)  # as in STAMPS
    assert len(stamps) == len(STAMPS)
    spent = phases(0.999, 1.000, stamps, 1.020)
    assert list(spent) == list(PHASES)
    expected = [1, 2, 1, 1, 2, 10, 1, 3]  # read queue wait decode batch model encode back
    assert list(spent.values()) == pytest.approx(expected, abs=1e-6)


def test_payload_pickles_as_a_dict_with_a_short_repr():
    import pickle

    payload = pickle.loads(pickle.dumps(Payload(audio=b"x" * 200_000, name="a.wav", t_submit=1.0)))
    assert isinstance(payload, dict) and payload["audio"] == b"x" * 200_000
    assert len(repr(payload)) < 80
