"""Models: feature frontends, backbones (CNN, wav2vec2) and the LightningModule.

`FaultNet` (waveform [B, T] -> logits [B, C]) is what serving runs; `FaultClassifier`
trains it. Import the submodules you need (they import torch).
"""

from .classifier import BACKBONES, FaultClassifier, FaultNet, build_net

__all__ = ["BACKBONES", "FaultClassifier", "FaultNet", "build_net"]
