"""The inference worker: a LitAPI over the Predictor, and the stats it shares with the
HTTP processes.

Each LitServe worker process holds one Predictor on its device (LitServe hands `setup`
"cpu" or "cuda:<i>"; the net and every batch go there). It decodes audio in
`decode_request`, runs batches of up to `max_batch_size` requests and checks the registry
between batches, so a promote or rollback takes effect on the next batch with no failed
request. Bad input never poisons a batch: a request whose audio cannot be decoded is
answered with a 4xx while the others in its batch are served.

Batching (`DrainingBatchLoop`): a free worker takes the first queued request and
everything queued behind it (up to `max_batch_size`) without waiting for more, so a
request that arrives alone is served at once and batches grow with the load. Each
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
from queue import Empty
from typing import Any

import litserve as ls
import numpy as np
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop

from faultsense.audio import decode
from faultsense.errors import FaultSenseError

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
    """A request whose audio could not be used; answered with a 4xx, never predicted."""

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


class Payload(dict):
    """A /predict request on its way to a worker: `{"audio": bytes, "name": str,
    "t_submit": float}`. A dict whose repr is one short line: LitServe's request handler
    formats `f"Handling request: {request}"` for a debug log line on every request, even
    with debug logging off, and the repr of 160 kB of bytes cost ~15% of an HTTP
    process's CPU (py-spy, issue 16)."""

    def __repr__(self) -> str:
        audio = self.get("audio")
        return f"<predict request {self.get('name')!r}, {len(audio or b'')} bytes>"


@dataclass
class Job:
    """One request inside a worker: its clip (or why it was refused), then its result,
    and the moment it passed each stage."""

    clip: Any  # np.ndarray | Rejected
    stamps: dict[str, float] = field(default_factory=dict)
    result: Any = None  # dict | Rejected, set by predict


class DrainingBatchLoop(BatchedLoop):
    """LitServe's batched loop, with batches made by draining the queue: block for the
    first request, then take what is already queued behind it (up to max_batch_size),
    waiting `batch_timeout` more only when it is > 0. LitServe's own collation polls the
    queue every 1 ms for the whole `batch_timeout`, so a lone request always waited it
    out, and an idle worker kept the queue's manager process busy."""

    def get_batch_requests(self, lit_api: Any, request_queue: Any, transport: Any) -> tuple:
        items = drain_queue(request_queue, lit_api.max_batch_size, lit_api.batch_timeout)
        payloads, timed_out = [], []
        apply_timeout = lit_api.request_timeout not in (-1, False)
        for item, got in items:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, x_enc = item
            # No START message per request (LitServe's loop sends one): it tells the HTTP
            # process which worker holds a request, for LitServe's monitor to fail the
            # in-flight requests of a dead worker, but that monitor runs in the main
            # process and only sees its own (empty) response buffer when the API servers
            # are forked processes, as serve() runs them. Each one cost the worker a
            # Manager round trip (~0.1-0.2 ms) per request.
            if apply_timeout and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
                continue
            if isinstance(x_enc, dict):
                x_enc["t_got"] = got
            payloads.append((response_queue_id, uid, x_enc))
        return payloads, timed_out


# How long an idle worker blocks on the queue per call. Short on purpose: a worker killed
# inside a blocking get leaves the Manager's thread to take the next request and lose it
# (its reply goes to a dead pipe), so the window is this long; 50 idle calls a second
# cost next to nothing (LitServe's own loop polled every 1 ms).
IDLE_WAIT_S = 0.02


def drain_queue(queue: Any, max_items: int, extra_wait: float) -> list[tuple[Any, float]]:
    """(item, perf_counter when taken) for the first item of `queue` (waiting up to
    IDLE_WAIT_S; [] when none came) and those queued behind it, up to `max_items`;
    waits up to `extra_wait` seconds for more once the queue is empty."""
    try:
        items = [(queue.get(timeout=IDLE_WAIT_S), time.perf_counter())]
    except Empty:
        return []
    deadline = time.perf_counter() + max(0.0, extra_wait)
    while len(items) < max_items:
        try:
            item = queue.get_nowait()
        except Empty:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                item = queue.get(timeout=left)
            except Empty:
                break
        items.append((item, time.perf_counter()))
    return items


class FaultSenseAPI(ls.LitAPI):
    """LitAPI over the Predictor. Payload (built by the /predict route):
    `{"audio": bytes, "name": str, "t_submit": perf_counter}` -> `(status, json_bytes,
    stamps)`, stamps as in STAMPS."""

    def __init__(self, settings: ServeSettings, stats: SharedStats | None = None) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path="/predict",
            loop=DrainingBatchLoop() if settings.max_batch_size > 1 else "auto",
        )
        self.settings = settings
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

    def decode_request(self, request: dict) -> Job:
        t0 = time.perf_counter()
        stamps = {"submit": request.get("t_submit", t0), "got": request.get("t_got", t0)}
        stamps["decode0"] = t0
        try:
            clip: Any = decode(
                request["audio"],
                sample_rate=self.predictor.sample_rate,
                max_seconds=self.settings.max_predict_seconds,
                name=request.get("name") or "audio",
            )
        except FaultSenseError as err:
            clip = Rejected(error_status(err), str(err))
        stamps["decode1"] = time.perf_counter()
        return Job(clip, stamps)

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, x: Any) -> Any:
        single = not isinstance(x, list)
        jobs: list[Job] = [x] if single else x
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
        return jobs[0] if single else jobs

    def unbatch(self, output: list) -> list:
        return output

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


# -- decoding ----------------------------------------------------------------------------


def torch_device(device: Any) -> str:
    """LitServe's device for a worker ("cpu", "cuda:0", or a list of them) as one torch
    device string: the first when a worker is given several."""
    if isinstance(device, list | tuple):
        device = device[0] if device else None
    return str(device or "cpu")
