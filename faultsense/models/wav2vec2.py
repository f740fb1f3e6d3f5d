"""A pretrained speech encoder (wav2vec2 / HuBERT / WavLM via `transformers`) as a backbone.

Loaded with `from_pretrained(name_or_local_dir)`; the convolutional feature encoder is always
frozen, the transformer can be frozen whole or unfrozen from the top. Hidden states of all
layers are combined by a learned softmax-weighted sum, then pooled over time.

Once built, `spec()` records the encoder's config, so a bundle or checkpoint rebuilds the
architecture without the hub (weights then come from the state dict).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError


def _load_encoder(pretrained: str, config: dict[str, Any] | None) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    overrides = {"layerdrop": 0.0}  # hidden states of every layer must exist every step
    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", "wav2vec2")
        cfg.update(overrides)
        return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))
    looks_local = pretrained.startswith((".", "/", "~")) or Path(pretrained).exists()
    path = Path(pretrained).expanduser()
    if looks_local and not (path / "config.json").is_file():
        raise ModelError(
            f"model.net.backbone.pretrained={pretrained!r}: no config.json there. Pass a folder "
            "written by save_pretrained() (config.json + weights)."
        )
    try:
        return AutoModel.from_pretrained(str(path) if looks_local else pretrained, **overrides)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Could not load pretrained encoder {pretrained!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Without network access, download it "
            "elsewhere with save_pretrained() and pass the local folder: "
            "model.net.backbone.pretrained=/path/to/wav2vec2-base"
        ) from None


class Wav2Vec2Backbone(nn.Module):
    """Waveform [B, T] (16 kHz, per-clip normalized) -> embedding [B, out_dim = hidden_size].

    Args:
        pretrained: hub name (e.g. facebook/wav2vec2-base) or a local save_pretrained folder.
        freeze: "feature_encoder" (default: only the conv feature encoder frozen), "all"
            (the whole encoder frozen; only the layer weights, pooling and head train).
        unfreeze_top_k: with freeze="all", unfreeze the top k transformer layers.
        pooling: "mean" or "attention" (learned attentive pooling over frames).
        config: the encoder's config dict; when given, the architecture is built from it
            with random weights (no hub access) — checkpoints and bundles use this.
    """

    def __init__(
        self,
        pretrained: str = "facebook/wav2vec2-base",
        freeze: str = "feature_encoder",
        unfreeze_top_k: int = 0,
        pooling: str = "mean",
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if freeze not in ("feature_encoder", "all"):
            raise ModelError(
                f"model.net.backbone.freeze={freeze!r}: choose 'feature_encoder' or 'all'."
            )
        if pooling not in ("mean", "attention"):
            raise ModelError(
                f"model.net.backbone.pooling={pooling!r}: choose 'mean' or 'attention'."
            )
        self.pretrained = pretrained
        self.freeze = freeze
        self.unfreeze_top_k = unfreeze_top_k
        self.pooling = pooling
        # from_pretrained returns eval mode; follow the parent module's mode like any layer.
        self.encoder = _load_encoder(pretrained, config).train()
        # The feature encoder must stay frozen whatever the config says: it is the part
        # that overfits tiny datasets fastest and costs most memory in backward.
        for p in self.encoder.feature_extractor.parameters():
            p.requires_grad = False
        if freeze == "all":
            for p in self.encoder.parameters():
                p.requires_grad = False
            layers = self.encoder.encoder.layers
            for layer in list(layers)[len(layers) - unfreeze_top_k :] if unfreeze_top_k else []:
                for p in layer.parameters():
                    p.requires_grad = True
        hidden = int(self.encoder.config.hidden_size)
        n_states = int(self.encoder.config.num_hidden_layers) + 1
        self.layer_weights = nn.Parameter(torch.zeros(n_states))
        self.attention = nn.Linear(hidden, 1) if pooling == "attention" else None
        self.out_dim = hidden

    def spec(self) -> dict[str, Any]:
        """Plain, JSON-able kwargs that rebuild this backbone without the hub."""
        config = json.loads(self.encoder.config.to_json_string(use_diff=False))
        return {
            "pretrained": self.pretrained,
            "freeze": self.freeze,
            "unfreeze_top_k": self.unfreeze_top_k,
            "pooling": self.pooling,
            "config": config,
        }

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        out = self.encoder(wave, output_hidden_states=True)
        states = torch.stack(out.hidden_states, dim=0)  # [L+1, B, frames, H]
        weights = torch.softmax(self.layer_weights, dim=0).view(-1, 1, 1, 1)
        hidden = (weights * states).sum(dim=0)  # [B, frames, H]
        if self.attention is not None:
            attn = torch.softmax(self.attention(hidden), dim=1)  # [B, frames, 1]
            return (attn * hidden).sum(dim=1)
        return hidden.mean(dim=1)
