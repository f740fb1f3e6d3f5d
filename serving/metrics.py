"""The server's Prometheus metrics (`GET /metrics`), correct across every process.

LitServe runs `server.num_api_servers` forked uvicorn processes and spawned inference
workers. Each one counts in its own memory-mapped files (prometheus_client's
multiprocess mode) under one folder made fresh for each server run by
`setup_multiprocess` before any of them starts; `/metrics` in any API server sums the
files of all of them. Values that live on disk (the registry's current version, retrain
jobs) are read when scraped (`StateCollector`), so every process agrees on them.

prometheus_client picks its multiprocess storage when it is first imported, from
`PROMETHEUS_MULTIPROC_DIR`: this module therefore imports it only inside functions, and
`metrics()` builds the metric objects on first use, in the process that uses them.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("faultsense.serve")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
RETRAIN_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400)
RETRAIN_STATES = ("queued", "running", "succeeded", "failed")
# Decode failure reason from the decoder's message (faultsense.audio has no error codes);
# first match wins, so the label set stays small whatever the client sends.
DECODE_REASONS = (
    ("is empty", "empty"),
    ("could not be decoded", "undecodable"),
    ("sample rate", "sample_rate"),
    ("channels", "channels"),
    ("corrupt or truncated", "truncated"),
    ("longer than the limit", "too_long"),
    ("no audio samples", "no_samples"),
    ("NaN or infinite", "non_finite"),
    ("is silent", "silent"),
)


@dataclass(frozen=True)
class Metrics:
    """The metric objects one process records into (see `metrics()`)."""

    http_requests: Any
    http_duration: Any
    queue_wait: Any
    model_seconds: Any
    batch_size: Any
    decode_failures: Any
    predictions: Any
    confidence: Any
    uploads: Any
    model_switches: Any
    model_reloads: Any


@functools.cache
def metrics() -> Metrics:
    """This process's metric objects, made on first use (after the multiprocess folder
    is set, in a forked or spawned process too)."""
    from prometheus_client import Counter, Histogram

    return Metrics(
        http_requests=Counter(
            "faultsense_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["route", "method", "status"],
        ),  # fmt: skip
        http_duration=Histogram(
            "faultsense_http_request_duration_seconds",
            "Time from request to response (for /predict: end to end, queue and model included).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
        ),  # fmt: skip
        queue_wait=Histogram(
            "faultsense_predict_queue_wait_seconds",
            "Time a served /predict request waited in the queue for an inference worker.",
            buckets=LATENCY_BUCKETS,
        ),
        model_seconds=Histogram(
            "faultsense_predict_model_seconds",
            "Model time of one batch (in a worker).",
            buckets=LATENCY_BUCKETS,
        ),  # fmt: skip
        batch_size=Histogram(
            "faultsense_predict_batch_size",
            "Requests per batch that reached the model.",
            buckets=BATCH_BUCKETS,
        ),  # fmt: skip
        decode_failures=Counter(
            "faultsense_decode_failures_total",
            "/predict audio that could not be used, by reason.",
            ["reason"],
        ),  # fmt: skip
        predictions=Counter(
            "faultsense_predictions_total",
            "Predictions served, by label and model version.",
            ["label", "version"],
        ),  # fmt: skip
        confidence=Histogram(
            "faultsense_prediction_confidence",
            "Confidence (top probability) of each prediction.",
            buckets=CONFIDENCE_BUCKETS,
        ),  # fmt: skip
        uploads=Counter(
            "faultsense_uploads_total",
            "Uploaded files, by result (stored, duplicate, rejected).",
            ["result"],
        ),  # fmt: skip
        model_switches=Counter(
            "faultsense_model_switches_total",
            "Promotions and rollbacks through the API.",
            ["action"],
        ),  # fmt: skip
        model_reloads=Counter(
            "faultsense_model_reloads_total",
            "Times an inference worker loaded a new current model.",
        ),
    )


# -- set up and expose ----------------------------------------------------------------


def setup_multiprocess() -> Path:
    """A fresh folder for this server run's metric files, exported as
    PROMETHEUS_MULTIPROC_DIR for every process started after this call (an operator's
    own PROMETHEUS_MULTIPROC_DIR holds the run folders). Call before the processes start."""
    parent = os.environ.get(MULTIPROC_ENV) or None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="faultsense-metrics-", dir=parent))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def cleanup_multiprocess(path: Path) -> None:
    """Remove a run's metric folder (the server stopped) and unset the variable."""
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == str(path):
        del os.environ[MULTIPROC_ENV]


def exposition(*collectors: Any) -> tuple[bytes, str]:
    """The Prometheus text of every process's metrics plus `collectors` (read now), and
    its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    metrics()  # this process's own series exist even before it counted anything
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:  # one process (no serve(), e.g. a library user): its own default registry
        from prometheus_client import REGISTRY

        registry.register(_Collected(REGISTRY.collect))
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class _Collected:
    collect: Callable[[], Iterable[Any]]


class StateCollector:
    """Scrape-time metrics read from disk: the registry's current version
    (`faultsense_model_info`, flips on promote/rollback) and retrain jobs by state and
    duration. `extra` yields more metric families (e.g. the drift gauges)."""

    def __init__(
        self, current_version: Callable[[], str | None], jobs: Any, extra: Callable | None = None
    ) -> None:
        self.current_version = current_version
        self.jobs = jobs
        self.extra = extra

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        info = GaugeMetricFamily(
            "faultsense_model_info", "The registry's current model version (1).", labels=["version"]
        )
        version = self.current_version()
        if version:
            info.add_metric([version], 1)
        yield info
        states, durations = retrain_job_stats(self.jobs)
        by_state = GaugeMetricFamily(
            "faultsense_retrain_jobs", "Retrain jobs on record, by state.", labels=["state"]
        )
        for state in RETRAIN_STATES:
            by_state.add_metric([state], states.get(state, 0))
        yield by_state
        buckets, total = cumulative(durations, RETRAIN_BUCKETS)
        yield HistogramMetricFamily(
            "faultsense_retrain_job_duration_seconds",
            "Wall time of finished retrain jobs.",
            buckets=buckets,
            sum_value=total,
        )
        if self.extra is not None:
            yield from self.extra()


def retrain_job_stats(jobs: Any) -> tuple[dict[str, int], list[float]]:
    """Jobs per state and the durations (s) of the finished ones, from the job runner."""
    states: dict[str, int] = {}
    durations: list[float] = []
    for job_id in jobs.job_ids():
        job = jobs.get(job_id) or {}
        state = str(job.get("state"))
        states[state] = states.get(state, 0) + 1
        seconds = _seconds_between(job.get("started_at"), job.get("finished_at"))
        if seconds is not None:
            durations.append(seconds)
    return states, durations


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        delta = dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)
    except (TypeError, ValueError):
        return None
    return max(0.0, delta.total_seconds())


def cumulative(values: Iterable[float], bounds: Iterable[float]) -> tuple[list, float]:
    """`values` as Prometheus histogram buckets [(le, cumulative count), ..., ("+Inf", n)]
    and their sum."""
    values = sorted(values)
    buckets = [(str(float(b)), sum(1 for v in values if v <= b)) for b in bounds]
    buckets.append(("+Inf", len(values)))
    return buckets, float(sum(values))


# -- recording ------------------------------------------------------------------------


def decode_reason(message: str) -> str:
    """A small fixed label for why audio could not be used (see DECODE_REASONS)."""
    for needle, reason in DECODE_REASONS:
        if needle in message:
            return reason
    return "other"


def record_decode_failure(message: str) -> None:
    metrics().decode_failures.labels(decode_reason(message)).inc()


def record_batch(served: int, seconds: float) -> None:
    """One batch that reached the model (in a worker): its size and model time."""
    m = metrics()
    m.batch_size.observe(served)
    m.model_seconds.observe(seconds)


def record_prediction(result: dict[str, Any], stamps: dict[str, float]) -> None:
    """One prediction served: its label, model version and confidence, and from the
    worker's `stamps` (serving/worker.py STAMPS) its queue wait and its batch's model time."""
    m = metrics()
    m.predictions.labels(str(result.get("label")), str(result.get("version"))).inc()
    m.confidence.observe(float(result.get("confidence") or 0.0))
    if stamps.get("submit") and stamps.get("got"):
        m.queue_wait.observe(max(0.0, stamps["got"] - stamps["submit"]))


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template (never the raw path: bounded labels)
    and status, and times it. Outermost, so body-limit refusals are counted too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            m = metrics()
            m.http_requests.labels(path, method, str(status)).inc()
            m.http_duration.labels(path, method).observe(time.perf_counter() - started)
