"""HTTP plumbing shared by the server's routes: the error type and its status, the body
limit middleware, JSON in and out, the API key check, reading audio from a /predict
request and validating a JSON body against a pydantic model.

Every refusal is an `HTTPError` (or a library `FaultSenseError`) that the server's
exception handlers turn into `{"error": "<what was wrong>"}` with a 4xx status.
Nothing here imports torch: this module runs in the HTTP processes. (Not named `http.py`:
`locust -f serving/locustfile.py` puts serving/ on sys.path, where it would shadow the
standard library's `http`.)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from faultsense.errors import (
    AudioError,
    ConfigError,
    DataError,
    FaultSenseError,
    LabelError,
    ModelError,
    RegistryError,
)
from faultsense.fileio import display_name

RAW_AUDIO_TYPES = ("audio/", "application/octet-stream")
API_KEY_HEADER = "x-api-key"


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


# -- JSON -----------------------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """`obj` (numpy values allowed) as JSON bytes."""
    try:
        import orjson

        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except ImportError:  # pragma: no cover - orjson ships with the environment
        return json.dumps(obj).encode()


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    """The one error shape: `{"error": message, **extra}` with `status`."""
    return JSONResponse({"error": message, **extra}, status_code=status)


async def json_body(request: Request) -> Any:
    """The request body parsed as JSON (`{}` when empty); 400 when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"Request body is not valid JSON: {e}") from None
    except RecursionError:  # e.g. 50 000 nested brackets: a 1 kB-cheap attack on the parser
        raise HTTPError(400, "Request body is not valid JSON: nested too deeply.") from None


def validated(model: Any, data: Any) -> Any:
    """`data` (a parsed JSON body) validated by the pydantic `model`; 422 naming the bad
    fields otherwise."""
    if not isinstance(data, dict):
        raise HTTPError(422, "Request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise HTTPError(422, describe_validation(e.errors())) from None


def describe_validation(errors: list[dict]) -> str:
    """Pydantic/FastAPI validation errors as one line: `Invalid request: field: message; ...`."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


# -- requests -------------------------------------------------------------------------


def content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def check_api_key(request: Request, api_key: str | None) -> None:
    """Nothing when no key is configured or the X-API-Key header matches (constant-time
    compare); 401 when the header is missing, 403 when it is wrong."""
    if api_key is None:
        return
    given = request.headers.get(API_KEY_HEADER)
    if not given:
        raise HTTPError(401, "Missing X-API-Key header: this route needs the server's API key.")
    if not hmac.compare_digest(given.encode("utf-8", "replace"), api_key.encode("utf-8")):
        raise HTTPError(403, "Invalid API key.")


async def read_audio(request: Request, name_limit: int) -> tuple[bytes, str]:
    """The audio bytes of a /predict request and a display name for messages, from
    multipart (`file`), JSON (`audio_base64`, `filename`) or a raw audio body."""
    from starlette.datastructures import UploadFile

    ctype = content_type(request)
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPError(400, "Multipart body has no file field named 'file'.")
        return await upload.read(), display_name(upload.filename or "file", name_limit)
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
        return data, display_name(name if isinstance(name, str) else "audio_base64", name_limit)
    if ctype.startswith(RAW_AUDIO_TYPES) or ctype == "":
        name = display_name(request.headers.get("x-filename") or "audio", name_limit)
        return await request.body(), name
    raise HTTPError(
        415,
        f"Unsupported Content-Type {ctype!r}: send multipart/form-data with a 'file' field, "
        "raw audio bytes (audio/* or application/octet-stream), or JSON with audio_base64.",
    )


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
        declared = _declared_length(scope)
        if declared is not None and (declared < 0 or declared > limit):
            message = (
                f"Request body of {declared} bytes is over the limit of {limit} bytes."
                if declared >= 0
                else "Invalid Content-Length header."
            )
            await send_json(send, 413 if declared >= 0 else 400, {"error": message}, close=True)
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


def _declared_length(scope: dict) -> int | None:
    """The Content-Length header of an ASGI scope: None when absent, -1 when not a number."""
    for key, value in scope.get("headers") or []:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def send_json(send: Callable, status: int, body: dict, *, close: bool = False) -> None:
    """Answer a raw ASGI request with a JSON body (for middleware, below FastAPI)."""
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
