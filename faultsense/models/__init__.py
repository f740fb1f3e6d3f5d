"""Models: feature frontends, backbones (CNN, wav2vec2), FaultNet and the LightningModule.

`net.FaultNet` (waveform [B, T] -> logits [B, C]) is what serving runs and imports only
torch; `classifier.FaultClassifier` trains it (Lightning). Import the submodule you need.
"""
