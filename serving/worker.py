"""The inference worker: a LitAPI over the Predictor, and the stats it shares with the
HTTP processes.

Each LitServe worker process holds one Predictor on its device (LitServe hands `setup`
"cpu" or "cuda:<i>"; the net and every batch go there). It decodes audio in
`decode_request`, runs batches of up to `max_batch_size` requests and checks the registry
between batches, so a promote or rollback takes effect on the next batch with no failed
request. Bad input never poisons a batch: a request whose audio cannot be decoded is
answered with a 4xx while the others in its batch are served.

Requests come over the Channel (serving/channel.py), not LitServe's queues: LitServe
starts, sets up and restarts the workers, and `ChannelLoop` runs `serve_once` forever.
Batching: a free worker takes the first queued request and everything queued behind it
(up to `max_batch_size`) without waiting for more, so a request that arrives alone is
served at once and batches grow with the load. Each
request carries `time.perf_counter` stamps (one system-wide clock on Linux) through every
stage; `/predict` can return them as a debug header (`server.debug_timing`).

Torch is imported in `setup` only: the HTTP processes import this module too.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import numpy as np
from litserve.loops.base import LitLoop

from faultsense.audio import decode
from faultsense.errors import FaultSenseError

from .channel import NO_STAMPS, Channel, Request
from .http_helpers import dumps, error_status
from .metrics import record_batch
from .settings import ServeSettings

log = logging.getLogger("faultsense.serve")

# Counters shared by the inference workers and read by /status (int64 slots).
STAT_REQUESTS, STAT_BATCHES, STAT_MAX_BATCH, STAT_REJECTED, STAT_RELOADS = range(5)
STAT_SLOTS = 5
# Bytes kept per worker for its device name ("cpu", "cuda:0", ...).
DEVICE_CHARS = 32


class SharedStats:
    """Counters and each worker's device, in shared memory: written by the inference
    workers, read by /status in the HTTP processes. Made before the workers start (they
    get it pickled with the LitAPI); `num_workers` slots for devices, by LitServe worker id."""

    def __init__(self, num_workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.num_workers = max(1, int(num_workers))
        self.counters = ctx.Array("q", STAT_SLOTS, lock=True)
        self.device_names = ctx.Array("c", self.num_workers * DEVICE_CHARS, lock=True)

    def add(self, slot: int, n: int) -> None:
        with self.counters.get_lock():
            self.counters[slot] += n

    def record_batch(self, requests: int, served: int) -> None:
        """One batch of `requests`, of which `served` reached the model."""
        with self.counters.get_lock():
            self.counters[STAT_REQUESTS] += requests
            self.counters[STAT_REJECTED] += requests - served
            if served:
                self.counters[STAT_BATCHES] += 1
                self.counters[STAT_MAX_BATCH] = max(self.counters[STAT_MAX_BATCH], served)

    def counts(self) -> list[int]:
        """A consistent copy of the counters (index with STAT_*)."""
        with self.counters.get_lock():
            return list(self.counters[:])

    def set_device(self, worker_id: int, device: str) -> None:
        """Record the device worker `worker_id` serves on (a restarted worker overwrites it)."""
        if not 0 <= worker_id < self.num_workers:
            return
        raw = device.encode()[:DEVICE_CHARS].ljust(DEVICE_CHARS, b"\0")
        lo = worker_id * DEVICE_CHARS
        with self.device_names.get_lock():
            self.device_names[lo : lo + DEVICE_CHARS] = raw

    def devices(self) -> list[str | None]:
        """Each worker's device, by worker id; None for a worker not set up yet."""
        with self.device_names.get_lock():
            raw = bytes(self.device_names[:])
        names = [
            raw[i : i + DEVICE_CHARS].rstrip(b"\0").decode(errors="replace")
            for i in range(0, len(raw), DEVICE_CHARS)
        ]
        return [name or None for name in names]


@dataclass
class Rejected:
    """A request that is answered with this status and message, never predicted (a 4xx
    for audio that cannot be used)."""

    status: int
    message: str


# The stages a request's stamps name, in order (`Job.stamps`; perf_counter seconds).
# submit: the HTTP process queued it; got: a worker took it off the queue; decode0/1:
# its audio decoded; model0/1: its batch through the Predictor; encoded: its JSON ready.
STAMPS = ("submit", "got", "decode0", "decode1", "model0", "model1", "encoded")


# The phases of a request's time `phases` reports (ms), in the order they happen.
PHASES = ("read", "queue", "wait", "decode", "batch", "model", "encode", "back")


def phases(arrived: float, read: float, stamps: tuple[float, ...], back: float) -> dict:
    """A request's time by phase in ms, from the HTTP process's stamps (arrived at the
    route, body read, answer back) and the worker's STAMPS: read the body, queue (to a
    worker), wait (for the requests taken before it to decode), decode, batch (the rest
    of its batch decoding), model, encode (its and earlier answers' JSON), back (to the
    HTTP process)."""
    s = dict(zip(STAMPS, stamps, strict=True))
    edges = (
        arrived, read, s["got"], s["decode0"], s["decode1"], s["model0"], s["model1"],
        s["encoded"], back,
    )  # fmt: skip
    return {
        name: round(1000 * (end - start), 3)
        for name, start, end in zip(PHASES, edges[:-1], edges[1:], strict=True)
    }


@dataclass
class Job:
    """One request inside a worker: its clip (or why it was refused), then its result,
    and the moment it passed each stage."""

    clip: Any  # np.ndarray | Rejected
    stamps: dict[str, float] = field(default_factory=dict)
    result: Any = None  # dict | Rejected, set by predict


class ChannelLoop(LitLoop):
    """The worker's loop: LitServe starts, sets up and restarts the worker; the requests
    come from the FaultSenseAPI's Channel (serving/channel.py), not LitServe's queues."""

    def __call__(self, lit_api: Any, *args: Any, **kwargs: Any) -> None:
        while True:
            lit_api.serve_once()


# How long an idle worker waits on the channel per call before serve_once returns (and is
# called again): nothing else needs the worker, and a stop terminates its process.
IDLE_WAIT_S = 1.0


class FaultSenseAPI(ls.LitAPI):
    """LitAPI over the Predictor, serving the requests of its Channel: a Request (audio
    bytes, name, stamps) -> `(status, json_bytes, stamps)` sent back, stamps as in STAMPS."""

    def __init__(
        self, settings: ServeSettings, channel: Channel, stats: SharedStats | None = None
    ) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path="/predict",
            loop=ChannelLoop(),
        )
        self.settings = settings
        self.channel = channel
        # The server attaches the stats once LitServe has resolved the devices (one slot
        # per worker), before the workers start.
        self.stats = stats if stats is not None else SharedStats(1)
        self._next_check = 0.0

    def setup(self, device: Any) -> None:
        import torch

        from faultsense.inference import Predictor

        if not logging.getLogger().handlers:  # a spawned worker starts with no logging config
            logging.basicConfig(
                level=self.settings.log_level.upper(),
                format="%(asctime)s %(levelname)s %(name)s [worker]: %(message)s",
            )
        # One thread per worker: the uvicorn processes and other workers need the other cores.
        torch.set_num_threads(max(1, self.settings.torch_threads))
        reuse_freed_memory()
        self.predictor = Predictor.from_registry(
            self.settings.registry_dir,
            device=torch_device(device),
            runtime=self.settings.runtime,
            onnx_cache=self.settings.onnx_cache_dir or None,
        )
        # Warm up the kernels so the first real request is not the slow one.
        self.predictor.predict([np.zeros(self.predictor.clip_samples, dtype=np.float32) + 1e-3])
        # LitServe sets LITSERVE_WORKER_ID in each worker before calling setup.
        worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self.stats.set_device(worker_id, self.predictor.device)
        log.info(
            "Worker ready on %s with model %s (runtime %s)",
            self.predictor.device,
            self.predictor.version,
            self.predictor.fast_path,
        )

    def serve_once(self) -> None:
        """Take a batch off the channel (the first request and whatever is queued behind
        it, up to max_batch_size: a lone request never waits) and answer each request."""
        requests = self.channel.take(self.max_batch_size, self.batch_timeout, IDLE_WAIT_S)
        if not requests:
            return
        try:
            jobs = self.predict([self.decode_request(request) for request in requests])
            answers = [self.encode_response(job) for job in jobs]
        except Exception:  # predict isolates bad clips; this is a bug, answered as one
            log.exception("A batch failed")
            error = dumps({"error": "Internal error while predicting; the server log has details."})
            answers = [(500, error, NO_STAMPS)] * len(requests)
        self.channel.answer(
            (request, *answer) for request, answer in zip(requests, answers, strict=True)
        )

    def decode_request(self, request: Request) -> Job:
        t0 = time.perf_counter()
        stamps = {"submit": request.t_submit, "got": request.t_got, "decode0": t0}
        clip: Any
        if t0 - request.t_submit > self.settings.request_timeout:
            clip = Rejected(
                504,
                f"The request waited more than {self.settings.request_timeout:g} s for a "
                "worker (the server is overloaded); try again.",
            )
        elif request.audio is None:
            clip = Rejected(503, "The request's audio did not reach a worker; try again.")
        else:
            try:
                clip = decode(
                    request.audio,
                    sample_rate=self.predictor.sample_rate,
                    max_seconds=self.settings.max_predict_seconds,
                    name=request.name or "audio",
                )
            except FaultSenseError as err:
                clip = Rejected(error_status(err), str(err))
        stamps["decode1"] = time.perf_counter()
        return Job(clip, stamps)

    def predict(self, jobs: list[Job]) -> list[Job]:
        self._maybe_reload()
        good = [job for job in jobs if not isinstance(job.clip, Rejected)]
        for job in jobs:
            job.result = job.clip if isinstance(job.clip, Rejected) else None
        t0 = time.perf_counter()
        if good:
            try:
                results = self.predictor.predict([job.clip for job in good])
            except Exception:
                # Isolate the culprit instead of failing everyone in the batch.
                results = [self._predict_one(job.clip) for job in good]
            for job, result in zip(good, results, strict=True):
                if isinstance(result, dict):
                    result["batch_size"] = len(good)
                job.result = result
        t1 = time.perf_counter()
        for job in jobs:
            job.stamps["model0"], job.stamps["model1"] = t0, t1
            job.clip = None  # the waveform is not needed past the model
        self.stats.record_batch(len(jobs), len(good))
        if good:
            record_batch(len(good), t1 - t0)  # Prometheus (serving/metrics.py)
        return jobs

    def encode_response(self, output: Job) -> tuple[int, bytes, tuple[float, ...]]:
        result = output.result
        if isinstance(result, Rejected):
            status, body = result.status, dumps({"error": result.message})
        else:
            status, body = 200, dumps(result)
        output.stamps["encoded"] = time.perf_counter()
        return status, body, tuple(output.stamps.get(k, 0.0) for k in STAMPS)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.settings.reload_check_s
        try:
            if self.predictor.reload_if_changed():
                self.stats.add(STAT_RELOADS, 1)
                log.info("Worker now serves model %s", self.predictor.version)
        except Exception as err:  # a broken new bundle must not stop serving the old one
            log.error("Keeping model %s: reloading failed: %s", self.predictor.version, err)

    def _predict_one(self, wave: np.ndarray) -> dict | Rejected:
        try:
            return self.predictor.predict([wave])[0]
        except FaultSenseError as err:
            return Rejected(error_status(err), str(err))
        except Exception:
            log.exception("Prediction failed")
            return Rejected(500, "Internal error while predicting; the server log has details.")


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory() -> None:
    """Make glibc keep freed big blocks for reuse. A batch allocates arrays of 0.1-1 MB
    (waveforms, frames, spectra): by default each comes from a fresh mmap and its pages
    fault in on first touch, every batch. 2-6% less worker CPU per request at concurrency
    32 (four interleaved bench pairs, experiments/README.md, issue 16). A no-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


# -- decoding ----------------------------------------------------------------------------


def torch_device(device: Any) -> str:
    """LitServe's device for a worker ("cpu", "cuda:0", or a list of them) as one torch
    device string: the first when a worker is given several."""
    if isinstance(device, list | tuple):
        device = device[0] if device else None
    return str(device or "cpu")
