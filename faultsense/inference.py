"""Predictor: a registered bundle -> label probabilities for waveforms of any length.

Every consumer (server, UI via the server, CLI) goes through this class. Clips shorter
than the model's clip length are zero-padded (as in training); longer ones are cut into
windows of `clip_samples` every `clip_samples // 2` samples, each window is classified,
and the clip's probabilities are the mean over its windows. All windows of all clips in
a call go through the network together, in chunks of at most `max_batch` windows to
bound memory.

Fast path: measured with `experiments/bench_predict.py` on one CPU core (figures in
experiments/README.md); a traced, frozen TorchScript graph (`fast_path="jit"`, BN folded
into convs) beat eager, channels-last and `torch.compile` at batch 1 and was on par with
them at batch 32, without compile's ~1 min warm-up per process and per batch shape
(which would also stall every hot reload), so it is the default. If tracing
fails or changes the outputs (e.g. a backbone that cannot be traced), the Predictor
falls back to eager mode and logs why.

Runtime: `runtime="onnx"` runs the frontend in torch and the rest of the net in ONNX
Runtime on the CPU (`faultsense.onnx_export.build_onnx_runner`: ~1.4x the traced graph
at batch 32 and ~1.5x at batch 1 on one core, issue 16; the exported graph is cached in
`onnx_cache` by the bundle's weights). If the export fails, or does not reproduce eager
PyTorch, or the device is not the CPU, the Predictor uses `fast_path` in torch and logs why.

Device: `device="cuda:0"` (or any torch device) puts the net, every input batch and the
traced graph on that device; probabilities always come back as numpy on the CPU. The
default is the CPU.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .audio import AudioSource, decode, sliding_windows
from .errors import AudioError, ConfigError
from .registry import Bundle, Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FAST_PATHS = ("jit", "eager", "channels_last")
DEFAULT_FAST_PATH = "jit"
RUNTIMES = ("torch", "onnx")
DEFAULT_MAX_BATCH = 128
# A traced graph must reproduce eager logits to this tolerance or it is not used.
_TRACE_ATOL = 1e-4


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start sample of each window `audio.sliding_windows` makes for a clip of this length."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


def build_runner(
    net: nn.Module,
    clip_samples: int,
    fast_path: str = DEFAULT_FAST_PATH,
    device: str | torch.device = "cpu",
):
    """Move an eval-mode net (waveforms [N, clip_samples] -> logits [N, C]) to `device`
    and wrap it in `fast_path`; the runner takes input tensors on that device.

    Returns `(runner, used_path)`; `used_path` is "eager" when the requested path could
    not be built faithfully, or the backbone says `eager_is_faster` (measured, e.g. YAMNet).
    """
    import torch

    if fast_path not in FAST_PATHS:
        raise ConfigError(f"fast_path={fast_path!r}: choose one of {', '.join(FAST_PATHS)}.")
    net = net.to(device).eval()
    if fast_path == "eager" or getattr(getattr(net, "backbone", None), "eager_is_faster", False):
        return net, "eager"
    if fast_path == "channels_last":
        return net.to(memory_format=torch.channels_last), "channels_last"
    # Made on the CPU (seeded, the same everywhere), then moved: the trace runs on `device`.
    example = torch.randn(3, clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    example = example.to(device)
    try:
        # TorchScript is deprecated upstream but still the fastest CPU path on the pinned
        # torch 2.11 (see the module docstring); the warnings would only repeat that.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(net, example[:2], check_trace=False)
            runner = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            with torch.inference_mode():
                # A different batch size than traced: the graph must not bake in the batch.
                diff = (runner(example) - net(example)).abs().max().item()
    except Exception as err:  # tracing support varies by backbone; eager always works
        log.warning("TorchScript tracing failed (%s); using eager mode.", err)
        return net, "eager"
    if not diff <= _TRACE_ATOL:
        log.warning("Traced model differs from eager by %.3g; using eager mode.", diff)
        return net, "eager"
    return runner, "jit"


@dataclass(frozen=True)
class _Loaded:
    """Everything one prediction needs, swapped as a unit on reload."""

    version: str | None
    meta: dict[str, Any]
    runner: Callable[[torch.Tensor], torch.Tensor]
    fast_path: str  # "onnx" when ONNX Runtime runs the net
    device: str
    labels: tuple[str, ...]
    sample_rate: int
    clip_samples: int
    hop_samples: int


class Predictor:
    """A loaded model bundle that turns waveforms into label probabilities.

    Thread-safe: `predict` reads the loaded model once per call, and `reload_if_changed`
    builds the new model completely before swapping it in with one assignment, so there
    is never a moment without a model and a call never mixes two versions.
    """

    def __init__(
        self,
        net: nn.Module,
        meta: dict[str, Any],
        *,
        registry: Registry | None = None,
        follow_current: bool = False,
        fast_path: str = DEFAULT_FAST_PATH,
        max_batch: int = DEFAULT_MAX_BATCH,
        device: str | torch.device | None = None,
        runtime: str = "torch",
        onnx_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}.")
        self._registry = registry
        self._follow = follow_current and registry is not None
        self._fast_path = fast_path
        self._runtime = runtime
        self._onnx_cache = Path(onnx_cache) if onnx_cache else None
        # Kept as text: `_Loaded` is swapped on reload and rebuilt on the same device.
        self._device = str(device or "cpu")
        self.max_batch = max(1, int(max_batch))
        self._reload_lock = threading.Lock()
        self._pointer = self._pointer_stat() if self._follow else None
        self._loaded = self._load(net, meta)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_registry(
        cls,
        root: str | os.PathLike[str] | None = None,
        version: str | None = None,
        *,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """Load `version`, or the current version (then `reload_if_changed` follows it), on
        `device` (default the CPU; e.g. "cuda:0"). Other keywords go to the constructor."""
        registry = Registry(root)
        follow = version is None
        if follow:
            # Stat before reading so a promotion racing with this load is seen on next reload.
            pointer = registry.state_path
            stat = _stat_key(pointer)
            bundle = registry.current()
        else:
            stat, bundle = None, registry.get(version)
        predictor = cls.from_bundle(
            bundle, registry=registry, follow_current=follow, device=device, **kwargs
        )
        predictor._pointer = stat
        return predictor

    @classmethod
    def from_bundle(cls, bundle: Bundle, **kwargs: Any) -> Predictor:
        return cls(bundle.load_net(), {**bundle.meta, "version": bundle.version}, **kwargs)

    def _load(self, net: nn.Module, meta: dict[str, Any]) -> _Loaded:
        clip = int(meta["clip_samples"])
        runner = self._onnx_runner(net, meta) if self._runtime == "onnx" else None
        if runner is not None:
            used = "onnx"
        else:
            runner, used = build_runner(net, clip, self._fast_path, self._device)
        return _Loaded(
            version=meta.get("version"),
            meta=dict(meta),
            runner=runner,
            fast_path=used,
            device=self._device,
            labels=tuple(meta["labels"]),
            sample_rate=int(meta["sample_rate"]),
            clip_samples=clip,
            hop_samples=max(1, clip // 2),
        )

    def _onnx_runner(self, net: nn.Module, meta: dict[str, Any]) -> Callable | None:
        """The ONNX Runtime path for `net`, or None (logged why) to run it in torch."""
        import torch

        from .onnx_export import build_onnx_runner

        version = meta.get("version")
        if torch.device(self._device).type != "cpu":
            log.info(
                "Model %s: ONNX Runtime serves on the CPU only; torch on %s.", version, self._device
            )
            return None
        try:
            runner = build_onnx_runner(
                net,
                int(meta["clip_samples"]),
                self._onnx_cache,
                meta.get("weights_sha256"),
                threads=torch.get_num_threads(),
            )
        except Exception as err:  # any export/runtime failure: torch always works
            log.warning("Model %s: not on ONNX Runtime (%s); using torch.", version, err)
            return None
        log.info(
            "Model %s on ONNX Runtime (graph from %s, %s frontend).",
            version,
            runner.source,
            runner.frontend_kind,
        )
        return runner

    # -- what callers read --------------------------------------------------------------

    @property
    def version(self) -> str | None:
        return self._loaded.version

    @property
    def labels(self) -> list[str]:
        return list(self._loaded.labels)

    @property
    def sample_rate(self) -> int:
        return self._loaded.sample_rate

    @property
    def clip_samples(self) -> int:
        return self._loaded.clip_samples

    @property
    def hop_samples(self) -> int:
        return self._loaded.hop_samples

    @property
    def fast_path(self) -> str:
        """How the loaded net runs: "onnx" (ONNX Runtime) or a torch FAST_PATHS value."""
        return self._loaded.fast_path

    @property
    def runtime(self) -> str:
        """The runtime the loaded net runs on: "onnx" or "torch" (asked for, or fallen back to)."""
        return "onnx" if self._loaded.fast_path == "onnx" else "torch"

    @property
    def device(self) -> str:
        """The torch device the net and its input batches are on ("cpu", "cuda:0", ...)."""
        return self._loaded.device

    @property
    def meta(self) -> dict[str, Any]:
        """The bundle.json of the loaded version (metrics, created_at, ...)."""
        return dict(self._loaded.meta)

    # -- prediction ---------------------------------------------------------------------

    def predict(
        self, waves: Sequence[np.ndarray], names: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Mono float waveforms [T] at `sample_rate` -> one result dict per waveform:
        `{label, confidence, probabilities: {label: p}, version, duration_s, windows:
        [{start_s, end_s, label, confidence, probabilities}]}`."""
        import torch

        model = self._loaded  # one version for the whole call, even if a reload happens
        if len(waves) == 0:
            return []
        clips = [self._check(w, names[i] if names else f"clip {i}") for i, w in enumerate(waves)]
        starts = [window_starts(len(w), model.clip_samples, model.hop_samples) for w in clips]
        windows = np.concatenate(
            [sliding_windows(w, model.clip_samples, model.hop_samples) for w in clips]
        )
        probs = np.empty((len(windows), len(model.labels)), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, len(windows), self.max_batch):
                batch = torch.from_numpy(windows[lo : lo + self.max_batch]).to(model.device)
                logits = model.runner(batch).float()
                probs[lo : lo + len(batch)] = torch.softmax(logits, 1).cpu().numpy()

        results, offset = [], 0
        sr = model.sample_rate
        for wave, clip_starts in zip(clips, starts, strict=True):
            clip_probs = probs[offset : offset + len(clip_starts)]
            offset += len(clip_starts)
            result = self._describe(clip_probs.mean(axis=0), model)
            result["version"] = model.version
            result["duration_s"] = len(wave) / sr
            result["windows"] = [
                {
                    "start_s": s / sr,
                    "end_s": min(s + model.clip_samples, len(wave)) / sr,
                    **self._describe(p, model),
                }
                for s, p in zip(clip_starts, clip_probs, strict=True)
            ]
            results.append(result)
        return results

    def predict_bytes(
        self, data: AudioSource, name: str | None = None, max_seconds: float | None = None
    ) -> dict[str, Any]:
        """Decode audio (bytes, path or file object) at the model rate and predict it."""
        wave = decode(data, sample_rate=self.sample_rate, max_seconds=max_seconds, name=name)
        return self.predict([wave], names=[name or "<audio bytes>"])[0]

    @staticmethod
    def _describe(p: np.ndarray, model: _Loaded) -> dict[str, Any]:
        best = int(np.argmax(p))
        return {
            "label": model.labels[best],
            "confidence": float(p[best]),
            "probabilities": {label: float(v) for label, v in zip(model.labels, p, strict=True)},
        }

    @staticmethod
    def _check(wave: Any, what: str) -> np.ndarray:
        arr = np.asarray(wave)
        if arr.ndim != 1:
            raise AudioError(f"{what}: expected a mono waveform [T], got shape {arr.shape}.")
        if arr.size == 0:
            raise AudioError(f"{what} contains no audio samples.")
        if not np.issubdtype(arr.dtype, np.number):
            raise AudioError(f"{what}: samples must be numbers, got {arr.dtype}.")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise AudioError(f"{what} contains NaN or infinite samples.")
        return arr

    # -- hot reload ---------------------------------------------------------------------

    def _pointer_stat(self) -> tuple[int, int, int] | None:
        assert self._registry is not None
        return _stat_key(self._registry.state_path)

    def reload_if_changed(self) -> bool:
        """Swap to the registry's current version if it changed; True if swapped.

        Cheap when nothing changed (one stat of registry.json, which is replaced, never
        edited in place, on every registry write). A predictor pinned to a version never
        reloads. If the new bundle cannot be loaded, the old model keeps serving.
        """
        if not self._follow:
            return False
        if self._pointer_stat() == self._pointer:
            return False
        with self._reload_lock:
            stat = self._pointer_stat()
            if stat == self._pointer:
                return False  # another thread already reloaded
            assert self._registry is not None
            try:
                current = self._registry.current_version()
                if current is None or current == self._loaded.version:
                    self._pointer = stat
                    return False
                bundle = self._registry.get(current)
                loaded = self._load(bundle.load_net(), {**bundle.meta, "version": current})
            except Exception as err:
                self._pointer = stat  # do not retry a broken bundle on every request
                log.error("Keeping model %s: cannot load new current: %s", self.version, err)
                return False
            self._loaded = loaded  # one assignment: readers see the old or the new, never none
            self._pointer = stat
        log.info("Reloaded model: now serving %s", loaded.version)
        return True


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
