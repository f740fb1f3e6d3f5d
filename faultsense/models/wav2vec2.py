"""The wav2vec2 preset's backbone: `HFEncoder` (models/hf_encoder.py) with its former defaults.

Kept as a name so configs, checkpoints and bundles that say
`faultsense.models.wav2vec2.Wav2Vec2Backbone` still build; new configs use `HFEncoder`.
"""

from __future__ import annotations

from typing import Any

from .hf_encoder import HFEncoder


class Wav2Vec2Backbone(HFEncoder):
    """`HFEncoder` defaulting to facebook/wav2vec2-base with only its conv feature encoder
    frozen (what this class did before it generalised)."""

    def __init__(
        self,
        pretrained: str = "facebook/wav2vec2-base",
        freeze: str = "feature_encoder",
        unfreeze_top_k: int = 0,
        pooling: str = "mean",
        config: dict[str, Any] | None = None,
        features: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(pretrained, freeze, unfreeze_top_k, pooling, config, features)
