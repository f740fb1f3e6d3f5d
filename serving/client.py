"""`ServerClient`, the app's HTTP client of the FaultSense server (docs/INTERNALS.md,
HTTP API), and its errors: `ServerError` when the server answered with a refusal (4xx/5xx),
`ServerUnreachable` when it did not answer at all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from faultsense.errors import FaultSenseError

# The server's prediction log records where a prediction came from.
SOURCE_HEADER = {"X-FaultSense-Source": "app"}


class ServerError(FaultSenseError):
    """The FaultSense server refused a request; `str()` says what and what to do next.

    `status` is the HTTP status (None when there was no answer) and `body` its parsed
    JSON, which can still carry useful fields (e.g. the running job's id on a 409).
    """

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ServerUnreachable(ServerError):
    """The FaultSense server did not answer: down, unreachable, or too slow."""


class ServerClient:
    """Thin HTTP client for the FaultSense server API; every method returns parsed JSON
    or raises ServerError / ServerUnreachable."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The parsed JSON answer (its text when it is not JSON)."""
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            return response.text

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """The httpx response to `method path`; ServerError for a refusal."""
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerUnreachable(
                f"The FaultSense server at {self.url} did not answer {method} {path} in time."
            ) from None
        except httpx.HTTPError as err:
            raise ServerUnreachable(
                f"The FaultSense server at {self.url} is not reachable ({type(err).__name__}). "
                "Start it with `make serve` (or `make demo`), or point the app at it with "
                "server_url=... / FAULTSENSE_SERVER_URL."
            ) from None
        if response.status_code >= 400:
            raise ServerError(
                refusal_message(method, path, response),
                response.status_code,
                _json_or_none(response),
            )
        return response

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/status")

    def predict(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as f:
            return self._request(
                "POST", "/predict", files={"file": (path.name, f)}, headers=SOURCE_HEADER
            )

    def upload(self, paths: Sequence[str | Path], label: str) -> dict[str, Any]:
        files = [("files", (Path(p).name, Path(p).read_bytes())) for p in paths]
        return self._request("POST", "/upload", files=files, data={"label": label})

    def start_retrain(self, epochs: int | None = None, force: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"force": bool(force)}
        if epochs:
            body["epochs"] = int(epochs)
        return self._request("POST", "/retrain", json=body)

    def retrain_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/retrain/{job_id}")

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/models")

    def promote(self, version: str) -> dict[str, Any]:
        return self._request("POST", f"/models/{version}/promote")

    def rollback(self, version: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST", "/models/rollback", json={"version": version} if version else {}
        )

    def monitor(self) -> dict[str, Any]:
        """The prediction log's recent history and the drift state (GET /monitor)."""
        return self._request("GET", "/monitor")

    def label_queue(self) -> dict[str, Any]:
        """The low-confidence predictions waiting for a label (GET /monitor/queue)."""
        return self._request("GET", "/monitor/queue")

    def queued_audio(self, item_id: str) -> bytes:
        """The stored clip of a queued prediction, as it was sent."""
        return self._send("GET", f"/monitor/queue/{quote(item_id, safe='')}/audio").content

    def label_queued(self, item_id: str, label: str) -> dict[str, Any]:
        """Label a queued clip: the server stores it as an upload with `label`."""
        path = f"/monitor/queue/{quote(item_id, safe='')}/label"
        return self._request("POST", path, json={"label": label})

    def dismiss_queued(self, item_id: str) -> dict[str, Any]:
        """Take a clip out of the labelling queue without labelling it."""
        return self._request("POST", f"/monitor/queue/{quote(item_id, safe='')}/dismiss")

    def insights(self) -> dict[str, Any] | None:
        """The current model's training report, or None when the server has no such route."""
        try:
            return self._request("GET", "/insights")
        except ServerError as err:
            if err.status == 404:
                return None
            raise


def refusal_message(method: str, path: str, response: Any) -> str:
    """What the user reads when the server refused `method path` (an httpx response)."""
    reason = _error_text(response)
    if response.status_code in (401, 403):
        return (
            f"The server refused {method} {path} ({response.status_code}): {reason}. "
            "Set FAULTSENSE_API_KEY for the app to the server's key."
        )
    return f"The server refused {method} {path} ({response.status_code}): {reason}"


def _json_or_none(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_text(response: Any) -> str:
    """The server's own reason: its `error`/`detail` field, FastAPI's validation list
    joined, or the start of a non-JSON body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("error") or body.get("detail") or body
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(
                str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail
            )
        return str(detail)
    return str(body)
