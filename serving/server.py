"""FaultSense HTTP server: one LitServer over the registry's current model, plus the
MLOps routes (uploads, retraining, model switching).

    faultsense-serve                          # http://127.0.0.1:8000
    faultsense-serve host=0.0.0.0 port=8123 server.max_batch_size=16
    faultsense-serve server.accelerator=cuda  # the workers' models and batches on the GPU

Process layout (LitServe): `server.num_api_servers` uvicorn processes parse HTTP and run
the extra routes; `server.workers_per_device` inference workers per device each hold a
Predictor (serving/worker.py); /predict reaches them over a Channel of Unix sockets
(serving/channel.py) instead of LitServe's Manager queues. The server is put together from:

- settings.py      configs/serve.yaml -> validated `ServeSettings`
- worker.py        the LitAPI (decode, batch, predict, hot reload) and the shared stats
- channel.py       the request path between the HTTP processes and the workers
- http_helpers.py  HTTPError and its status, body limits, JSON, API key, reading audio
- routes.py        the MLOps routes on an APIRouter, one function each
- this module      the LitServer, `/predict`, the error handlers, serve and main

Routes are listed in docs/INTERNALS.md (the HTTP contract). Every error is JSON
`{"error": "<what was wrong>"}` with a 4xx status; a 5xx is a bug.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import litserve as ls
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from faultsense import CONFIG_DIR
from faultsense.config import exit_on_user_error
from faultsense.errors import FaultSenseError

from .channel import LOST_AFTER_S, Channel
from .http_helpers import (
    BodyLimitMiddleware,
    HTTPError,
    describe_validation,
    error_response,
    error_status,
    read_audio,
)
from .metrics import (
    RequestMetricsMiddleware,
    cleanup_multiprocess,
    record_decode_failure,
    setup_multiprocess,
)
from .monitor import MonitorSettings, PredictionLog, observe_predict
from .routes import ServerContext, router, server_context
from .settings import ServeSettings, serve_settings
from .worker import STAMPS, FaultSenseAPI, SharedStats, phases

# With server.debug_timing: each /predict answer says where its time went, in ms
# ("read=0.1,queue=0.4,...": serving/worker.py PHASES; experiments/bench_serve.py sums them).
TIMING_HEADER = "x-faultsense-timing"

log = logging.getLogger("faultsense.serve")


def build_server(cfg: Any) -> ls.LitServer:
    """The LitServer with /predict and the extra routes, from the serve config or
    ServeSettings; refuses (RegistryError) when the registry has no current version or
    the current bundle fails its checksum, (ConfigError) when a setting is out of range."""
    from faultsense.registry import Registry

    settings = serve_settings(cfg)
    registry = Registry(settings.registry_dir)
    registry.current().verify()  # RegistryError with a clear message when there is none
    Path(settings.uploads_dir).mkdir(parents=True, exist_ok=True)

    # /predict's requests and answers go over the Channel (serving/channel.py), not
    # LitServe's Manager queues; LitServe runs, restarts and stops the processes.
    channel = Channel.open()
    api = FaultSenseAPI(settings, channel)
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
            ),
            # Last = outermost: it also counts what the body limit refuses.
            (RequestMetricsMiddleware, {}),
        ],
    )
    # One device slot per worker: LitServe runs workers_per_device workers on each device
    # it resolved ("auto" included). The workers start in run(), so they get these stats.
    api.stats = SharedStats(len(server.devices) * settings.workers_per_device)
    ctx = _context(settings, registry, api.stats, channel)
    ctx.monitor = PredictionLog(MonitorSettings.from_settings(settings))
    ctx.protect_metrics = settings.protect_metrics
    _install(server.app, ctx)
    return server


def _context(
    settings: ServeSettings, registry: Any, stats: SharedStats, channel: Channel
) -> ServerContext:
    """The routes' shared state: registry, uploads and jobs as configured, the workers'
    stats and the channel /predict sends its requests over."""
    from faultsense.data.uploads import UploadStore

    from .jobs import JobRunner

    return ServerContext(
        settings=settings,
        registry=registry,
        uploads=UploadStore(settings.uploads_dir),
        jobs=JobRunner(
            settings.jobs_dir,
            registry_dir=settings.registry_dir,
            uploads_dir=settings.uploads_dir,
            base_overrides=settings.retrain_overrides,
            timeout_s=settings.retrain_timeout_s,
            log_tail_lines=settings.retrain_log_tail_lines,
        ),
        stats=stats,
        api_key=os.environ.get(settings.api_key_env) or None,
        channel=channel,
    )


def _install(app: FastAPI, ctx: ServerContext) -> None:
    """Our /predict, error handlers and routes on LitServe's FastAPI app."""
    # gzip of ~1 kB JSON costs more CPU than it saves on a LAN; our /predict replaces
    # LitServe's own so that input parsing and errors are ours.
    app.user_middleware = [m for m in app.user_middleware if m.cls is not GZipMiddleware]
    app.router.routes = [
        r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == "/predict")
    ]
    app.state.faultsense = ctx
    app.add_exception_handler(FaultSenseError, _faultsense_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_api_route("/predict", predict, methods=["POST"])
    app.include_router(router)


async def predict(request: Request) -> Response:
    """POST /predict: audio (multipart, raw bytes or base64 JSON) -> the Predictor's dict
    + `batch_size`, from the batch an inference worker ran it in."""
    ctx = server_context(request)
    if ctx.settings.protect_predict:
        ctx.require_key(request)
    started = time.perf_counter()
    data, name = await read_audio(request, ctx.settings.max_filename_chars)
    if not data:
        record_decode_failure("is empty")
        raise HTTPError(422, f"{name} is empty (0 bytes).")
    read = time.perf_counter()
    # Past request_timeout a worker refuses the request; LOST_AFTER_S more covers one
    # that died holding it.
    wait = ctx.settings.request_timeout + LOST_AFTER_S
    status, body, stamps = await ctx.channel.client().predict(data, name, read, wait)
    # Metrics and the prediction log (serving/monitor.py); never fails the request.
    observe_predict(
        ctx.monitor,
        request,
        status,
        body,
        data=data,
        name=name,
        started=started,
        stamps=dict(zip(STAMPS, stamps, strict=True)),
    )
    headers = None
    if ctx.settings.debug_timing:  # where this request's time went (serving/worker.py PHASES)
        spent = phases(started, read, stamps, time.perf_counter())
        headers = {TIMING_HEADER: ",".join(f"{k}={v}" for k, v in spent.items())}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# -- errors: always {"error": ...}, never a traceback --------------------------------------


async def _faultsense_error(request: Request, exc: FaultSenseError) -> JSONResponse:
    return error_response(error_status(exc), str(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, describe_validation(exc.errors()))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("Unhandled error on %s %s: %r", request.method, request.url.path, exc)
    return error_response(500, "Internal server error; the server log has details.")


# -- running ------------------------------------------------------------------------------


def serve(cfg: Any) -> None:
    """Build and run the server (serve config or ServeSettings) until interrupted."""
    settings = serve_settings(cfg)
    # Before any process that counts starts (the API servers fork, the workers spawn).
    metrics_dir = setup_multiprocess()
    server = build_server(cfg)
    key_note = (
        "API key required for mutating routes"
        if os.environ.get(settings.api_key_env)
        else (f"no {settings.api_key_env} set: mutating routes are open")
    )
    log.warning("FaultSense serving on http://%s:%d (%s)", settings.host, settings.port, key_note)
    _stop_on_sigterm()
    try:
        server.run(
            host=settings.host,
            port=settings.port,
            num_api_servers=settings.num_api_servers,
            log_level=settings.log_level,
            generate_client_file=False,
            access_log=settings.access_log,
        )
    finally:
        server.app.state.faultsense.channel.close()
        cleanup_multiprocess(metrics_dir)


def _stop_on_sigterm() -> None:
    """Make SIGTERM (kill, systemd, docker stop) shut down like Ctrl-C. LitServe stops its
    uvicorn and inference processes only on KeyboardInterrupt; on a bare SIGTERM the main
    process died and left them running, still bound to the port."""
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child that inherited this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: Any) -> None:
    """`faultsense-serve`: serve the registry's current model (config: configs/serve.yaml).
    Exit 2 on a user error (no current model, bad setting), 1 when a worker fails to start."""
    with exit_on_user_error("faultsense-serve"):
        try:
            serve(cfg)
        except RuntimeError as e:  # LitServe: a worker failed to start (its log says why)
            print(f"faultsense-serve: error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
