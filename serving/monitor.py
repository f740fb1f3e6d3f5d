"""The prediction log and drift: what the server heard, and whether it still looks like
what the model was validated on.

Every prediction served by /predict is appended to `monitor.log_dir/predictions.jsonl`
(one JSON object a line: time, id, model version, label, confidence, probabilities, clip
duration, latency, source; the audio only when `monitor.store_audio` says so). Each API
server process appends from a background thread, a batch of lines per write under a
file lock, then fsync: a crash loses at most the lines not yet written and leaves at
worst a torn last line, which readers skip. The file rotates by size
(`predictions.1.jsonl` ... `predictions.<backups>.jsonl`).

Drift compares the current model's recent predictions (the last `monitor.window`) with
its reference, derived from the bundle (`reference_for`): the label distribution the
model predicted on its validation split (column sums of the val confusion matrix in the
training run's metrics.json) or, when the run recorded none (e.g. a retrained bundle),
the validation split's true label counts from the data manifest. The score is the
population stability index (PSI); `drifting` is PSI >= `monitor.psi_threshold` once the
window holds `monitor.min_predictions`. A confidence PSI is added when the run recorded
a validation confidence histogram (`confidence_histogram.val` in metrics.json).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultsense.confidence import bin_counts
from faultsense.config import utc_now
from faultsense.errors import ConfigError

from .metrics import record_decode_failure, record_prediction
from .settings import ServeSettings

log = logging.getLogger("faultsense.serve")

LOG_NAME = "predictions"
SOURCES = ("api", "app", "cli")
SOURCE_HEADER = "x-faultsense-source"
STORE_AUDIO = ("none", "low_confidence", "all")
# Timeline bucket widths (s): the first that splits the span into <= TIMELINE_BUCKETS.
BUCKET_WIDTHS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
TIMELINE_BUCKETS = 48
PSI_FLOOR = 1e-4  # share given to an empty bin, so PSI stays finite


@dataclass
class MonitorSettings:
    """configs/serve.yaml `monitor:`; defaults match the file."""

    log_dir: str
    max_bytes: int = 5 * 2**20
    backups: int = 4
    store_audio: str = "none"
    window: int = 500
    min_predictions: int = 50
    psi_threshold: float = 0.25
    low_confidence: float = 0.5
    confidence_bins: int = 10
    # Whether the confidence PSI counts toward `drifting` (it is always reported): off
    # where the reference is too small to bin confidences reliably.
    confidence_drift: bool = True
    history: int = 5000

    @classmethod
    def from_settings(cls, serve: ServeSettings) -> MonitorSettings:
        """The serve settings' `monitor:` section (defaults for what it leaves out; the log
        next to the retrain jobs); ConfigError for a value out of range or an unknown key."""
        values = dict(serve.monitor)
        values["log_dir"] = str(values.get("log_dir") or Path(serve.jobs_dir).parent / LOG_NAME)
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"Unknown monitor setting(s): {', '.join(unknown)}.")
        settings = cls(**values)
        if settings.store_audio not in STORE_AUDIO:
            raise ConfigError(f"monitor.store_audio must be one of {', '.join(STORE_AUDIO)}.")
        if min(settings.window, settings.min_predictions, settings.confidence_bins) < 1:
            raise ConfigError("monitor.window, min_predictions and confidence_bins must be >= 1.")
        return settings


# -- the log --------------------------------------------------------------------------


# How long the writer thread gathers records before one write + fsync.
WRITE_INTERVAL_S = 0.25


class PredictionLog:
    """Appends prediction records to the rotating JSON-lines log from a background
    thread (started in the process that records: the API servers are forked)."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.dir = Path(settings.log_dir)
        self.path = self.dir / f"{LOG_NAME}.jsonl"
        self._pid = -1
        self._queue: queue.Queue[dict] = queue.Queue()

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one record for the writer thread (never blocks the request)."""
        if self._pid != os.getpid():  # first record in this process: its own thread
            self._pid = os.getpid()
            self._queue = queue.Queue()
            threading.Thread(target=self._write_forever, name="prediction-log", daemon=True).start()
        self._queue.put(entry)

    def flush(self) -> None:
        """Wait until every record queued in this process is on disk."""
        if self._pid == os.getpid():
            self._queue.join()

    def _write_forever(self) -> None:
        q = self._queue
        while True:
            batch = [q.get()]
            # Gather for a moment before writing: one lock + write + fsync per interval,
            # not per prediction, keeps the log's cost off the HTTP process under load
            # (a crash loses at most this interval's records, never a line's integrity).
            # Sleeping, not waiting on the queue, spares the event loop a thread wake-up
            # per record (~10% of an HTTP process's CPU at 250 req/s, py-spy, issue 16).
            time.sleep(WRITE_INTERVAL_S)
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1000:
                    batch.append(q.get_nowait())
            try:
                self.append(batch)
            except Exception as err:  # a full disk must not take /predict down
                log.error("Prediction log: %d record(s) not written: %s", len(batch), err)
            finally:
                for _ in batch:
                    q.task_done()

    def append(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Write `entries` as lines, rotating first when the file would pass max_bytes."""
        from filelock import FileLock

        data = _json_lines(entries)
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir / ".lock"), timeout=30):
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(data) > self.settings.max_bytes:
                self._rotate()
            append_lines(self.path, data)

    def _rotate(self) -> None:
        """predictions.jsonl -> .1 -> .2 ...; the oldest beyond `backups` is dropped with
        the audio its records kept."""
        oldest = self.dir / f"{LOG_NAME}.{self.settings.backups}.jsonl"
        if oldest.exists():
            for record in _read_lines(oldest):
                if record.get("audio"):
                    (self.dir / str(record["audio"])).unlink(missing_ok=True)
            oldest.unlink()
        for i in range(self.settings.backups - 1, 0, -1):
            older = self.dir / f"{LOG_NAME}.{i}.jsonl"
            if older.exists():
                os.replace(older, self.dir / f"{LOG_NAME}.{i + 1}.jsonl")
        if self.settings.backups > 0:
            os.replace(self.path, self.dir / f"{LOG_NAME}.1.jsonl")
        else:
            self.path.unlink()

    def keep_audio(self, data: bytes, name: str, confidence: float) -> str | None:
        """Store the clip when `store_audio` asks for it; its path relative to the log."""
        mode = self.settings.store_audio
        if mode == "none" or (
            mode == "low_confidence" and confidence >= self.settings.low_confidence
        ):
            return None
        from faultsense.audio import AUDIO_SUFFIXES
        from faultsense.fileio import atomic_write

        suffix = Path(name).suffix.lower()
        relative = f"audio/{uuid.uuid4().hex}{suffix if suffix in AUDIO_SUFFIXES else '.bin'}"
        (self.dir / "audio").mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / relative, data)
        return relative

    def records(self, limit: int | None) -> list[dict[str, Any]]:
        """The newest `limit` records (None: every one kept), oldest first (unreadable
        lines skipped)."""
        out: list[dict[str, Any]] = []
        files = [self.path] + [
            self.dir / f"{LOG_NAME}.{i}.jsonl" for i in range(1, self.settings.backups + 1)
        ]
        for path in files:
            if limit is not None and len(out) >= limit:
                break
            out = _read_lines(path) + out
        if limit is None:
            return out
        return out[-limit:] if limit else []


def _json_lines(entries: Iterable[Mapping[str, Any]]) -> bytes:
    """`entries` as compact JSON lines."""
    return b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)


def append_lines(path: Path, data: bytes) -> None:
    """Append whole lines to `path` and fsync; call with the file's lock held. A line torn
    by an earlier crash is ended first, so it stays the only unreadable one."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path, key: str = "label") -> list[dict[str, Any]]:
    """The JSON objects (with `key`) of a JSON-lines file; a torn or foreign line is skipped."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    out = []
    for line in raw.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and key in item:
                out.append(item)
    return out


def prediction_record(
    result: Mapping[str, Any],
    *,
    source: str,
    latency_s: float,
    audio: str | None = None,
    filename: str | None = None,
) -> dict[str, Any]:
    """One log line for a /predict answer (the windows of long clips are left out);
    `filename` is the client's name for the clip, as text only."""
    return {
        "time": utc_now(),
        "id": uuid.uuid4().hex[:16],
        "version": result.get("version"),
        "label": result.get("label"),
        "confidence": result.get("confidence"),
        "probabilities": result.get("probabilities"),
        "duration_s": result.get("duration_s"),
        "latency_s": round(latency_s, 6),
        "source": source,
        "audio": audio,
        "filename": filename,
    }


def request_source(header: str | None) -> str:
    """`X-FaultSense-Source` as one of SOURCES (anything else counts as the API)."""
    value = (header or "").strip().lower()
    return value if value in SOURCES else "api"


def observe_predict(
    plog: PredictionLog | None,
    request: Any,
    status: int,
    body: bytes,
    *,
    data: bytes,
    name: str,
    started: float,
    stamps: Mapping[str, float] | None = None,
) -> None:
    """Count one /predict answer (a prediction, or why its audio was refused) and log the
    prediction. Never raises: monitoring must not fail a request."""
    try:
        if status != 200:
            if 400 <= status < 500:
                record_decode_failure(str(json.loads(body).get("error", "")))
            return
        result = json.loads(body)
        record_prediction(result, stamps or {})
        if plog is None:
            return
        source = request_source(request.headers.get(SOURCE_HEADER))
        audio = plog.keep_audio(data, name, float(result.get("confidence") or 0.0))
        latency = time.perf_counter() - started
        record = prediction_record(
            result, source=source, latency_s=latency, audio=audio, filename=name
        )
        plog.record(record)
    except Exception as err:
        log.error("Could not record a prediction for monitoring: %r", err)


# -- the labelling queue --------------------------------------------------------------

QUEUE_NAME = "queue.jsonl"
QUEUE_STATES = ("labelled", "dismissed")
AUDIO_CONTENT_TYPES = {
    ".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg",
    ".aiff": "audio/aiff", ".aif": "audio/aiff",
}  # fmt: skip


class LabelQueue:
    """The low-confidence predictions whose clip the log kept, waiting for an operator to
    label or dismiss them. What was done to an item is one line appended to
    `log_dir/queue.jsonl` under a file lock (so it survives a restart and holds across
    API server processes); an item whose record or audio rotated away is simply gone."""

    def __init__(self, plog: PredictionLog) -> None:
        self.plog = plog
        self.path = plog.dir / QUEUE_NAME

    def lock(self) -> Any:
        """The queue's file lock; hold it from checking an item to marking it done."""
        from filelock import FileLock

        self.plog.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.plog.dir / ".queue.lock"), timeout=30)

    def done(self) -> dict[str, dict[str, Any]]:
        """What was done to each resolved item: id -> its queue.jsonl line."""
        return {str(line["id"]): line for line in _read_lines(self.path, key="id")}

    def pending(self) -> list[dict[str, Any]]:
        """The items waiting, newest first: low-confidence records with their audio on
        disk, neither labelled nor dismissed."""
        done = self.done()
        return [
            r
            for r in reversed(self.plog.records(None))
            if self._queued(r) and str(r.get("id")) not in done
        ]

    def _queued(self, record: Mapping[str, Any]) -> bool:
        confidence = float(record.get("confidence") or 0.0)
        return (
            confidence < self.plog.settings.low_confidence and self.audio_path(record) is not None
        )

    def record(self, item_id: str) -> dict[str, Any] | None:
        """The newest log record with this id whose audio is still stored, or None."""
        for r in reversed(self.plog.records(None)):
            if r.get("id") == item_id and self.audio_path(r) is not None:
                return r
        return None

    def item(self, item_id: str) -> dict[str, Any]:
        """The waiting item `item_id`; 404 when there is none, 409 when already resolved.
        Call with `lock()` held when it is about to be resolved."""
        from .http_helpers import HTTPError

        shown = display_id(item_id)
        record = self.record(item_id)
        if record is None or not self._queued(record):
            raise HTTPError(
                404, f"No queued prediction {shown} (unknown, or its audio rotated away)."
            )
        line = self.done().get(item_id)
        if line is not None:
            raise HTTPError(409, f"Queued prediction {shown} was already {line.get('state')}.")
        return record

    def audio_path(self, record: Mapping[str, Any]) -> Path | None:
        """Where the record's clip is stored (inside log_dir/audio), None when it is not."""
        relative = record.get("audio")
        if not isinstance(relative, str):
            return None
        audio_dir = (self.plog.dir / "audio").resolve()
        path = (self.plog.dir / relative).resolve()
        return path if path.parent == audio_dir and path.is_file() else None

    def resolve(self, item_id: str, state: str, **fields: Any) -> dict[str, Any]:
        """Record that `item_id` was `state` (one of QUEUE_STATES); call under `lock()`."""
        line = {"id": item_id, "state": state, "time": utc_now(), **fields}
        append_lines(self.path, _json_lines([line]))
        return line


def display_id(item_id: str) -> str:
    """A queue id as shown in a message (client text: quoted and cut short)."""
    from faultsense.fileio import display_name

    return repr(display_name(item_id, 40))


def queue_item(record: Mapping[str, Any]) -> dict[str, Any]:
    """A queued record as GET /monitor/queue lists it."""
    item_id = str(record.get("id"))
    return {
        "id": item_id,
        "time": record.get("time"),
        "version": record.get("version"),
        "predicted": record.get("label"),
        "confidence": record.get("confidence"),
        "probabilities": record.get("probabilities"),
        "filename": record.get("filename"),
        "audio": f"/monitor/queue/{item_id}/audio",
    }


def audio_content_type(path: Path) -> str:
    """The Content-Type of a stored clip, from the suffix it was stored with."""
    return AUDIO_CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


# -- the reference --------------------------------------------------------------------


def reference_for(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The drift reference of a bundle (`bundle.json`): `{source, labels: {label: share},
    confidence: [share per bin] | None}`; `labels` is None when nothing is recorded."""
    labels = list(meta.get("labels") or [])
    config = meta.get("config") or {}
    # Where the training run wrote metrics.json (as the Insights report finds it).
    run_dir = (meta.get("training_log") or {}).get("run_dir") or (
        (config.get("paths") or {}).get("output_dir")
    )
    summary = _read_json(Path(run_dir) / "metrics.json") if run_dir else {}
    confidence = (summary.get("confidence_histogram") or {}).get("val")
    matrix = (summary.get("confusion") or {}).get("val")
    if matrix and len(matrix) == len(labels):
        predicted = [sum(row[j] for row in matrix) for j in range(len(labels))]
        return _reference(
            "val predictions (confusion matrix columns)", labels, predicted, confidence
        )
    data = config.get("data") or {}
    manifest = data.get("manifest_path")
    if manifest and Path(manifest).is_file():
        from .insights import class_distribution

        counts = class_distribution(Path(manifest), data.get("val_fold"), data.get("test_fold"))
        val = counts.get("val") or {}
        if any(val.values()):
            return _reference(
                "val labels (data manifest)", labels, [val.get(x, 0) for x in labels], confidence
            )
    return {"source": None, "labels": None, "confidence": confidence}


def _reference(source: str, labels: list[str], counts: list[float], confidence: Any) -> dict:
    total = sum(counts) or 1
    return {
        "source": source,
        "labels": {label: c / total for label, c in zip(labels, counts, strict=True)},
        "confidence": confidence,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=16)
def cached_reference(registry_dir: str, version: str) -> dict[str, Any]:
    """`reference_for` a registered version, read once per process (bundles never change)."""
    from faultsense.registry import Registry

    return reference_for(Registry(registry_dir).get(version).meta)


# -- drift and the report -------------------------------------------------------------


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of `actual` against `expected` (counts or shares over
    the same bins): sum (a - e) * ln(a / e), an empty bin counted as PSI_FLOOR."""
    e_total, a_total = sum(expected) or 1.0, sum(actual) or 1.0
    score = 0.0
    for e, a in zip(expected, actual, strict=True):
        e_share, a_share = max(e / e_total, PSI_FLOOR), max(a / a_total, PSI_FLOOR)
        score += (a_share - e_share) * math.log(a_share / e_share)
    return score


def drift(
    recent: Sequence[Mapping[str, Any]], reference: Mapping[str, Any], s: MonitorSettings
) -> dict:
    """The drift state of the `recent` records against `reference` (see the module doc)."""
    ref_labels = reference.get("labels")
    out: dict[str, Any] = {
        "window": s.window, "predictions": len(recent), "min_predictions": s.min_predictions,
        "threshold": s.psi_threshold, "reference": reference.get("source"),
        "label_psi": None, "confidence_psi": None, "score": None, "drifting": False,
    }  # fmt: skip
    if not ref_labels:
        out["state"] = "no reference"
        return out
    if not recent:
        out["state"] = "warming up"
        return out
    labels = list(ref_labels)
    counts = [sum(1 for r in recent if r.get("label") == label) for label in labels]
    out["label_psi"] = round(psi([ref_labels[x] for x in labels], counts), 4)
    ref_conf = reference.get("confidence")
    if ref_conf:
        actual = bin_counts((r.get("confidence") or 0.0 for r in recent), len(ref_conf))
        out["confidence_psi"] = round(psi(ref_conf, actual), 4)
    counted = [out["label_psi"], out["confidence_psi"] if s.confidence_drift else None]
    out["score"] = max(v for v in counted if v is not None)
    if len(recent) < s.min_predictions:
        out["state"] = "warming up"
        return out
    out["drifting"] = out["score"] >= s.psi_threshold
    out["state"] = "drifting" if out["drifting"] else "stable"
    return out


def timeline(records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Predictions per label per time bucket (width chosen from the span)."""
    times = [_parse_time(r.get("time")) for r in records]
    stamped = [(t, r) for t, r in zip(times, records, strict=True) if t is not None]
    if not stamped:
        return {"bucket_s": None, "start": [], "counts": {label: [] for label in labels}}
    first, last = stamped[0][0], stamped[-1][0]
    span = max(1.0, last - first)
    width = next((w for w in BUCKET_WIDTHS if span / w <= TIMELINE_BUCKETS), BUCKET_WIDTHS[-1])
    origin = math.floor(first / width) * width
    n = int((last - origin) // width) + 1
    all_labels = list(labels) + sorted({str(r.get("label")) for _, r in stamped} - set(labels))
    counts = {label: [0] * n for label in all_labels}
    for t, r in stamped:
        counts[str(r.get("label"))][int((t - origin) // width)] += 1
    start = [
        dt.datetime.fromtimestamp(origin + i * width, dt.UTC).isoformat(timespec="seconds")
        for i in range(n)
    ]
    return {"bucket_s": width, "start": start, "counts": counts}


def _parse_time(value: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def monitor_report(
    records: Sequence[Mapping[str, Any]],
    version: str,
    labels: Sequence[str],
    reference: Mapping[str, Any],
    s: MonitorSettings,
) -> dict[str, Any]:
    """The /monitor payload: the log's recent history and model `version`'s drift."""
    recent = [r for r in records if r.get("version") == version][-s.window :]
    confidences = [float(r.get("confidence") or 0.0) for r in recent]
    low = [r for r in recent if float(r.get("confidence") or 0.0) < s.low_confidence]
    return {
        "version": version,
        "labels": list(labels),
        "records": len(records),
        "timeline": timeline(records, labels),
        "recent": {
            "predictions": len(recent),
            "labels": {
                label: sum(1 for r in recent if r.get("label") == label) for label in labels
            },
            "sources": {src: sum(1 for r in recent if r.get("source") == src) for src in SOURCES},
        },
        "confidence": {
            "bins": [round(i / s.confidence_bins, 4) for i in range(s.confidence_bins + 1)],
            "counts": bin_counts(confidences, s.confidence_bins),
        },
        "low_confidence": {
            "threshold": s.low_confidence,
            "count": len(low),
            "share": round(len(low) / len(recent), 4) if recent else 0.0,
        },
        "drift": drift(recent, reference, s),
        "store_audio": s.store_audio,
    }


def drift_metrics(
    s: MonitorSettings, bundle: Any, records: Sequence[Mapping[str, Any]], reference: Mapping
) -> list[Any]:
    """The drift state of `bundle`'s recent predictions as Prometheus gauge families."""
    from prometheus_client.core import GaugeMetricFamily

    recent = [r for r in records if r.get("version") == bundle.version][-s.window :]
    state = drift(recent, reference, s)
    score = GaugeMetricFamily(
        "faultsense_drift_psi", "PSI of recent predictions against the model's reference.",
        labels=["distribution", "version"],
    )  # fmt: skip
    for name in ("label", "confidence"):
        if state[f"{name}_psi"] is not None:
            score.add_metric([name, bundle.version], state[f"{name}_psi"])
    drifting = GaugeMetricFamily(
        "faultsense_drifting", "1 when the recent predictions drift from the reference.",
        labels=["version"],
    )  # fmt: skip
    drifting.add_metric([bundle.version], 1.0 if state["drifting"] else 0.0)
    return [score, drifting]
