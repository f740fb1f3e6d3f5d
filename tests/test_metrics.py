"""GET /metrics on the real server: Prometheus text that prometheus_client parses, counters
that move with predictions, uploads, refusals and model switches, and one set of numbers
whichever of the two API-server processes answers (workers included)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from faultsense.audio import to_wav_bytes
from faultsense.registry import Registry
from serving.jobs import JOB_FILE, JobRunner
from serving.metrics import StateCollector, decode_reason, exposition
from tests.fixtures.server import LiveServer, start_server

pytestmark = pytest.mark.timeout(600)
N_PREDICTS = 12


def _wav(seed: int, seconds: float = 1.0, rate: int = 16_000) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (100 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return to_wav_bytes(wave.astype(np.float32), rate)


def scrape(client: httpx.Client, **kwargs) -> dict[str, list[tuple[dict, float]]]:
    """/metrics parsed: sample name -> [(labels, value)]."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def server(trained_registry, tmp_path_factory) -> Iterator[LiveServer]:
    """Two API servers, v1 current and a copy of it registered as v2 (not promoted)."""
    root = tmp_path_factory.mktemp("metrics_server")
    registry = Registry(shutil.copytree(trained_registry, root / "models"))
    v1 = registry.get("v1")
    assert registry.register(v1.load_net(), dict(v1.meta), reason="for promote") == "v2"
    extra = ["server.num_api_servers=2", "server.batch_timeout=0.02"]
    with start_server(root, None, extra=extra) as live:
        yield live


def test_metrics_agree_across_api_servers_and_the_worker(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        before = scrape(client)  # open without the API key, like /health
        assert total(before, "faultsense_model_info", version="v1") == 1
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda i: client.post(
                        "/predict", content=_wav(i), headers={"Content-Type": "audio/wav"}
                    ),
                    range(N_PREDICTS),
                )
            )
        assert [a.status_code for a in answers] == [200] * N_PREDICTS
        labels = [a.json()["label"] for a in answers]
        bad = client.post("/predict", content=b"not audio", headers={"Content-Type": "audio/wav"})
        empty = client.post("/predict", content=b"", headers={"Content-Type": "audio/wav"})
        assert (bad.status_code, empty.status_code) == (422, 422)
        # Any API server may answer a scrape: each must see every process's counts.
        scrapes = [scrape(client) for _ in range(6)]
    for after in scrapes:
        assert total(after, "faultsense_predictions_total") == N_PREDICTS
        for label in set(labels):
            assert total(after, "faultsense_predictions_total", label=label, version="v1") == (
                labels.count(label)
            )
        assert total(after, "faultsense_prediction_confidence_count") == N_PREDICTS
        ok = total(after, "faultsense_http_requests_total", route="/predict", status="200")
        assert ok == N_PREDICTS
        assert total(after, "faultsense_http_requests_total", route="/predict", status="422") == 2
        assert total(after, "faultsense_http_request_duration_seconds_count", route="/predict") == (
            N_PREDICTS + 2
        )
        assert total(after, "faultsense_decode_failures_total", reason="undecodable") == 1
        assert total(after, "faultsense_decode_failures_total", reason="empty") == 1
        # Counted by the inference worker: every served request ran in exactly one batch.
        assert total(after, "faultsense_predict_batch_size_sum") == N_PREDICTS
        assert total(after, "faultsense_predict_batch_size_count") >= 1
        assert total(after, "faultsense_predict_model_seconds_count") >= 1
        assert total(after, "faultsense_predict_queue_wait_seconds_count") == N_PREDICTS


def test_counters_move_after_upload_refusal_and_model_switches(server):
    headers = server.headers()
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        before = scrape(client)
        files = [("files", ("a.wav", _wav(100), "audio/wav")), ("files", ("b.wav", b"junk", "x"))]
        stored = client.post("/upload", headers=headers, data={"label": "normal"}, files=files)
        assert stored.status_code == 200, stored.text
        refused = client.post("/upload", data={"label": "normal"}, files=files[:1])
        assert refused.status_code == 401
        assert client.post("/models/v2/promote", headers=headers).status_code == 200
        promoted = scrape(client)
        assert client.post("/models/rollback", headers=headers).json()["current"] == "v1"
        after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("faultsense_uploads_total", result="stored") == 1
    assert moved("faultsense_uploads_total", result="rejected") == 1
    assert moved("faultsense_http_requests_total", route="/upload", status="401") == 1
    assert moved("faultsense_model_switches_total", action="promote") == 1
    assert moved("faultsense_model_switches_total", action="rollback") == 1
    # The model version in use flips with the registry's current pointer.
    assert total(promoted, "faultsense_model_info", version="v2") == 1
    assert "v1" not in {labels["version"] for labels, _ in promoted["faultsense_model_info"]}
    assert [labels["version"] for labels, _ in after["faultsense_model_info"]] == ["v1"]


def test_retrain_jobs_are_counted_by_state_and_duration(tmp_path: Path):
    """The scrape-time collector reads the jobs the server's JobRunner keeps on disk."""
    runner = JobRunner(tmp_path / "jobs", registry_dir=tmp_path, uploads_dir=tmp_path)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    jobs = {
        "20250101T000000-0000000a": ("succeeded", 90),
        "20250101T010000-0000000b": ("failed", 4000),
    }
    for job_id, (state, seconds) in jobs.items():
        (tmp_path / "jobs" / job_id).mkdir(parents=True)
        finished = start + dt.timedelta(seconds=seconds)
        job = {
            "job_id": job_id, "state": state,
            "started_at": start.isoformat(), "finished_at": finished.isoformat(),
        }  # fmt: skip
        (tmp_path / "jobs" / job_id / JOB_FILE).write_text(json.dumps(job))
    text, _ = exposition(StateCollector(lambda: "v3", runner))
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    assert total(samples, "faultsense_retrain_jobs", state="succeeded") == 1
    assert total(samples, "faultsense_retrain_jobs", state="failed") == 1
    assert total(samples, "faultsense_retrain_jobs", state="running") == 0
    assert total(samples, "faultsense_retrain_job_duration_seconds_count") == 2
    assert total(samples, "faultsense_retrain_job_duration_seconds_sum") == 90 + 4000
    assert total(samples, "faultsense_retrain_job_duration_seconds_bucket", le="300.0") == 1
    assert total(samples, "faultsense_model_info", version="v3") == 1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("clip.wav is empty (0 bytes).", "empty"),
        ("x.wav could not be decoded as audio (supported: WAV): bad", "undecodable"),
        ("x.wav is longer than the limit of 600 s; trim it", "too_long"),
        ("x.wav is silent (every sample is zero).", "silent"),
        ("something new", "other"),
    ],
)
def test_decode_failure_reasons_are_a_small_fixed_set(message, reason):
    assert decode_reason(message) == reason
