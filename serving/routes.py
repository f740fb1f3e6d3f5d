"""The server's MLOps routes, one module-level function each, on one FastAPI `APIRouter`:
status, models (list, promote, rollback), insights, uploads, retraining, and monitoring
(`/metrics` for Prometheus, `/monitor` for the prediction log and drift, `/monitor/queue`
for labelling the low-confidence predictions whose audio was kept).

A route gets the server's shared state as a `ServerContext` (settings, registry, upload
store, job runner, worker stats, API key) through `Depends(server_context)`; the server
puts that context on `app.state.faultsense` before it mounts `router`. A new route is one
function here. Blocking work (registry, uploads, jobs) runs in the thread pool; errors
are raised (`HTTPError`, `FaultSenseError`) and answered by the server's exception
handlers as `{"error": ...}` with a 4xx. The HTTP contract is in docs/INTERNALS.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from faultsense.data.uploads import UploadStore
from faultsense.errors import FaultSenseError, RegistryError
from faultsense.fileio import display_name
from faultsense.registry import Registry, check_version
from faultsense.taxonomy import validate_label

from .http_helpers import (
    HTTPError,
    check_api_key,
    content_type,
    error_response,
    json_body,
    validated,
)
from .insights import training_report
from .jobs import JobBusyError, JobRunner
from .metrics import StateCollector, exposition, metrics
from .monitor import (
    LabelQueue,
    PredictionLog,
    audio_content_type,
    cached_reference,
    display_id,
    drift_metrics,
    monitor_report,
    queue_item,
)
from .settings import ServeSettings
from .worker import (
    STAT_BATCHES,
    STAT_MAX_BATCH,
    STAT_REJECTED,
    STAT_RELOADS,
    STAT_REQUESTS,
    SharedStats,
)

# Fields of a retrain job shown in /status (the full job is GET /retrain/{job_id}).
RETRAIN_SUMMARY_KEYS = (
    "job_id", "state", "epoch", "max_epochs", "metrics", "decision", "version", "error",
)  # fmt: skip
MODEL_ROW_KEYS = ("version", "created_at", "metrics", "parent_version", "current", "error")
# GET /retrain lists at most this many job ids (the newest).
MAX_LISTED_JOBS = 50


@dataclass
class ServerContext:
    """What the routes share, built once by the server (and inherited by each forked
    HTTP process)."""

    settings: ServeSettings
    registry: Registry
    uploads: UploadStore
    jobs: JobRunner
    stats: SharedStats
    api_key: str | None
    channel: Any = None  # /predict's path to the inference workers (serving/channel.py)
    monitor: PredictionLog | None = None  # the prediction log (serving/monitor.py)
    protect_metrics: bool = False  # auth.protect_metrics: /metrics needs the API key

    def require_key(self, request: Request) -> None:
        """401/403 unless the request carries the API key (when one is configured)."""
        check_api_key(request, self.api_key)


def server_context(request: Request) -> ServerContext:
    """The context the server stored on `app.state.faultsense` (a FastAPI dependency)."""
    return request.app.state.faultsense


Ctx = Annotated[ServerContext, Depends(server_context)]
router = APIRouter()


# -- status and models ------------------------------------------------------------------


@router.get("/status")
async def status(ctx: Ctx) -> JSONResponse:
    """Model, uploads, latest retrain job, serving counters and auth, in one object."""

    def collect() -> dict[str, Any]:
        model = model_summary(ctx.registry)
        return {
            "model": model,
            "uploads": ctx.uploads.counts(model.get("labels") or ()),
            "retrain": retrain_summary(ctx.jobs),
            "serving": serving_summary(ctx.stats, ctx.settings),
            "auth": {
                "api_key_required": ctx.api_key is not None,
                "predict_protected": ctx.settings.protect_predict,
            },
        }

    return JSONResponse(await run_in_threadpool(collect))


@router.get("/models")
async def models(ctx: Ctx) -> JSONResponse:
    """Every registered version, the current one and the promotion history."""

    def collect() -> dict[str, Any]:
        rows = ctx.registry.list()
        return {
            "current": ctx.registry.current_version(),
            "versions": [{k: row.get(k) for k in MODEL_ROW_KEYS if k in row} for row in rows],
            "history": ctx.registry.history(),
        }

    return JSONResponse(await run_in_threadpool(collect))


@router.get("/insights")
async def insights(ctx: Ctx) -> JSONResponse:
    """The current model's training report for the app's Insights tab (serving/insights.py)."""
    bundle = await run_in_threadpool(ctx.registry.current)
    return JSONResponse(await run_in_threadpool(training_report, bundle.meta))


@router.post("/models/{version}/promote")
async def promote(version: str, request: Request, ctx: Ctx) -> JSONResponse:
    """Make a registered version current; 404 when it is not registered."""
    ctx.require_key(request)
    known_version(ctx.registry, version)
    await run_in_threadpool(ctx.registry.promote, version, "promoted through the API")
    metrics().model_switches.labels("promote").inc()
    return JSONResponse({"current": ctx.registry.current_version()})


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = None


@router.post("/models/rollback")
async def rollback(request: Request, ctx: Ctx) -> JSONResponse:
    """Back to `version`, or (empty body) to the previously promoted version."""
    ctx.require_key(request)
    body = validated(RollbackBody, await json_body(request))
    if body.version is not None:
        known_version(ctx.registry, body.version)
    current = await run_in_threadpool(
        ctx.registry.rollback, body.version, "rolled back through the API"
    )
    metrics().model_switches.labels("rollback").inc()
    return JSONResponse({"current": current})


# -- uploads ----------------------------------------------------------------------------


@router.post("/upload")
async def upload(request: Request, ctx: Ctx) -> JSONResponse:
    """Store clips labeled with one of the current model's labels for retraining; 422 for
    another label (naming the known ones), and (same body + error) when none was stored."""
    ctx.require_key(request)
    bundle = await run_in_threadpool(ctx.registry.current)
    label, files = await upload_form(request, ctx.settings, bundle.labels, bundle.version)
    results = [await store_upload(ctx, f, label) for f in files]
    counts = await run_in_threadpool(ctx.uploads.counts, bundle.labels)
    body = {"results": results, "counts": counts}
    if all(r["status"] == "rejected" for r in results):
        message = "No file was stored: " + "; ".join(r["error"] for r in results)
        return error_response(422, message, **body)
    return JSONResponse(body)


# -- retraining -------------------------------------------------------------------------


@router.post("/retrain")
async def retrain(request: Request, ctx: Ctx) -> JSONResponse:
    """Start a retraining job (202 with its id); 409 with the running job's id."""
    ctx.require_key(request)
    s = ctx.settings
    body_model = retrain_body_model(s.retrain_default_epochs, s.retrain_max_epochs)
    body = validated(body_model, await json_body(request))
    try:
        job_id = await run_in_threadpool(ctx.jobs.start, epochs=body.epochs, force=body.force)
    except JobBusyError as e:
        return error_response(409, str(e), job_id=e.job_id)
    return JSONResponse({"job_id": job_id}, status_code=202)


@router.get("/retrain")
async def retrain_jobs(ctx: Ctx) -> JSONResponse:
    """The newest job ids (oldest first) and the running one."""
    ids = await run_in_threadpool(ctx.jobs.job_ids)
    active = await run_in_threadpool(ctx.jobs.active)
    return JSONResponse({"jobs": ids[-MAX_LISTED_JOBS:], "active": active})


@router.get("/retrain/{job_id}")
async def retrain_job(job_id: str, ctx: Ctx) -> JSONResponse:
    """One job's state, decision and log tail; 404 for an unknown id."""
    job = await run_in_threadpool(ctx.jobs.get, job_id)
    if job is None:
        raise HTTPError(404, f"Unknown retraining job {display_name(job_id, 80)!r}.")
    return JSONResponse(job)


# -- monitoring -------------------------------------------------------------------------


@router.get("/metrics")
async def prometheus_metrics(request: Request, ctx: Ctx) -> Response:
    """Prometheus text: every API server's and worker's counters (multiprocess), the
    current model version, retrain jobs and drift. Open like /health unless
    `auth.protect_metrics`."""
    if ctx.protect_metrics:
        ctx.require_key(request)
    plog = ctx.monitor
    drift = (lambda: drift_metrics(plog.settings, *monitor_state(ctx))) if plog else None
    collector = StateCollector(ctx.registry.current_version, ctx.jobs, extra=drift)
    body, content_type = await run_in_threadpool(exposition, collector)
    return Response(body, media_type=content_type)


@router.get("/monitor")
async def monitor(ctx: Ctx) -> JSONResponse:
    """The prediction log's recent history and the current model's drift state."""
    require_monitor(ctx)

    def collect() -> dict[str, Any]:
        settings = ctx.monitor.settings
        bundle, records, reference = monitor_state(ctx, settings.history)
        return monitor_report(records, bundle.version, bundle.labels, reference, settings)

    return JSONResponse(await run_in_threadpool(collect))


@router.get("/monitor/queue")
async def label_queue(
    request: Request, ctx: Ctx, limit: int = Query(100, ge=1, le=1000)
) -> JSONResponse:
    """The low-confidence predictions waiting for a label (newest first, at most `limit`)
    and the labels they can get (the current model's)."""
    ctx.require_key(request)
    queue = monitor_queue(ctx)

    def collect() -> dict[str, Any]:
        bundle = ctx.registry.current()
        ctx.monitor.flush()  # this process's own last predictions are in the answer
        pending = queue.pending()
        return {
            "items": [queue_item(r) for r in pending[:limit]],
            "pending": len(pending),
            "version": bundle.version,
            "labels": bundle.labels,
            "threshold": ctx.monitor.settings.low_confidence,
            "store_audio": ctx.monitor.settings.store_audio,
        }

    return JSONResponse(await run_in_threadpool(collect))


@router.get("/monitor/queue/{item_id}/audio")
async def queued_audio(item_id: str, request: Request, ctx: Ctx) -> Response:
    """The stored clip of a logged prediction, as it was sent; 404 when it is not kept."""
    ctx.require_key(request)
    queue = monitor_queue(ctx)
    record = await run_in_threadpool(queue.record, item_id)
    path = queue.audio_path(record) if record else None
    if path is None:
        raise HTTPError(404, f"No stored audio for prediction {display_id(item_id)}.")
    data = await run_in_threadpool(path.read_bytes)
    return Response(data, media_type=audio_content_type(path))


class QueueLabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: StrictStr = ""


@router.post("/monitor/queue/{item_id}/label")
async def label_queued(item_id: str, request: Request, ctx: Ctx) -> JSONResponse:
    """Label a queued clip: it is stored as an upload with that label (as POST /upload
    stores it) and leaves the queue. 404 unknown id, 409 already resolved, 422 for a label
    the current model does not have (naming its labels) or a clip the store refuses."""
    ctx.require_key(request)
    queue = monitor_queue(ctx)
    await run_in_threadpool(queue.item, item_id)  # 404 before judging the label
    body = validated(QueueLabelBody, await json_body(request))
    bundle = await run_in_threadpool(ctx.registry.current)
    owner = f"of the current model {bundle.version}"
    label = validate_label(body.label, bundle.labels, owner=owner)

    def store() -> dict[str, Any]:
        with queue.lock():  # one resolution per item, across API server processes
            record = queue.item(item_id)
            path = queue.audio_path(record)
            name = display_name(
                record.get("filename") or path.name, ctx.settings.max_filename_chars
            )
            result = store_clip(ctx, path.read_bytes(), name, label)
            if result["status"] == "rejected":
                raise HTTPError(422, f"The clip was not stored: {result['error']}")
            queue.resolve(item_id, "labelled", label=label, sha256=result["sha256"])
        return {"id": item_id, "state": "labelled", "upload": result,
                "counts": ctx.uploads.counts(bundle.labels)}  # fmt: skip

    return JSONResponse(await run_in_threadpool(store))


@router.post("/monitor/queue/{item_id}/dismiss")
async def dismiss_queued(item_id: str, request: Request, ctx: Ctx) -> JSONResponse:
    """Take a clip out of the queue without labelling it; 404 unknown id, 409 resolved."""
    ctx.require_key(request)
    queue = monitor_queue(ctx)

    def dismiss() -> dict[str, Any]:
        with queue.lock():
            queue.item(item_id)
            queue.resolve(item_id, "dismissed")
        return {"id": item_id, "state": "dismissed"}

    return JSONResponse(await run_in_threadpool(dismiss))


def require_monitor(ctx: ServerContext) -> PredictionLog:
    """The prediction log; 404 when monitoring is off."""
    if ctx.monitor is None:
        raise HTTPError(404, "Prediction monitoring is not configured on this server.")
    return ctx.monitor


def monitor_queue(ctx: ServerContext) -> LabelQueue:
    """The labelling queue over the prediction log; 404 when monitoring is off."""
    return LabelQueue(require_monitor(ctx))


def monitor_state(ctx: ServerContext, limit: int | None = None) -> tuple[Any, list, dict]:
    """The current bundle, the log's newest `limit` records (default: the drift window)
    and the bundle's drift reference."""
    bundle = ctx.registry.current()
    if ctx.monitor is None:
        return bundle, [], {}
    ctx.monitor.flush()  # this process's own last predictions are in the answer
    settings = ctx.monitor.settings
    records = ctx.monitor.records(limit or settings.window * 4)
    return bundle, records, cached_reference(str(ctx.settings.registry_dir), bundle.version)


# -- helpers ----------------------------------------------------------------------------


def model_summary(registry: Registry) -> dict[str, Any]:
    """The current bundle's version, metrics and lineage; `error` when there is none."""
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


def retrain_summary(jobs: JobRunner) -> dict[str, Any]:
    """The latest job's state and outcome, or `{"state": "idle"}` when none ran."""
    job = jobs.latest()
    if job is None:
        return {"state": "idle", "job_id": None}
    return {k: job.get(k) for k in RETRAIN_SUMMARY_KEYS}


def serving_summary(stats: SharedStats, settings: ServeSettings) -> dict[str, Any]:
    """The workers' counters, their devices and the batching settings."""
    values = stats.counts()
    requests, batches, rejected = (
        values[STAT_REQUESTS], values[STAT_BATCHES], values[STAT_REJECTED],
    )  # fmt: skip
    return {
        "requests": requests,
        "batches": batches,
        "rejected": rejected,
        "max_batch_size_seen": values[STAT_MAX_BATCH],
        "mean_batch_size": round((requests - rejected) / batches, 3) if batches else 0.0,
        "reloads": values[STAT_RELOADS],
        "max_batch_size": settings.max_batch_size,
        "batch_timeout": settings.batch_timeout,
        "workers": settings.workers_per_device,
        "devices": stats.devices(),
        "api_servers": settings.num_api_servers,
    }


def known_version(registry: Registry, version: str) -> str:
    """`version` when it is registered: 4xx (RegistryError) when it is not shaped like
    v<N>, 404 when no such version exists."""
    check_version(version)
    if version not in registry.versions():
        raise HTTPError(404, f"Model version {version} is not registered.")
    return version


@functools.cache
def retrain_body_model(default_epochs: int, max_epochs: int) -> type[BaseModel]:
    """The POST /retrain body: strict types, only these fields, epochs within the
    operator's bounds (one model per pair of bounds)."""

    class RetrainBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epochs: StrictInt = Field(default=default_epochs, ge=1, le=max_epochs)
        force: StrictBool = False

    return RetrainBody


async def upload_form(
    request: Request, settings: ServeSettings, labels: Sequence[str], version: str
) -> tuple[str, list[UploadFile]]:
    """The label (one of `labels`, model `version`'s) and the files of a multipart
    /upload request; 4xx naming what is wrong."""
    if content_type(request) != "multipart/form-data":
        raise HTTPError(
            415, "Upload with multipart/form-data: one or more 'files' and a 'label' field."
        )
    form = await request.form(
        max_files=settings.max_files_per_upload, max_fields=settings.max_files_per_upload + 8
    )
    label_field = form.get("label")
    if not isinstance(label_field, str) or not label_field.strip():
        raise HTTPError(
            422, f"Missing form field 'label' (one of {', '.join(labels)}: model {version}'s)."
        )
    label = validate_label(label_field, labels, owner=f"of the current model {version}")
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    files += [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise HTTPError(422, "No files: send one or more multipart fields named 'files'.")
    return label, files


async def store_upload(ctx: ServerContext, file: UploadFile, label: str) -> dict[str, Any]:
    """One uploaded file stored (or found a duplicate, or rejected with the reason)."""
    name = display_name(file.filename or "upload", ctx.settings.max_filename_chars)
    return await run_in_threadpool(store_clip, ctx, await file.read(), name, label)


def store_clip(ctx: ServerContext, data: bytes, name: str, label: str) -> dict[str, Any]:
    """Clip bytes stored as a labeled upload, counted in the uploads metric: the result row
    of /upload (stored, duplicate, or rejected with the reason)."""
    try:
        result = ctx.uploads.add(data, label, name, max_seconds=ctx.settings.max_upload_seconds)
    except FaultSenseError as e:
        metrics().uploads.labels("rejected").inc()
        return {"filename": name, "status": "rejected", "error": str(e)}
    metrics().uploads.labels(result.status).inc()
    return {
        "filename": name,
        "status": result.status,
        "sha256": result.sha256,
        "label": result.label,
        "seconds": result.seconds,
    }
