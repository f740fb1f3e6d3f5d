"""FaultSense HTTP server: one LitServer over the registry's current model, plus the
MLOps routes (uploads, retraining, model switching).

    faultsense-serve                          # http://127.0.0.1:8000
    faultsense-serve host=0.0.0.0 port=8123 server.max_batch_size=16

Process layout (LitServe): `server.num_api_servers` uvicorn processes parse HTTP and run
the extra routes; `server.workers_per_device` inference workers each hold a Predictor,
decode audio (`decode_request`), run batches of up to `max_batch_size` requests and
check the registry between batches, so a promote or rollback takes effect on the next
batch with no failed request. Bad input never poisons a batch: a request whose audio
cannot be decoded is answered with a 4xx while the others in its batch are served.

Routes are listed in docs/INTERNALS.md (the HTTP contract). Every error is JSON
`{"error": "<what was wrong>"}` with a 4xx status; a 5xx is a bug.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import litserve as ls
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig

from faultsense import CONFIG_DIR
from faultsense.errors import (
    AudioError,
    ConfigError,
    DataError,
    FaultSenseError,
    LabelError,
    ModelError,
    RegistryError,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("faultsense.serve")

ALLOWED_HOSTS = ("127.0.0.1", "0.0.0.0", "::")
RAW_AUDIO_TYPES = ("audio/", "application/octet-stream")
# Counters shared by the inference workers and read by /status (int64 slots).
STAT_REQUESTS, STAT_BATCHES, STAT_MAX_BATCH, STAT_REJECTED, STAT_RELOADS = range(5)
STAT_SLOTS = 5


class HTTPError(FaultSenseError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_ERROR_STATUS: dict[type[FaultSenseError], int] = {
    AudioError: 422,
    LabelError: 422,
    ConfigError: 422,
    DataError: 400,
    RegistryError: 409,
    ModelError: 409,
}


def error_status(err: FaultSenseError) -> int:
    """HTTP status for a library error (always a 4xx)."""
    if isinstance(err, HTTPError):
        return err.status
    for cls, status in _ERROR_STATUS.items():
        if isinstance(err, cls):
            return status
    return 400


def safe_name(filename: Any, limit: int = 200) -> str:
    """A client file name reduced to printable text for messages; never used as a path."""
    text = unicodedata.normalize("NFC", str(filename or ""))
    text = "".join(ch for ch in text if ch.isprintable())
    text = text.replace("\\", "/").rsplit("/", 1)[-1].strip() or "upload"
    return text[:limit]


@dataclass
class ServeSettings:
    """The plain values the server and its workers need (pickled into the workers)."""

    registry_dir: str
    uploads_dir: str
    jobs_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    access_log: bool = False
    accelerator: str = "cpu"
    devices: int | str = "auto"
    workers_per_device: int = 1
    num_api_servers: int = 2
    torch_threads: int = 1
    max_batch_size: int = 32
    batch_timeout: float = 0.005
    request_timeout: float = 60.0
    reload_check_s: float = 0.0
    restart_workers: bool = True
    max_request_bytes: int = 25 * 2**20
    max_upload_request_bytes: int = 100 * 2**20
    max_predict_seconds: float = 600.0
    max_upload_seconds: float = 60.0
    max_files_per_upload: int = 32
    max_filename_chars: int = 200
    api_key_env: str = "FAULTSENSE_API_KEY"
    protect_predict: bool = False
    retrain_default_epochs: int = 5
    retrain_max_epochs: int = 50
    retrain_timeout_s: float = 3600.0
    retrain_log_tail_lines: int = 40
    retrain_overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ServeSettings:
        from omegaconf import OmegaConf

        c = OmegaConf.to_container(cfg, resolve=True)
        s, lim, auth, rt = c["server"], c["limits"], c["auth"], c["retrain"]
        return cls(
            registry_dir=str(c["paths"]["registry_dir"]),
            uploads_dir=str(c["paths"]["uploads_dir"]),
            jobs_dir=str(c["jobs_dir"]),
            host=str(c["host"]),
            port=int(c["port"]),
            log_level=str(c.get("log_level", "warning")),
            access_log=bool(c.get("access_log", False)),
            accelerator=str(s["accelerator"]),
            devices=s["devices"],
            workers_per_device=int(s["workers_per_device"]),
            num_api_servers=int(s["num_api_servers"]),
            torch_threads=int(s["torch_threads"]),
            max_batch_size=int(s["max_batch_size"]),
            batch_timeout=float(s["batch_timeout"]),
            request_timeout=float(s["request_timeout"]),
            reload_check_s=float(s["reload_check_s"]),
            restart_workers=bool(s.get("restart_workers", True)),
            max_request_bytes=int(lim["max_request_bytes"]),
            max_upload_request_bytes=int(lim["max_upload_request_bytes"]),
            max_predict_seconds=float(lim["max_predict_seconds"]),
            max_upload_seconds=float(lim["max_upload_seconds"]),
            max_files_per_upload=int(lim["max_files_per_upload"]),
            max_filename_chars=int(lim["max_filename_chars"]),
            api_key_env=str(auth["api_key_env"]),
            protect_predict=bool(auth["protect_predict"]),
            retrain_default_epochs=int(rt["default_epochs"]),
            retrain_max_epochs=int(rt["max_epochs"]),
            retrain_timeout_s=float(rt["timeout_s"]),
            retrain_log_tail_lines=int(rt["log_tail_lines"]),
            retrain_overrides=[str(o) for o in rt.get("overrides") or []],
        )

    def validate(self) -> None:
        if self.host not in ALLOWED_HOSTS:
            raise ConfigError(
                f"host={self.host!r} is not supported by LitServe; use one of {', '.join(ALLOWED_HOSTS)}."
            )
        if not 1024 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} must be between 1024 and 65535.")
        if self.max_batch_size < 1 or self.workers_per_device < 1 or self.num_api_servers < 1:
            raise ConfigError(
                "server.max_batch_size, workers_per_device and num_api_servers must be >= 1."
            )
        if (
            self.retrain_max_epochs < 1
            or not 1 <= self.retrain_default_epochs <= self.retrain_max_epochs
        ):
            raise ConfigError("retrain.default_epochs must be between 1 and retrain.max_epochs.")


# -- inference worker -----------------------------------------------------------------


@dataclass
class _Rejected:
    """A request whose audio could not be used; answered with a 4xx, never predicted."""

    status: int
    message: str


class FaultSenseAPI(ls.LitAPI):
    """LitAPI over the Predictor. Payload (built by the /predict route):
    `{"audio": bytes, "name": str}` -> `(status, json_bytes)`."""

    def __init__(self, settings: ServeSettings, stats: Any) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path="/predict",
        )
        self.settings = settings
        self.stats = stats
        self._next_check = 0.0

    def setup(self, device: str) -> None:
        import torch

        from faultsense.inference import Predictor

        if not logging.getLogger().handlers:  # a spawned worker starts with no logging config
            logging.basicConfig(
                level=self.settings.log_level.upper(),
                format="%(asctime)s %(levelname)s %(name)s [worker]: %(message)s",
            )
        # One thread per worker: the uvicorn processes and other workers need the other cores.
        torch.set_num_threads(max(1, self.settings.torch_threads))
        kwargs = {}
        if "device" in inspect.signature(Predictor.from_registry).parameters:
            kwargs["device"] = _torch_device(device)
        self.predictor = Predictor.from_registry(self.settings.registry_dir, **kwargs)
        # Warm up the kernels so the first real request is not the slow one.
        import numpy as np

        self.predictor.predict([np.zeros(self.predictor.clip_samples, dtype=np.float32) + 1e-3])
        log.info("Worker ready on %s with model %s", device, self.predictor.version)

    def decode_request(self, request: dict) -> np.ndarray | _Rejected:
        from faultsense.audio import decode

        try:
            return decode(
                request["audio"],
                sample_rate=self.predictor.sample_rate,
                max_seconds=self.settings.max_predict_seconds,
                name=request.get("name") or "audio",
            )
        except FaultSenseError as err:
            return _Rejected(error_status(err), str(err))

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.settings.reload_check_s
        try:
            if self.predictor.reload_if_changed():
                self._bump(STAT_RELOADS, 1)
                log.info("Worker now serves model %s", self.predictor.version)
        except Exception as err:  # a broken new bundle must not stop serving the old one
            log.error("Keeping model %s: reloading failed: %s", self.predictor.version, err)

    def predict(self, x: Any) -> Any:
        single = not isinstance(x, list)
        items = [x] if single else x
        self._maybe_reload()
        good = [i for i, item in enumerate(items) if not isinstance(item, _Rejected)]
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
        with self.stats.get_lock():
            self.stats[STAT_REQUESTS] += len(items)
            self.stats[STAT_REJECTED] += len(items) - len(good)
            if good:
                self.stats[STAT_BATCHES] += 1
                self.stats[STAT_MAX_BATCH] = max(self.stats[STAT_MAX_BATCH], len(good))
        return outputs[0] if single else outputs

    def _predict_one(self, wave: np.ndarray) -> dict | _Rejected:
        try:
            return self.predictor.predict([wave])[0]
        except FaultSenseError as err:
            return _Rejected(error_status(err), str(err))
        except Exception:
            log.exception("Prediction failed")
            return _Rejected(500, "Internal error while predicting; the server log has details.")

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: Any) -> tuple[int, bytes]:
        if isinstance(output, _Rejected):
            return output.status, _dumps({"error": output.message})
        return 200, _dumps(output)

    def _bump(self, slot: int, n: int) -> None:
        with self.stats.get_lock():
            self.stats[slot] += n


def _torch_device(device: Any) -> str:
    if isinstance(device, list | tuple):
        device = device[0]
    return str(device or "cpu")


def _dumps(obj: Any) -> bytes:
    try:
        import orjson

        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except ImportError:  # pragma: no cover - orjson ships with the environment
        return json.dumps(obj).encode()


# -- body limits ----------------------------------------------------------------------


class BodyLimitMiddleware:
    """Refuse bodies over a per-path byte limit: early from Content-Length, and while
    streaming for bodies that lie about (or omit) their length."""

    def __init__(self, app: Any, *, limits: dict[str, int], default: int) -> None:
        self.app = app
        self.limits = limits
        self.default = default

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = None
        for key, value in scope.get("headers") or []:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                break
        if declared is not None and (declared < 0 or declared > limit):
            message = (
                f"Request body of {declared} bytes is over the limit of {limit} bytes."
                if declared >= 0
                else "Invalid Content-Length header."
            )
            await _send_json(send, 413 if declared >= 0 else 400, {"error": message}, close=True)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPError(413, f"Request body is over the limit of {limit} bytes.")
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Callable, status: int, body: dict, *, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# -- server -----------------------------------------------------------------------------


def build_server(cfg: DictConfig | ServeSettings) -> ls.LitServer:
    """The LitServer with /predict and the extra routes; refuses (RegistryError) when the
    registry has no current version or the current bundle fails its checksum."""
    from faultsense.registry import Registry

    settings = cfg if isinstance(cfg, ServeSettings) else ServeSettings.from_cfg(cfg)
    settings.validate()
    registry = Registry(settings.registry_dir)
    bundle = registry.current()  # RegistryError with a clear message when there is none
    bundle.verify()
    Path(settings.uploads_dir).mkdir(parents=True, exist_ok=True)

    stats = mp.get_context("spawn").Array("q", STAT_SLOTS, lock=True)
    api = FaultSenseAPI(settings, stats)
    # LitServe's default transport (Manager queues) is kept on purpose: pipe-backed
    # multiprocessing queues cost the same CPU per request here, and a worker killed while
    # holding a queue's lock (kill -9, a native crash) would deadlock the restarted one.
    server = ls.LitServer(
        api,
        accelerator=settings.accelerator,
        devices=settings.devices,
        workers_per_device=settings.workers_per_device,
        timeout=settings.request_timeout,
        restart_workers=settings.restart_workers,
        model_metadata={"name": "faultsense", "registry": str(Path(settings.registry_dir))},
        middlewares=[
            (
                BodyLimitMiddleware,
                {
                    "limits": {"/upload": settings.max_upload_request_bytes},
                    "default": settings.max_request_bytes,
                },
            )
        ],
    )
    _install_routes(server, api, settings, registry)
    return server


def _install_routes(
    server: ls.LitServer, api: FaultSenseAPI, settings: ServeSettings, registry: Any
) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute
    from litserve.server import RegularRequestHandler
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.gzip import GZipMiddleware

    from faultsense.data.uploads import UploadStore
    from faultsense.taxonomy import validate_label

    from .jobs import JobBusyError, JobRunner

    app: FastAPI = server.app
    api_key = os.environ.get(settings.api_key_env) or None
    jobs = JobRunner(
        settings.jobs_dir,
        registry_dir=settings.registry_dir,
        uploads_dir=settings.uploads_dir,
        base_overrides=settings.retrain_overrides,
        timeout_s=settings.retrain_timeout_s,
        log_tail_lines=settings.retrain_log_tail_lines,
    )
    uploads = UploadStore(settings.uploads_dir)
    handler = RegularRequestHandler(api, server)
    name_limit = settings.max_filename_chars

    # gzip of ~1 kB JSON costs more CPU than it saves on a LAN; the routes replace LitServe's
    # own /predict so that input parsing and errors are ours.
    app.user_middleware = [m for m in app.user_middleware if m.cls is not GZipMiddleware]
    app.router.routes = [
        r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == "/predict")
    ]

    def err(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        if not given:
            raise HTTPError(401, "Missing X-API-Key header: this route needs the server's API key.")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), api_key.encode("utf-8")):
            raise HTTPError(403, "Invalid API key.")

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"Request body is not valid JSON: {e}") from None
        except RecursionError:  # e.g. 50 000 nested brackets: a 1 kB-cheap attack on the parser
            raise HTTPError(400, "Request body is not valid JSON: nested too deeply.") from None

    # -- errors: always {"error": ...}, never a traceback ----------------------------

    @app.exception_handler(FaultSenseError)
    async def _faultsense_error(request: Request, exc: FaultSenseError) -> JSONResponse:
        return err(error_status(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return err(422, _describe_validation(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("Unhandled error on %s %s: %r", request.method, request.url.path, exc)
        return err(500, "Internal server error; the server log has details.")

    # -- /predict ---------------------------------------------------------------------

    async def read_audio(request: Request) -> tuple[bytes, str]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPError(400, "Multipart body has no file field named 'file'.")
            return await upload.read(), safe_name(upload.filename or "file", name_limit)
        if ctype == "application/json":
            body = await json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("audio_base64"), str):
                raise HTTPError(
                    400, 'JSON body needs "audio_base64": a base64 string of an audio file.'
                )
            name = body.get("filename")
            try:
                data = base64.b64decode(body["audio_base64"], validate=True)
            except (binascii.Error, ValueError):
                raise HTTPError(400, "audio_base64 is not valid base64.") from None
            return data, safe_name(name if isinstance(name, str) else "audio_base64", name_limit)
        if ctype.startswith(RAW_AUDIO_TYPES) or ctype == "":
            return await request.body(), safe_name(
                request.headers.get("x-filename") or "audio", name_limit
            )
        raise HTTPError(
            415,
            f"Unsupported Content-Type {ctype!r}: send multipart/form-data with a 'file' field, "
            "raw audio bytes (audio/* or application/octet-stream), or JSON with audio_base64.",
        )

    async def predict(request: Request) -> Response:
        if settings.protect_predict:
            require_key(request)
        data, name = await read_audio(request)
        if not data:
            raise HTTPError(422, f"{name} is empty (0 bytes).")
        status, body = await handler.handle_request({"audio": data, "name": name}, dict)
        return Response(body, status_code=status, media_type="application/json")

    app.add_api_route("/predict", predict, methods=["POST"])

    # -- status and models ------------------------------------------------------------

    def model_summary() -> dict[str, Any]:
        try:
            bundle = registry.current()
        except RegistryError as e:
            return {"version": None, "error": str(e)}
        return {
            "version": bundle.version,
            "metrics": bundle.metrics,
            "created_at": bundle.meta.get("created_at"),
            "parent_version": bundle.meta.get("parent_version"),
            "labels": bundle.labels,
        }

    def retrain_summary() -> dict[str, Any]:
        job = jobs.latest()
        if job is None:
            return {"state": "idle", "job_id": None}
        keys = ("job_id", "state", "epoch", "max_epochs", "metrics", "decision", "version", "error")
        return {k: job.get(k) for k in keys}

    def serving_summary() -> dict[str, Any]:
        with api.stats.get_lock():
            values = list(api.stats[:])
        requests, batches = values[STAT_REQUESTS], values[STAT_BATCHES]
        return {
            "requests": requests,
            "batches": batches,
            "rejected": values[STAT_REJECTED],
            "max_batch_size_seen": values[STAT_MAX_BATCH],
            "mean_batch_size": round((requests - values[STAT_REJECTED]) / batches, 3)
            if batches
            else 0.0,
            "reloads": values[STAT_RELOADS],
            "max_batch_size": settings.max_batch_size,
            "batch_timeout": settings.batch_timeout,
            "workers": settings.workers_per_device,
            "api_servers": settings.num_api_servers,
        }

    @app.get("/status")
    async def status() -> JSONResponse:
        def collect() -> dict[str, Any]:
            return {
                "model": model_summary(),
                "uploads": uploads.counts(),
                "retrain": retrain_summary(),
                "serving": serving_summary(),
                "auth": {
                    "api_key_required": api_key is not None,
                    "predict_protected": settings.protect_predict,
                },
            }

        return JSONResponse(await run_in_threadpool(collect))

    @app.get("/models")
    async def models() -> JSONResponse:
        def collect() -> dict[str, Any]:
            rows = registry.list()
            keep = ("version", "created_at", "metrics", "parent_version", "current", "error")
            return {
                "current": registry.current_version(),
                "versions": [{k: row.get(k) for k in keep if k in row} for row in rows],
                "history": registry.history(),
            }

        return JSONResponse(await run_in_threadpool(collect))

    @app.get("/insights")
    async def insights() -> JSONResponse:
        """The current model's training report for the app's Insights tab (serving/insights.py)."""
        from serving.insights import training_report

        bundle = await run_in_threadpool(registry.current)
        return JSONResponse(await run_in_threadpool(training_report, bundle.meta))

    def known_version(version: str) -> str:
        from faultsense.registry import check_version

        check_version(version)  # RegistryError for anything not shaped like v<N>
        if version not in registry.versions():
            raise HTTPError(404, f"Model version {version} is not registered.")
        return version

    @app.post("/models/{version}/promote")
    async def promote(version: str, request: Request) -> JSONResponse:
        require_key(request)
        known_version(version)
        await run_in_threadpool(registry.promote, version, "promoted through the API")
        return JSONResponse({"current": registry.current_version()})

    class RollbackBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        version: str | None = None

    @app.post("/models/rollback")
    async def rollback(request: Request) -> JSONResponse:
        require_key(request)
        body = _validated(RollbackBody, await json_body(request), ValidationError)
        if body.version is not None:
            known_version(body.version)
        current = await run_in_threadpool(
            registry.rollback, body.version, "rolled back through the API"
        )
        return JSONResponse({"current": current})

    # -- uploads ----------------------------------------------------------------------

    @app.post("/upload")
    async def upload(request: Request) -> JSONResponse:
        require_key(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise HTTPError(
                415, "Upload with multipart/form-data: one or more 'files' and a 'label' field."
            )
        form = await request.form(
            max_files=settings.max_files_per_upload, max_fields=settings.max_files_per_upload + 8
        )
        label_field = form.get("label")
        if not isinstance(label_field, str) or not label_field.strip():
            raise HTTPError(422, "Missing form field 'label' (one of the fault labels).")
        label = validate_label(label_field)
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        files += [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            raise HTTPError(422, "No files: send one or more multipart fields named 'files'.")

        async def store(f: UploadFile) -> dict[str, Any]:
            name = safe_name(f.filename or "upload", name_limit)
            data = await f.read()
            try:
                result = await run_in_threadpool(
                    uploads.add, data, label, name, max_seconds=settings.max_upload_seconds
                )
            except FaultSenseError as e:
                return {"filename": name, "status": "rejected", "error": str(e)}
            return {
                "filename": name,
                "status": result.status,
                "sha256": result.sha256,
                "label": result.label,
                "seconds": result.seconds,
            }

        results = [await store(f) for f in files]
        body = {"results": results, "counts": await run_in_threadpool(uploads.counts)}
        if all(r["status"] == "rejected" for r in results):
            return err(422, "No file was stored: " + "; ".join(r["error"] for r in results), **body)
        return JSONResponse(body)

    # -- retraining -------------------------------------------------------------------

    class RetrainBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epochs: StrictInt = Field(
            default=settings.retrain_default_epochs, ge=1, le=settings.retrain_max_epochs
        )
        force: StrictBool = False

    @app.post("/retrain")
    async def retrain(request: Request) -> JSONResponse:
        require_key(request)
        body = _validated(RetrainBody, await json_body(request), ValidationError)
        try:
            job_id = await run_in_threadpool(jobs.start, epochs=body.epochs, force=body.force)
        except JobBusyError as e:
            return err(409, str(e), job_id=e.job_id)
        return JSONResponse({"job_id": job_id}, status_code=202)

    @app.get("/retrain")
    async def retrain_jobs() -> JSONResponse:
        ids = await run_in_threadpool(jobs.job_ids)
        return JSONResponse({"jobs": ids[-50:], "active": await run_in_threadpool(jobs.active)})

    @app.get("/retrain/{job_id}")
    async def retrain_job(job_id: str) -> JSONResponse:
        job = await run_in_threadpool(jobs.get, job_id)
        if job is None:
            raise HTTPError(404, f"Unknown retraining job {safe_name(job_id, 80)!r}.")
        return JSONResponse(job)


def _validated(model: Any, data: Any, validation_error: type[Exception]) -> Any:
    if not isinstance(data, dict):
        raise HTTPError(422, "Request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except validation_error as e:
        raise HTTPError(422, _describe_validation(e.errors())) from None


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


def serve(cfg: DictConfig | ServeSettings) -> None:
    """Build and run the server until interrupted."""
    settings = cfg if isinstance(cfg, ServeSettings) else ServeSettings.from_cfg(cfg)
    server = build_server(settings)
    key_note = (
        "API key required for mutating routes"
        if os.environ.get(settings.api_key_env)
        else (f"no {settings.api_key_env} set: mutating routes are open")
    )
    log.warning("FaultSense serving on http://%s:%d (%s)", settings.host, settings.port, key_note)
    _stop_on_sigterm()
    server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=settings.num_api_servers,
        log_level=settings.log_level,
        generate_client_file=False,
        access_log=settings.access_log,
    )


def _stop_on_sigterm() -> None:
    """Make SIGTERM (kill, systemd, docker stop) shut down like Ctrl-C. LitServe stops its
    uvicorn and inference processes only on KeyboardInterrupt; on a bare SIGTERM the main
    process died and left them running, still bound to the port."""
    import signal

    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child that inherited this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    """`faultsense-serve`: serve the registry's current model (config: configs/serve.yaml)."""
    try:
        serve(cfg)
    except FaultSenseError as e:
        print(f"faultsense-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # LitServe: a worker failed to start (its log says why)
        print(f"faultsense-serve: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
