"""ONNX export of a FaultNet (waveform [B, T] -> logits [B, C]), checked against PyTorch,
and the ONNX Runtime serving path.

`Registry.register(..., onnx=True)` calls `export_onnx` on the staged bundle before
anything is registered; `onnx_parity` is the check, also usable on a registered bundle.

Serving (`Predictor(runtime="onnx")`, `server.runtime`): `build_onnx_runner` runs the
net's frontend (its torch part, below) in numpy where it has a twin
(models/frontend_numpy.py, checked against eager torch on every load), else in torch
(traced), and the rest (backbone + head) in ONNX Runtime. The
whole-net export is slower than torch in ONNX Runtime: its STFT kernel took 56% of the
graph's time and the graph ran at 0.65x the traced torch net on batches of 32; the
convolutions alone ran ~2x faster than torch's at batch 1 and ~1.2x at batch 32
(experiments/README.md, issue 16). The rest is exported with the TorchScript-based
exporter (~1 s against the dynamo exporter's ~8 s: a hot reload waits for it) into a
cache keyed by the bundle's weights and spec, and checked against eager PyTorch every
time it is loaded. torch, numpy and onnxruntime are imported inside the functions.

Where the torch part ends: a backbone may say so with a pair of methods,
`features(x) -> tensor` (runs in torch, after the net's frontend) and
`from_features(features) -> embedding` (exported), with forward(x) ==
from_features(features(x)). YamnetBackbone does: its framing (unfold) has no ONNX export,
and its encoder runs ~2.4x faster in ONNX Runtime at batch 1 (experiments/yamnet_speed.py).
Without the pair the split is the net's frontend | backbone + head. A backbone may also
offer `export_module()`: a module computing `from_features` in the form ONNX Runtime runs
fastest (YamnetBackbone's folds batch norm and TensorFlow's padding into plain convs),
exported in its place.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError
from .fileio import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# ONNX Runtime and PyTorch use different kernels (e.g. for the FFT): agree to this.
ONNX_PARITY_ATOL = 1e-3
OPSET = 18
# Part of the ONNX cache key: a new revision re-exports graphs cached by older code
# (2: YamnetBackbone.export_module).
EXPORT_REVISION = 2


def export_onnx(net: nn.Module, clip_samples: int, path: Path) -> dict[str, Any]:
    """Export `net` to ONNX at `path` and check it against PyTorch.

    Returns the bundle.json `onnx` entry ({file, sha256, opset, max_abs_diff}). Raises
    ModelError if the export fails or the outputs differ by more than ONNX_PARITY_ATOL.
    """
    import numpy as np
    import torch

    net = net.eval()
    example = torch.randn(2, clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    try:
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=["waveform"],
            output_names=["logits"],
            # Any batch size; the time axis stays clip_samples (the Predictor's window).
            dynamic_shapes={_forward_arg(net): {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    except Exception as err:
        raise ModelError(f"ONNX export of {type(net).__name__} failed: {err}") from None
    try:
        diff = onnx_parity(net, path, clip_samples)
    except Exception as err:  # onnxruntime raises its own error types
        raise ModelError(f"Exported ONNX model cannot be run by onnxruntime: {err}") from None
    if not np.isfinite(diff) or diff > ONNX_PARITY_ATOL:
        raise ModelError(
            f"ONNX export differs from PyTorch by {diff:.3g} (> {ONNX_PARITY_ATOL:g}); not registered."
        )
    return {"file": path.name, "sha256": sha256_file(path), "opset": OPSET, "max_abs_diff": diff}


def _forward_arg(net: nn.Module) -> str:
    return next(iter(inspect.signature(net.forward).parameters), "x")


def onnx_parity(net: nn.Module, path: Path, clip_samples: int, batch: int = 3) -> float:
    """Max |logits_onnx - logits_torch| on a fixed random batch of waveforms."""
    import numpy as np
    import onnxruntime as ort
    import torch

    waves = torch.randn(batch, clip_samples, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.inference_mode():
        expected = net.eval()(waves).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: waves.numpy()})[0]
    return float(np.max(np.abs(got - expected)))


# Clips per frontend call on the ONNX path: torch's log-mel cost ~1.8 ms a clip in
# chunks of 1-2 against ~2.8 ms in one batch of 32 (cache-bound), on one core (issue 16).
FRONTEND_CHUNK = 2


class OnnxRunner:
    """Waveforms [N, clip_samples] (a CPU tensor) -> logits [N, C] (a CPU tensor): the
    torch part (`frontend`: the net's frontend, and the backbone's `features` if it has
    them) FRONTEND_CHUNK clips at a time, the rest in ONNX Runtime. Rows
    that come out non-finite are recomputed by `whole` (the traced torch net): huge
    samples (a float WAV of 1e30s) overflow the split graph's power spectrum to NaN,
    while the traced whole net stays finite (tests/test_hostile_inputs.py)."""

    def __init__(
        self, frontend: Any, session: Any, source: str, net: nn.Module, clip_samples: int
    ) -> None:
        self.frontend = frontend
        self.net, self.clip_samples = net, clip_samples
        self._whole: Any = None  # traced on first need: non-finite rows are rare
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.source = source  # "cache" or "export": where the ONNX graph came from
        self.frontend_kind = "numpy" if isinstance(frontend, NumpyPart) else "torch"

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            parts = [
                self.frontend(wave[i : i + FRONTEND_CHUNK])
                for i in range(0, len(wave), FRONTEND_CHUNK)
            ]
            features = parts[0] if len(parts) == 1 else torch.cat(parts)
        logits = torch.from_numpy(self.session.run(None, {self.input_name: features.numpy()})[0])
        bad = ~torch.isfinite(logits).all(dim=1)
        if bad.any():
            with torch.inference_mode():
                logits[bad] = self.whole()(wave[bad]).to(logits.dtype)
        return logits

    def whole(self) -> Any:
        """The traced whole net, built the first time a row comes out non-finite (tracing
        costs ~1 s a load, and most runners never need it)."""
        if self._whole is None:
            from .inference import build_runner

            self._whole = build_runner(self.net, self.clip_samples, "jit")[0]
        return self._whole


def build_onnx_runner(
    net: nn.Module, clip_samples: int, cache_dir: Path | None, key: str | None, threads: int = 1
) -> OnnxRunner:
    """The ONNX Runtime path for an eval-mode FaultNet on the CPU. The rest's graph is
    read from `cache_dir/<hash of key>.onnx` when there, else exported (and cached when
    `cache_dir` and `key`, e.g. the weights' sha256, are given); either way it must
    reproduce eager PyTorch to ONNX_PARITY_ATOL. Raises ModelError saying why not."""
    from .inference import build_runner

    net = net.to("cpu").eval()
    if not all(hasattr(net, part) for part in ("frontend", "backbone", "head")):
        raise ModelError(f"{type(net).__name__} has no frontend/backbone/head to split.")
    # The numpy twin when it has one (checked against eager torch), else the traced frontend.
    torch_part = (
        _numpy_part(net, clip_samples) or build_runner(_torch_part(net), clip_samples, "jit")[0]
    )
    cached = _cache_path(cache_dir, net, key)
    runner = None
    if cached is not None and cached.is_file():
        runner = _checked_runner(
            net, torch_part, cached, clip_samples, threads, "cache", raise_=False
        )
    if runner is None:
        runner = _export_runner(net, torch_part, clip_samples, cached, threads)
    return runner


def _cache_path(cache_dir: Path | None, net: nn.Module, key: str | None) -> Path | None:
    """Where the rest's graph for this net is cached: a hash of the key (the weights),
    the net's spec and the exporter's versions; None without a cache or a key."""
    import onnxruntime
    import torch

    if cache_dir is None or not key:
        return None
    spec = json.dumps(getattr(net, "spec", None), sort_keys=True, default=str)
    split = "features" if _splits_at_features(net.backbone) else "frontend"
    parts = (key, spec, split, torch.__version__, onnxruntime.__version__, str(OPSET))
    parts += (str(FRONTEND_CHUNK), str(EXPORT_REVISION))
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"rest-{digest}.onnx"


def _export_runner(
    net: nn.Module, torch_part: Any, clip_samples: int, cached: Path | None, threads: int
) -> OnnxRunner:
    """Export the rest of `net` (to `cached`, atomically, when given), check and load it."""
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Two workers may export at once: each to its own file, the last rename wins.
        fd, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=cached.parent)
    else:
        fd, tmp_name = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _export_rest(net, clip_samples, tmp)
        runner = _checked_runner(net, torch_part, tmp, clip_samples, threads, "export")
        if cached is not None:
            os.replace(tmp, cached)
        return runner
    finally:
        tmp.unlink(missing_ok=True)


def _export_rest(net: nn.Module, clip_samples: int, path: Path) -> None:
    """What follows `net`'s torch part (its features -> logits) as ONNX at `path`."""
    import torch

    example = torch.randn(2, clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():  # not inference_mode: the exporter traces with these tensors
        features = _torch_part(net)(example)
    try:
        # The TorchScript-based exporter: deprecated upstream (warnings silenced) but ~8x
        # faster than dynamo here, and a hot reload waits for it; parity is checked after.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _rest_module(net),
                (features,),
                str(path),
                dynamo=False,
                input_names=["features"],
                output_names=["logits"],
                dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
            )
    except Exception as err:
        raise ModelError(
            f"ONNX export of {type(net).__name__}'s backbone and head failed: {err}"
        ) from None


def _checked_runner(
    net: nn.Module,
    torch_part: Any,
    path: Path,
    clip_samples: int,
    threads: int,
    source: str,
    raise_: bool = True,
) -> OnnxRunner | None:
    """An OnnxRunner over the graph at `path` and `torch_part` (traced) if it reproduces
    eager `net`; else a ModelError (or None when not `raise_`)."""
    import numpy as np
    import torch

    try:
        runner = OnnxRunner(torch_part, _session(path, threads), source, net, clip_samples)
        waves = torch.randn(3, clip_samples, generator=torch.Generator().manual_seed(1)) * 0.1
        with torch.inference_mode():
            diff = float((runner(waves) - net(waves)).abs().max())
    except Exception as err:  # onnxruntime raises its own error types
        if not raise_:
            return None
        raise ModelError(f"ONNX Runtime cannot run {path.name}: {err}") from None
    if np.isfinite(diff) and diff <= ONNX_PARITY_ATOL:
        return runner
    if raise_:
        raise ModelError(
            f"ONNX Runtime differs from PyTorch by {diff:.3g} (> {ONNX_PARITY_ATOL:g})."
        )
    return None


def _session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session on `threads` intra-op threads, nodes run one after
    another, no spinning threads (the cores are shared with the HTTP processes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class NumpyPart:
    """The torch part as numpy (models/frontend_numpy.py): waveforms [N, T] (a CPU
    tensor) -> features (a CPU tensor: [N, 1, n, frames], or YAMNet's [N, P, 96, 64])."""

    def __init__(self, twin: Any) -> None:
        self.twin = twin

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.twin(wave.numpy()))


def _numpy_part(net: nn.Module, clip_samples: int) -> NumpyPart | None:
    """A NumpyPart for `net`'s torch part when it has a numpy twin that reproduces the
    eager torch part to NUMPY_FRONTEND_ATOL on noise, silence and a loud clip; else None
    (the torch part then runs, logged why)."""
    import torch

    from .models.frontend_numpy import NUMPY_FRONTEND_ATOL, numpy_torch_part

    twin = numpy_torch_part(net)
    if twin is None:
        return None
    waves = torch.randn(3, clip_samples, generator=torch.Generator().manual_seed(2)) * 0.1
    waves[1] = 0.0
    waves[2] *= 5.0
    part = NumpyPart(twin)
    with torch.inference_mode():
        diff = float((part(waves) - _torch_part(net)(waves)).abs().max())
    if diff <= NUMPY_FRONTEND_ATOL:  # also False for NaN
        return part
    log.warning(
        "numpy frontend differs from torch by %.3g (> %g); the frontend runs in torch.",
        diff,
        NUMPY_FRONTEND_ATOL,
    )
    return None


def _splits_at_features(backbone: nn.Module) -> bool:
    """Whether `backbone` names where its torch part ends (`features` / `from_features`)."""
    return all(callable(getattr(backbone, name, None)) for name in ("features", "from_features"))


def _torch_part(net: nn.Module) -> nn.Module:
    """What runs in torch: waveform -> the net's frontend, then the backbone's `features`
    when it has the pair (see the module docstring)."""
    from torch import nn

    if not _splits_at_features(net.backbone):
        return net.frontend

    class TorchPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frontend, self.backbone = net.frontend, net.backbone

        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            return self.backbone.features(self.frontend(wave))

    return TorchPart().eval()


def _rest_module(net: nn.Module) -> nn.Module:
    """What follows the torch part (`_torch_part`): its features -> logits, through the
    backbone (or its `from_features`) and the head."""
    from torch import nn

    embed = net.backbone.from_features if _splits_at_features(net.backbone) else net.backbone
    if callable(getattr(net.backbone, "export_module", None)):
        embed = net.backbone.export_module()

    class Rest(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = net.backbone, net.head
            self.embed = embed if isinstance(embed, nn.Module) else None

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.head(embed(features))

    return Rest().eval()
