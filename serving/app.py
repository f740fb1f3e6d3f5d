"""FaultSense web app (Gradio 6): predict, upload, retrain, models, insights.

The app is a client of the FaultSense server: every prediction, upload, retrain and
model switch is an HTTP call (`ServerClient`); it never imports the model or torch.
Clip views (waveform, log-mel, MFCC) are computed here with numpy for display only;
the model computes its own features inside the bundle on the server.

    faultsense-app                       # http://127.0.0.1:7860, server at :8000
    faultsense-app port=7861 server_url=http://10.0.0.5:8000
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from faultsense import CONFIG_DIR
from faultsense.errors import FaultSenseError
from faultsense.taxonomy import LABELS

# Absolute, so the installed `faultsense-app` script finds configs/ from any module path.

if TYPE_CHECKING:
    import gradio as gr
    from matplotlib.figure import Figure

# Gradio must never phone home: no analytics, no version check, no share tunnel.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed")
HEADLINE_METRICS = (
    ("val/f1_macro", "val F1"),
    ("val/acc", "val acc"),
    ("test/f1_macro", "test F1"),
    ("test/acc", "test acc"),
)
LABEL_COLORS = dict(zip(LABELS, ("#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"), strict=True))


class ServerUnavailable(FaultSenseError):
    """The FaultSense server is down, unreachable, or refused a request; `str()` says which.

    `status` is the HTTP status of a refusal (None when there was no answer) and `body`
    its parsed JSON, which can still carry useful fields (e.g. the running job's id).
    """

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# -- HTTP client ------------------------------------------------------------------------


class ServerClient:
    """Thin HTTP client for the FaultSense server API (docs/INTERNALS.md, HTTP API)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerUnavailable(
                f"The FaultSense server at {self.url} did not answer {method} {path} in time."
            ) from None
        except httpx.HTTPError as err:
            raise ServerUnavailable(
                f"The FaultSense server at {self.url} is not reachable ({type(err).__name__}). "
                "Start it with `make serve` (or `make demo`), or point the app at it with "
                "server_url=... / FAULTSENSE_SERVER_URL."
            ) from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise ServerUnavailable(
                self._refusal(method, path, response), response.status_code, body
            )
        try:
            return response.json()
        except ValueError:
            return response.text

    def _refusal(self, method: str, path: str, response: Any) -> str:
        reason = _error_text(response)
        if response.status_code in (401, 403):
            return (
                f"The server refused {method} {path} ({response.status_code}): {reason}. "
                "Set FAULTSENSE_API_KEY for the app to the server's key."
            )
        return f"The server refused {method} {path} ({response.status_code}): {reason}"

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/status")

    def predict(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as f:
            return self._request("POST", "/predict", files={"file": (path.name, f)})

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

    def insights(self) -> dict[str, Any] | None:
        """The current model's training report, or None when the server has no such route."""
        try:
            return self._request("GET", "/insights")
        except ServerUnavailable as err:
            if err.status == 404:
                return None
            raise


def _error_text(response: Any) -> str:
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


# -- display-only clip views (numpy) ---------------------------------------------------


def load_clip(path: str | Path, max_seconds: float) -> tuple[np.ndarray, int]:
    """Decode a clip for display at its own sample rate: mono float32 [T] and the rate.

    Uses the project's one decoder (same errors as the server), but at the file's native
    rate: the waveform plot shows the file as uploaded.
    """
    import soundfile as sf

    from faultsense.audio import decode

    try:
        rate = int(sf.info(str(path)).samplerate)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        rate = 16_000  # decode() below raises the clear AudioError
    wave = decode(path, sample_rate=rate, max_seconds=max_seconds, name=Path(path).name)
    return wave, rate


def _mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1]."""

    def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0.0, float(hz_to_mel(sr / 2)), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / np.maximum(center - lower, 1e-9)
    down = (upper - freqs[None]) / np.maximum(upper - center, 1e-9)
    return np.clip(np.minimum(up, down), 0.0, None)


def power_spectrogram(
    wave: np.ndarray, sr: int, win_ms: float, hop_ms: float
) -> tuple[np.ndarray, int]:
    """Hann-windowed power spectrogram [frames, n_fft // 2 + 1] and its n_fft."""
    win = max(16, int(sr * win_ms / 1000))
    hop = max(1, int(sr * hop_ms / 1000))
    n_fft = 1 << (win - 1).bit_length()
    if wave.shape[0] < win:
        wave = np.pad(wave, (0, win - wave.shape[0]))
    frames = np.lib.stride_tricks.sliding_window_view(wave, win)[::hop] * np.hanning(win)
    return (np.abs(np.fft.rfft(frames, n_fft, axis=1)) ** 2).astype(np.float32), n_fft


def clip_views(wave: np.ndarray, sr: int, views: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Log-mel dB [n_mels, frames], MFCC [n_mfcc, frames] and the power spectrum."""
    power, n_fft = power_spectrogram(wave, sr, views["win_ms"], views["hop_ms"])
    mel = _mel_filterbank(sr, n_fft, int(views["n_mels"])) @ power.T
    logmel = 10.0 * np.log10(np.maximum(mel, 1e-10))
    logmel = np.maximum(logmel, logmel.max() - float(views["top_db"]))
    n_mels, n_mfcc = logmel.shape[0], int(views["n_mfcc"])
    # Orthonormal DCT-II over the mel axis: the standard MFCC definition.
    k = np.arange(n_mfcc)[:, None]
    dct = np.cos(np.pi / n_mels * (np.arange(n_mels)[None] + 0.5) * k) * math.sqrt(2.0 / n_mels)
    dct[0] /= math.sqrt(2.0)
    return {"power": power, "logmel": logmel, "mfcc": dct @ logmel, "n_fft": np.array(n_fft)}


def clip_readings(wave: np.ndarray, sr: int, views: Mapping[str, Any]) -> dict[str, str]:
    """One plain-language line per view: waveform, log-mel and MFCC."""
    feats = clip_views(wave, sr, views)
    peak = float(np.abs(wave).max())
    rms = float(np.sqrt(np.mean(wave**2)) + 1e-12)
    crest = peak / rms
    frame_db = 10 * np.log10(feats["power"].mean(axis=1) + 1e-12)
    shape = (
        f"impulsive (crest factor {crest:.1f})"
        if crest > views["impulsive_crest"]
        else f"steady (crest factor {crest:.1f})"
    )
    waveform = (
        f"{wave.shape[0] / sr:.1f} s, level {20 * math.log10(rms):.0f} dBFS, peak {peak:.2f}; "
        f"{shape}, loudness varies {float(np.std(frame_db)):.0f} dB over time."
    )
    spectrum = feats["power"].mean(axis=0) + 1e-12
    freqs = np.linspace(0.0, sr / 2, spectrum.shape[0])
    centroid = float((freqs * spectrum).sum() / spectrum.sum())
    rolloff = float(freqs[np.searchsorted(np.cumsum(spectrum), 0.85 * spectrum.sum())])
    flatness = float(np.exp(np.mean(np.log(spectrum))) / np.mean(spectrum))
    texture = "broadband, noise-like" if flatness > views["noisy_flatness"] else "tonal or banded"
    logmel = (
        f"energy centred near {centroid:,.0f} Hz, 85% below {rolloff:,.0f} Hz; "
        f"{texture} (spectral flatness {flatness:.2f})."
    )
    delta = (
        float(np.abs(np.diff(feats["mfcc"][1:], axis=1)).mean())
        if feats["mfcc"].shape[1] > 1
        else 0.0
    )
    steadiness = "fluctuating" if delta > views["fluctuating_delta_db"] else "stable"
    mfcc = (
        f"spectral tilt (MFCC 1) {float(feats['mfcc'][1].mean()):+.0f}; timbre is {steadiness} "
        f"over time (mean frame-to-frame change {delta:.1f} dB)."
    )
    return {"waveform": waveform, "logmel": logmel, "mfcc": mfcc}


def clip_figure(
    wave: np.ndarray, sr: int, views: Mapping[str, Any], *, mfcc: bool = False, title: str = ""
) -> Figure:
    """Waveform over log-mel (and MFCC) of one clip, sharing the time axis."""
    from matplotlib.figure import Figure

    feats = clip_views(wave, sr, views)
    rows = 3 if mfcc else 2
    fig = Figure(figsize=(9, 2.1 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True)
    seconds = wave.shape[0] / sr
    step = max(1, wave.shape[0] // 20_000)  # plotting every sample of a long clip is slow
    t = np.arange(0, wave.shape[0], step) / sr
    axes[0].plot(t, wave[::step], lw=0.5, color="#1f77b4")
    axes[0].set_ylabel("amplitude")
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].set_title(title or "waveform", fontsize=10)
    extent = (0.0, seconds, 0.0, float(views["n_mels"]))
    image = axes[1].imshow(
        feats["logmel"], origin="lower", aspect="auto", extent=extent, cmap="magma"
    )
    axes[1].set_ylabel("mel band")
    fig.colorbar(image, ax=axes[1], label="dB", pad=0.01)
    if mfcc:
        coeffs = feats["mfcc"][1:]  # c0 is loudness, already shown above
        image = axes[2].imshow(
            coeffs, origin="lower", aspect="auto", cmap="coolwarm",
            extent=(0.0, seconds, 1.0, float(coeffs.shape[0] + 1)),
        )  # fmt: skip
        axes[2].set_ylabel("MFCC")
        fig.colorbar(image, ax=axes[2], pad=0.01)
    axes[-1].set_xlabel("time (s)")
    return fig


def timeline_figure(windows: Sequence[Mapping[str, Any]]) -> Figure:
    """Per-window probability of each label along a long recording."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8), layout="constrained")
    ax = fig.subplots()
    centres = [(w["start_s"] + w["end_s"]) / 2 for w in windows]
    for label in LABELS:
        probs = [float(w.get("probabilities", {}).get(label, 0.0)) for w in windows]
        ax.plot(centres, probs, marker="o", ms=3, label=label, color=LABEL_COLORS[label])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time (s, window centre)")
    ax.set_ylabel("probability")
    ax.set_title("per-window probabilities", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


# -- formatting helpers ---------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int | float):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    return str(value)


def _scalar_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _metrics_md(metrics: Mapping[str, Any] | None) -> str:
    scalars = _scalar_metrics(metrics)
    parts = [f"{name} **{scalars[key]:.3f}**" for key, name in HEADLINE_METRICS if key in scalars]
    return " · ".join(parts) if parts else "no metrics recorded"


def _error_md(message: str) -> str:
    return f"⚠️ **{message}**"


def prediction_markdown(result: Mapping[str, Any]) -> str:
    label = result.get("label", "?")
    confidence = float(result.get("confidence", 0.0))
    windows = result.get("windows") or []
    extra = f" · {len(windows)} windows" if len(windows) > 1 else ""
    return (
        f"## {label}\n"
        f"confidence **{confidence:.1%}** · model **{result.get('version', '?')}** · "
        f"{float(result.get('duration_s', 0.0)):.1f} s{extra}"
    )


def upload_rows(result: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for item in result.get("results", []):
        if item.get("status") == "rejected":
            detail = item.get("error", "")
        else:
            detail = f"sha256 {str(item.get('sha256', ''))[:12]}…"
        rows.append([str(item.get("filename", "")), str(item.get("status", "")), detail])
    return rows


def count_rows(counts: Mapping[str, Any] | None) -> list[list[Any]]:
    counts = counts or {}
    return [[label, int(counts.get(label, 0))] for label in LABELS]


def model_rows(models: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for v in reversed(models.get("versions", [])):  # newest first
        metrics = _scalar_metrics(v.get("metrics"))
        rows.append(
            [
                "yes" if v.get("current") else "",
                v.get("version", "?"),
                str(v.get("created_at") or "")[:19],
            ]
            + [_fmt(metrics.get(key)) for key, _ in HEADLINE_METRICS]
            + [v.get("parent_version") or "—"]
        )
    return rows


def history_rows(models: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for h in reversed(models.get("history") or []):
        rows.append(
            [
                str(h.get("at") or h.get("time") or h.get("created_at") or "")[:19],
                str(h.get("action", "")),
                str(h.get("version", "")),
                str(h.get("reason", "")),
            ]
        )
    return rows


def comparison_rows(decision: Mapping[str, Any]) -> list[list[str]]:
    new = _scalar_metrics(decision.get("new_metrics"))
    cur = _scalar_metrics(decision.get("current_metrics"))
    keys = [k for k, _ in HEADLINE_METRICS if k in new or k in cur]
    keys += sorted((set(new) | set(cur)) - set(keys))
    rows = []
    for key in keys:
        delta = new[key] - cur[key] if key in new and key in cur else None
        rows.append(
            [key, _fmt(cur.get(key)), _fmt(new.get(key)), "—" if delta is None else f"{delta:+.3f}"]
        )
    return rows


def job_markdown(job: Mapping[str, Any]) -> str:
    state = job.get("state", "?")
    epoch, max_epochs = job.get("epoch"), job.get("max_epochs")
    progress = f" · epoch {epoch}/{max_epochs}" if epoch is not None and max_epochs else ""
    lines = [f"### job `{job.get('job_id', '?')}`: {state}{progress}"]
    if job.get("metrics"):
        lines.append(_metrics_md(job["metrics"]))
    if job.get("error"):
        lines.append(_error_md(str(job["error"])))
    return "\n\n".join(lines)


def decision_markdown(decision: Mapping[str, Any] | None) -> str:
    if not decision:
        return ""
    if decision.get("promoted"):
        head = (
            f"**Promoted** {decision.get('version') or decision.get('new_version') or ''}".rstrip()
        )
    else:
        head = "**Kept the current model**"
    return f"{head}: {decision.get('reason', '')}"


# -- Insights figures -----------------------------------------------------------------


def distribution_figure(
    dataset: Mapping[str, Mapping[str, int]], uploads: Mapping[str, int] | None
) -> Figure:
    """Grouped bars: clips per label in each split (and uploads waiting for retraining)."""
    from matplotlib.figure import Figure

    groups = {split: dict(counts) for split, counts in dataset.items()}
    if uploads:
        groups["uploads"] = dict(uploads)
    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(LABELS))
    for i, (split, counts) in enumerate(groups.items()):
        values = [int(counts.get(label, 0)) for label in LABELS]
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, LABELS)
    ax.set_ylabel("clips")
    ax.set_title("class distribution per split", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def curves_figure(curves: Mapping[str, Sequence[Any]]) -> Figure:
    """Loss curves (left) and score curves (right) per epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for name, points in curves.items():
        xs, ys = [], []
        for point in points:
            if isinstance(point, Mapping):
                xs.append(float(point.get("epoch", point.get("step", len(xs)))))
                ys.append(float(point["value"]))
            else:
                xs.append(float(point[0]))
                ys.append(float(point[1]))
        ax = loss_ax if "loss" in name else score_ax
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    for ax, title in ((loss_ax, "loss"), (score_ax, "scores")):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def confusion_figure(confusion: Mapping[str, Any]) -> Figure:
    """Confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    from matplotlib.figure import Figure

    matrix = np.asarray(confusion["matrix"], dtype=float)
    labels = list(confusion.get("labels") or LABELS)
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, f"{matrix[i, j]:g}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({confusion.get('split', 'test')})", fontsize=10)
    return fig


def per_label_rows(per_label: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            label,
            *(
                _fmt(per_label.get(label, {}).get(k))
                for k in ("precision", "recall", "f1", "support")
            ),
        ]
        for label in LABELS
    ]


def find_examples(folders: Sequence[str | Path]) -> dict[str, Path]:
    """One clip per label from the first folder that has `<label>/<clip>` files."""
    from faultsense.audio import AUDIO_SUFFIXES

    found: dict[str, Path] = {}
    for folder in folders:
        for label in LABELS:
            directory = Path(folder) / label
            if label in found or not directory.is_dir():
                continue
            clips = sorted(p for p in directory.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if clips:
                found[label] = clips[0]
    return found


# -- the app --------------------------------------------------------------------------


def build_app(cfg: DictConfig) -> gr.Blocks:
    """The Gradio Blocks app for `cfg` (configs/app.yaml); `launch_app` serves it."""
    import gradio as gr

    client = ServerClient(
        str(cfg.server_url), cfg.get("api_key") or None, float(cfg.request_timeout_s)
    )
    views: dict[str, Any] = OmegaConf.to_container(cfg.views, resolve=True)  # type: ignore[assignment]
    retrain_cfg = cfg.retrain
    example_dirs = [d for d in (cfg.get("examples_dir"), cfg.get("fallback_examples_dir")) if d]
    model_headers = (
        ["current", "version", "created"] + [n for _, n in HEADLINE_METRICS] + ["parent"]
    )

    def warn(err: Exception, toast: bool = True) -> str:
        if toast:
            gr.Warning(str(err))
        return _error_md(str(err))

    # ---- Predict
    def predict(audio_path: str | None):
        hidden = gr.update(value=None, visible=False)
        if not audio_path:
            msg = "Upload or record a clip first."
            gr.Warning(msg)
            return _error_md(msg), None, None, hidden
        figure = None
        try:
            wave, sr = load_clip(audio_path, float(views["max_seconds"]))
            figure = clip_figure(wave, sr, views, title=Path(audio_path).name)
        except FaultSenseError as err:
            return warn(err), None, None, hidden
        try:
            result = client.predict(audio_path)
        except ServerUnavailable as err:
            return warn(err), None, figure, hidden
        windows = result.get("windows") or []
        timeline = (
            gr.update(value=timeline_figure(windows), visible=True) if len(windows) > 1 else hidden
        )
        return prediction_markdown(result), result.get("probabilities") or {}, figure, timeline

    # ---- Upload
    def upload(files: list[str] | None, label: str | None):
        if not files:
            msg = "Choose one or more audio files to upload."
            gr.Warning(msg)
            return _error_md(msg), [], gr.update()
        if label not in LABELS:
            msg = f"Choose the label of these recordings (one of: {', '.join(LABELS)})."
            gr.Warning(msg)
            return _error_md(msg), [], gr.update()
        try:
            result = client.upload(files, label)
        except ServerUnavailable as err:
            if not (isinstance(err.body, dict) and "results" in err.body):
                return warn(err), [], gr.update()
            result = err.body  # every file was rejected: the table says why, per file
        rows = upload_rows(result)
        by_status: dict[str, int] = {}
        for row in rows:
            by_status[row[1]] = by_status.get(row[1], 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "nothing uploaded"
        return f"Uploaded as **{label}**: {summary}.", rows, count_rows(result.get("counts"))

    def upload_counts() -> list[list[Any]]:
        try:
            return count_rows(client.status().get("uploads"))
        except ServerUnavailable:
            return count_rows({})

    # ---- Retrain
    def follow(job_id: str) -> Iterator[tuple[Any, ...]]:
        deadline = time.monotonic() + float(retrain_cfg.follow_timeout_s)
        while True:
            try:
                job = client.retrain_job(job_id)
            except ServerUnavailable as err:
                yield warn(err), "", [], ""
                return
            decision = job.get("decision") or {}
            yield (
                job_markdown(job),
                decision_markdown(decision),
                comparison_rows(decision) if decision else [],
                "\n".join(job.get("log_tail") or [])
                if isinstance(job.get("log_tail"), list)
                else str(job.get("log_tail") or ""),
            )
            if job.get("state") in TERMINAL_STATES:
                return
            if time.monotonic() > deadline:
                yield (
                    _error_md(f"Stopped following job {job_id}; it is still on the server."),
                    "", [], "",
                )  # fmt: skip
                return
            time.sleep(float(retrain_cfg.poll_s))

    def retrain(epochs: float | None, force: bool) -> Iterator[tuple[Any, ...]]:
        try:
            job_id = client.start_retrain(int(epochs) if epochs else None, force)["job_id"]
        except ServerUnavailable as err:
            job_id = err.body.get("job_id") if isinstance(err.body, dict) else None
            if err.status != 409 or not job_id:
                yield warn(err), "", [], ""
                return
            gr.Info(f"Retraining job {job_id} is already running: following it.")
        yield from follow(str(job_id))

    def follow_latest() -> Iterator[tuple[Any, ...]]:
        try:
            job_id = (client.status().get("retrain") or {}).get("job_id")
        except ServerUnavailable as err:
            yield warn(err), "", [], ""
            return
        if not job_id:
            yield "No retrain job has run on this server yet.", "", [], ""
            return
        yield from follow(str(job_id))

    # ---- Models
    def models_view(message: str = "", toast: bool = True):
        try:
            models = client.models()
        except ServerUnavailable as err:
            return warn(err, toast), [], [], gr.update()
        versions = [v.get("version") for v in models.get("versions", []) if v.get("version")]
        current = models.get("current")
        head = (
            message
            or f"Serving **{current or 'nothing'}** · {len(versions)} version(s) registered."
        )
        return (
            head,
            model_rows(models),
            history_rows(models),
            gr.update(choices=versions[::-1], value=current if current in versions else None),
        )

    def promote(version: str | None):
        if not version:
            gr.Warning("Choose a version to promote.")
            return models_view(_error_md("Choose a version to promote."))
        try:
            current = client.promote(version).get("current")
        except ServerUnavailable as err:
            return models_view(warn(err))
        gr.Info(f"{current} is now current.")
        return models_view(f"Promoted **{current}**: it serves from the next batch.")

    def rollback():
        try:
            current = client.rollback().get("current")
        except ServerUnavailable as err:
            return models_view(warn(err))
        gr.Info(f"Rolled back to {current}.")
        return models_view(f"Rolled back: **{current}** is current.")

    # ---- Insights
    def insights(toast: bool = True):
        examples = find_examples(example_dirs)
        example_md = []
        example_figs: list[Any] = []
        for label in LABELS:
            if label not in examples:
                example_md.append(
                    f"**{label}**: no example clip in {', '.join(map(str, example_dirs))}."
                )
                example_figs.append(None)
                continue
            path = examples[label]
            try:
                wave, sr = load_clip(path, float(views["max_seconds"]))
            except FaultSenseError as err:
                example_md.append(_error_md(str(err)))
                example_figs.append(None)
                continue
            reading = clip_readings(wave, sr, views)
            example_md.append(
                f"**{label}** (`{path.name}`)\n\n"
                f"- *waveform*: {reading['waveform']}\n- *log-mel*: {reading['logmel']}\n"
                f"- *MFCC*: {reading['mfcc']}"
            )
            example_figs.append(
                clip_figure(wave, sr, views, mfcc=True, title=f"{label}: {path.name}")
            )
        try:
            status = client.status()
            report = client.insights() or {}
        except ServerUnavailable as err:
            return (
                warn(err, toast),
                None,
                None,
                None,
                [],
                count_rows({}),
                *example_md,
                *example_figs,
            )
        model = status.get("model") or {}
        uploads = status.get("uploads") or report.get("uploads") or {}
        notes = [
            f"Current model **{model.get('version', '?')}** · {_metrics_md(model.get('metrics'))}"
        ]
        if not report:
            notes.append("This server has no /insights route: only upload statistics are shown.")
        for what, why in (report.get("missing") or {}).items():
            notes.append(f"No {what.replace('_', ' ')} for this model: {why}.")
        dataset = report.get("dataset") or {}
        has_uploads = any(int(n) for n in uploads.values())
        dist = (
            distribution_figure(dataset, uploads if has_uploads else None)
            if dataset or has_uploads
            else None
        )
        curves = curves_figure(report["curves"]) if report.get("curves") else None
        confusion = (
            confusion_figure(report["confusion_matrix"]) if report.get("confusion_matrix") else None
        )
        per_label = per_label_rows(report["per_label"]) if report.get("per_label") else []
        return (
            "\n\n".join(notes), dist, curves, confusion, per_label, count_rows(uploads),
            *example_md, *example_figs,
        )  # fmt: skip

    # ---- layout
    with gr.Blocks(title=str(cfg.title), analytics_enabled=False) as app:
        gr.Markdown(
            f"# {cfg.title}\nEquipment sound → fault class "
            f"({', '.join(LABELS)}). Server: `{client.url}`"
        )
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                with gr.Row():
                    with gr.Column(scale=1):
                        audio = gr.Audio(
                            sources=["upload", "microphone"], type="filepath", label="Recording"
                        )
                        predict_btn = gr.Button(
                            "Predict", variant="primary", elem_id="predict-button"
                        )
                    with gr.Column(scale=1):
                        prediction = gr.Markdown(
                            "Upload or record a clip, then press **Predict**.", elem_id="prediction"
                        )
                        probabilities = gr.Label(
                            num_top_classes=len(LABELS),
                            label="Probabilities",
                            elem_id="probabilities",
                        )
                clip_plot = gr.Plot(label="Waveform and log-mel spectrogram", elem_id="clip-plot")
                timeline_plot = gr.Plot(
                    label="Timeline (long recordings)", visible=False, elem_id="timeline-plot"
                )
                examples = find_examples(example_dirs)
                if examples:
                    gr.Examples(
                        [[str(p)] for p in examples.values()], inputs=[audio], label="Example clips"
                    )
                predict_btn.click(
                    predict,
                    [audio],
                    [prediction, probabilities, clip_plot, timeline_plot],
                    api_name="predict",
                )

            with gr.Tab("Upload", id="upload"):
                gr.Markdown(
                    "Add labeled recordings; they join the training split at the next retrain."
                )
                with gr.Row():
                    files = gr.File(
                        file_count="multiple",
                        type="filepath",
                        label="Recordings",
                        elem_id="upload-files",
                    )
                    with gr.Column():
                        upload_label = gr.Dropdown(
                            list(LABELS), label="Label of all these files", value=None
                        )
                        upload_btn = gr.Button("Upload", variant="primary", elem_id="upload-button")
                upload_status = gr.Markdown(elem_id="upload-status")
                upload_table = gr.Dataframe(
                    headers=["file", "result", "detail"],
                    label="Per-file result",
                    interactive=False,
                    wrap=True,
                )
                counts_table = gr.Dataframe(
                    value=count_rows({}), headers=["label", "uploaded clips ready for retraining"],
                    label="Uploads per label", interactive=False, elem_id="upload-counts",
                )  # fmt: skip
                upload_btn.click(
                    upload,
                    [files, upload_label],
                    [upload_status, upload_table, counts_table],
                    api_name="upload",
                )

            with gr.Tab("Retrain", id="retrain"):
                gr.Markdown(
                    "Fine-tune the current model on the training data plus uploads. The new "
                    "version is promoted only if it passes the gate (or with *force*)."
                )
                with gr.Row():
                    epochs = gr.Number(
                        value=retrain_cfg.get("default_epochs") or 0, precision=0, minimum=0,
                        label="Epochs (0: the server's default)",
                    )  # fmt: skip
                    force = gr.Checkbox(label="Force promotion (skip the gate)", value=False)
                    retrain_btn = gr.Button("Retrain", variant="primary", elem_id="retrain-button")
                    follow_btn = gr.Button("Follow latest job")
                job_status = gr.Markdown(
                    "No retrain started from this page yet.", elem_id="retrain-status"
                )
                decision_md = gr.Markdown(elem_id="retrain-decision")
                comparison = gr.Dataframe(
                    headers=["metric", "current model", "new model", "change"],
                    label="Gate: current vs new",
                    interactive=False,
                )
                log_tail = gr.Textbox(label="Log tail", lines=8, max_lines=8, interactive=False)
                retrain_outputs = [job_status, decision_md, comparison, log_tail]
                retrain_btn.click(retrain, [epochs, force], retrain_outputs, api_name="retrain")
                follow_btn.click(follow_latest, None, retrain_outputs, api_name="follow_retrain")

            with gr.Tab("Models", id="models"):
                models_status = gr.Markdown(elem_id="models-status")
                models_table = gr.Dataframe(
                    headers=model_headers,
                    label="Versions (newest first)",
                    interactive=False,
                    elem_id="models-table",
                )
                with gr.Row():
                    version_choice = gr.Dropdown([], label="Version", interactive=True)
                    promote_btn = gr.Button("Promote", variant="primary")
                    rollback_btn = gr.Button("Roll back to previous", variant="stop")
                    refresh_btn = gr.Button("Refresh")
                history_table = gr.Dataframe(
                    headers=["when", "action", "version", "reason"],
                    label="History",
                    interactive=False,
                    wrap=True,
                )
                models_outputs = [models_status, models_table, history_table, version_choice]
                refresh_btn.click(models_view, None, models_outputs, api_name="models")
                promote_btn.click(promote, [version_choice], models_outputs, api_name="promote")
                rollback_btn.click(rollback, None, models_outputs, api_name="rollback")

            with gr.Tab("Insights", id="insights"):
                insights_status = gr.Markdown(elem_id="insights-status")
                insights_btn = gr.Button("Refresh")
                distribution_plot = gr.Plot(label="Class distribution")
                curves_plot = gr.Plot(label="Training curves of the current model")
                with gr.Row():
                    confusion_plot = gr.Plot(label="Confusion matrix")
                    with gr.Column():
                        per_label_table = gr.Dataframe(
                            headers=["label", "precision", "recall", "F1", "support"],
                            label="Per-label metrics", interactive=False,
                        )  # fmt: skip
                        upload_stats = gr.Dataframe(
                            value=count_rows({}), headers=["label", "uploaded clips"],
                            label="Upload statistics", interactive=False,
                        )  # fmt: skip
                gr.Markdown("### One example per label")
                example_texts, example_plots = [], []
                for label in LABELS:
                    with gr.Row():
                        example_texts.append(gr.Markdown(f"**{label}**"))
                        example_plots.append(
                            gr.Plot(label=f"{label}: waveform, log-mel, MFCC", show_label=False)
                        )
                insights_outputs = [
                    insights_status, distribution_plot, curves_plot, confusion_plot,
                    per_label_table, upload_stats, *example_texts, *example_plots,
                ]  # fmt: skip
                insights_btn.click(insights, None, insights_outputs, api_name="insights")

        def on_load():
            # One toast at most when the page opens against a server that is down.
            models = models_view(toast=False)
            if models[0].startswith("⚠️"):
                gr.Warning(models[0].strip("⚠️ *"))
            return (*models, upload_counts())

        app.load(on_load, None, [*models_outputs, counts_table], api_visibility="private")
        # Separate, so the slower Insights figures never hold up the other tabs.
        app.load(
            functools.partial(insights, toast=False),
            None,
            insights_outputs,
            api_visibility="private",
        )
    return app


def launch_app(cfg: DictConfig, *, block: bool = True) -> gr.Blocks:
    """Build and serve the app on cfg.host:cfg.port; never opens a share link."""
    import gradio as gr

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per server call is noise
    app = build_app(cfg)
    app.queue(default_concurrency_limit=int(cfg.concurrency_limit))
    auth = None
    if cfg.auth.get("username") and cfg.auth.get("password"):
        auth = (str(cfg.auth.username), str(cfg.auth.password))
    elif cfg.auth.get("username") or cfg.auth.get("password"):
        log.warning(
            "app auth needs both FAULTSENSE_APP_USER and FAULTSENSE_APP_PASSWORD; auth is off"
        )
    app.launch(
        server_name=str(cfg.host),
        server_port=int(cfg.port),
        share=False,
        ssr_mode=False,
        auth=auth,
        max_file_size=cfg.get("max_file_size"),
        prevent_thread_lock=not block,
        show_error=False,
        footer_links=["api", "settings"],
        theme=gr.themes.Default(),
    )
    return app


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
def main(cfg: DictConfig) -> None:
    launch_app(cfg)


if __name__ == "__main__":
    main()
