"""ONNX export of a FaultNet (waveform [B, T] -> logits [B, C]), checked against PyTorch.

`Registry.register(..., onnx=True)` calls `export_onnx` on the staged bundle before
anything is registered; `onnx_parity` is the check, also usable on a registered bundle.
torch, numpy and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError
from .fileio import sha256_file

if TYPE_CHECKING:
    from torch import nn

# ONNX Runtime and PyTorch use different kernels (e.g. for the FFT): agree to this.
ONNX_PARITY_ATOL = 1e-3
OPSET = 18


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
