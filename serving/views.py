"""Display-only views of clips and of the server's reports for the app: numpy features
(waveform, log-mel, MFCC) and plain-language readings of a clip, and the matplotlib
figures the tabs show. The model computes its own features inside the bundle on the
server; nothing here feeds it."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Distinct colors for the first labels (the ESC-50 mapping's four keep their old colors);
# more labels get evenly spaced hues.
PALETTE = (
    "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """One color per label, in order, for any number of labels."""
    colors = {}
    for i, label in enumerate(labels):
        if i < len(PALETTE):
            colors[label] = PALETTE[i]
            continue
        # Golden-ratio hue steps stay apart however many labels there are.
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.85)
        colors[label] = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
    return colors


def load_clip(
    source: str | Path | bytes, max_seconds: float, name: str | None = None
) -> tuple[np.ndarray, int]:
    """Decode a clip (a path, or the bytes of a file) for display at its own sample rate:
    mono float32 [T] and the rate.

    Uses the project's one decoder (same errors as the server), but at the file's native
    rate: the waveform plot shows the file as uploaded.
    """
    import io

    import soundfile as sf

    from faultsense.audio import decode

    in_memory = isinstance(source, bytes)
    try:
        rate = int(sf.info(io.BytesIO(source) if in_memory else str(source)).samplerate)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        rate = 16_000  # decode() below raises the clear AudioError
    name = name or ("clip" if in_memory else Path(source).name)
    wave = decode(source, sample_rate=rate, max_seconds=max_seconds, name=name)
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
    """Per-window probability of each label (the model's: the windows' own) along a long
    recording."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8), layout="constrained")
    ax = fig.subplots()
    centres = [(w["start_s"] + w["end_s"]) / 2 for w in windows]
    labels: list[str] = []
    for w in windows:
        labels += [k for k in w.get("probabilities") or {} if k not in labels]
    colors = label_colors(labels)
    for label in labels:
        probs = [float(w.get("probabilities", {}).get(label, 0.0)) for w in windows]
        ax.plot(centres, probs, marker="o", ms=3, label=label, color=colors[label])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time (s, window centre)")
    ax.set_ylabel("probability")
    ax.set_title("per-window probabilities", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def distribution_figure(
    dataset: Mapping[str, Mapping[str, int]],
    uploads: Mapping[str, int] | None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Grouped bars: clips per label (`labels` first, then any other counted) in each split
    (and uploads waiting for retraining)."""
    from matplotlib.figure import Figure

    groups = {split: dict(counts) for split, counts in dataset.items()}
    if uploads:
        groups["uploads"] = dict(uploads)
    fig = Figure(figsize=(9, 3), layout="constrained")
    ax = fig.subplots()
    labels = list(labels or [])
    for counts in groups.values():
        labels += [k for k in counts if k not in labels]
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(labels))
    for i, (split, counts) in enumerate(groups.items()):
        values = [int(counts.get(label, 0)) for label in labels]
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0)
    ax.set_ylabel("clips")
    ax.set_title("class distribution per split", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def monitor_figure(report: Mapping[str, Any]) -> Figure:
    """The /monitor report drawn: predictions per label over time (left) and the recent
    confidence distribution with the low-confidence threshold (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3), layout="constrained")
    ax_time, ax_conf = fig.subplots(1, 2, width_ratios=[2, 1])
    timeline = report.get("timeline") or {}
    counts = timeline.get("counts") or {}
    colors = label_colors(list(counts))
    x = np.arange(len(timeline.get("start") or []))
    bottom = np.zeros(len(x))
    for label, values in counts.items():
        if len(values) == len(x) and any(values):
            ax_time.bar(x, values, bottom=bottom, label=label, color=colors[label])
            bottom += np.asarray(values, dtype=float)
    ticks = x[:: max(1, len(x) // 6)]
    ax_time.set_xticks(ticks, [str(timeline["start"][i])[5:16] for i in ticks], fontsize=7)
    ax_time.set_ylabel(f"predictions / {timeline.get('bucket_s') or '?'} s")
    ax_time.set_title("predictions over time (UTC)", fontsize=10)
    if counts:
        ax_time.legend(fontsize=7)
    confidence = report.get("confidence") or {}
    edges, hist = confidence.get("bins") or [0.0, 1.0], confidence.get("counts") or [0]
    ax_conf.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4c72b0")
    threshold = (report.get("low_confidence") or {}).get("threshold")
    if threshold is not None:
        ax_conf.axvline(threshold, color="#c44e52", ls="--", label="low-confidence threshold")
        ax_conf.legend(fontsize=7)
    ax_conf.set_xlim(0, 1)
    ax_conf.set_xlabel("confidence")
    ax_conf.set_title(f"confidence, model {report.get('version')}", fontsize=10)
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


def find_examples(
    folders: Sequence[str | Path], labels: Sequence[str] | None = None
) -> dict[str, Path]:
    """One clip per label (of `labels`; None = every `<label>/` sub-folder found) from the
    first folder that has `<label>/<clip>` files."""
    from faultsense.audio import AUDIO_SUFFIXES

    found: dict[str, Path] = {}
    for folder in folders:
        root = Path(folder)
        names = labels
        if names is None and root.is_dir():
            names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
        for label in names or ():
            directory = Path(folder) / label
            if label in found or not directory.is_dir():
                continue
            clips = sorted(p for p in directory.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if clips:
                found[label] = clips[0]
    return found
