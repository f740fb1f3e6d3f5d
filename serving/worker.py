"""The inference worker: a LitAPI over the Predictor, and the stats it shares with the
HTTP processes.

Each LitServe worker process holds one Predictor on its device (LitServe hands `setup`
"cpu" or "cuda:<i>"; the net and every batch go there). It decodes audio in
`decode_request`, runs batches of up to `max_batch_size` requests and checks the registry
between batches, so a promote or rollback takes effect on the next batch with no failed
request. Bad input never poisons a batch: a request whose audio cannot be decoded is
answered with a 4xx while the others in its batch are served.

Torch is imported in `setup` only: the HTTP processes import this module too.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import litserve as ls

from faultsense.errors import FaultSenseError

from .http_helpers import dumps, error_status
from .settings import ServeSettings

if TYPE_CHECKING:
    import numpy as np

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


class FaultSenseAPI(ls.LitAPI):
    """LitAPI over the Predictor. Payload (built by the /predict route):
    `{"audio": bytes, "name": str}` -> `(status, json_bytes)`."""

    def __init__(self, settings: ServeSettings, stats: SharedStats | None = None) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path="/predict",
        )
        self.settings = settings
        # The server attaches the stats once LitServe has resolved the devices (one slot
        # per worker), before the workers start.
        self.stats = stats if stats is not None else SharedStats(1)
        self._next_check = 0.0

    def setup(self, device: Any) -> None:
        import numpy as np
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
            self.settings.registry_dir, device=torch_device(device)
        )
        # Warm up the kernels so the first real request is not the slow one.
        self.predictor.predict([np.zeros(self.predictor.clip_samples, dtype=np.float32) + 1e-3])
        # LitServe sets LITSERVE_WORKER_ID in each worker before calling setup.
        worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self.stats.set_device(worker_id, self.predictor.device)
        log.info("Worker ready on %s with model %s", self.predictor.device, self.predictor.version)

    def decode_request(self, request: dict) -> np.ndarray | Rejected:
        from faultsense.audio import decode

        try:
            return decode(
                request["audio"],
                sample_rate=self.predictor.sample_rate,
                max_seconds=self.settings.max_predict_seconds,
                name=request.get("name") or "audio",
            )
        except FaultSenseError as err:
            return Rejected(error_status(err), str(err))

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, x: Any) -> Any:
        single = not isinstance(x, list)
        items = [x] if single else x
        self._maybe_reload()
        good = [i for i, item in enumerate(items) if not isinstance(item, Rejected)]
        outputs: list[Any] = list(items)
        if good:
            try:
                results = self.predictor.predict([items[i] for i in good])
            except Exception:
                # Isolate the culprit instead of failing everyone in the batch.
                results = [self._predict_one(items[i]) for i in good]
            for i, result in zip(good, results, strict=True):
                if isinstance(result, dict):
                    result["batch_size"] = len(good)
                outputs[i] = result
        self.stats.record_batch(len(items), len(good))
        return outputs[0] if single else outputs

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: Any) -> tuple[int, bytes]:
        if isinstance(output, Rejected):
            return output.status, dumps({"error": output.message})
        return 200, dumps(output)

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


def torch_device(device: Any) -> str:
    """LitServe's device for a worker ("cpu", "cuda:0", or a list of them) as one torch
    device string: the first when a worker is given several."""
    if isinstance(device, list | tuple):
        device = device[0] if device else None
    return str(device or "cpu")
