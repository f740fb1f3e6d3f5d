"""Locust load test for the FaultSense server: `make loadtest` (headless, CSV to logs/loadtest).

    locust -f serving/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000

Each simulated user posts 5-s 16 kHz WAV clips to /predict (raw bytes mostly, some
multipart and base64 JSON, as real clients mix them) and now and then reads /status.
Set FAULTSENSE_LOADTEST_SECONDS to change the clip length. For throughput figures use
experiments/bench_serve.py (its asyncio client costs the server far less CPU than
Locust's users do on the same machine).
"""

from __future__ import annotations

import base64
import io
import os
import wave

import numpy as np
from locust import FastHttpUser, between, task

SAMPLE_RATE = 16_000
CLIP_SECONDS = float(os.environ.get("FAULTSENSE_LOADTEST_SECONDS", "5"))


def _clip(seed: int) -> bytes:
    """A PCM16 mono WAV: a tone plus noise (no faultsense import: locust workers stay light)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    signal = 0.3 * np.sin(2 * np.pi * (80 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    pcm = (np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)
    return buf.getvalue()


CLIPS = [_clip(i) for i in range(4)]


class PredictUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.i = 0

    def _next(self) -> bytes:
        self.i += 1
        return CLIPS[self.i % len(CLIPS)]

    @task(8)
    def predict_raw(self) -> None:
        self.client.post(
            "/predict",
            data=self._next(),
            headers={"Content-Type": "audio/wav"},
            name="/predict raw",
        )

    @task(1)
    def predict_multipart(self) -> None:
        boundary = "faultsenseboundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
                "Content-Type: audio/wav\r\n\r\n"
            ).encode()
            + self._next()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        self.client.post(
            "/predict",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            name="/predict multipart",
        )

    @task(1)
    def predict_json(self) -> None:
        payload = {"audio_base64": base64.b64encode(self._next()).decode(), "filename": "clip.wav"}
        self.client.post("/predict", json=payload, name="/predict json")

    @task(1)
    def status(self) -> None:
        self.client.get("/status")
