"""FaultNet: waveform in, logits out — everything serving needs, and nothing of training.

Rebuilt from a plain JSON-able spec by `build_net`. Backbones come from an allowlist,
never from an arbitrary import string. Kept free of Lightning/torchmetrics so that
loading a bundle (server workers, hot reload, `faultsense predict`) imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import plain
from ..errors import ConfigError
from .frontend import Frontend, build_frontend


def _cnn(**kwargs: Any) -> nn.Module:
    from .cnn import FaultCNN

    return FaultCNN(**kwargs)


def _hf_encoder(**kwargs: Any) -> nn.Module:
    from .hf_encoder import HFEncoder

    return HFEncoder(**kwargs)


def _wav2vec2(**kwargs: Any) -> nn.Module:
    from .wav2vec2 import Wav2Vec2Backbone

    return Wav2Vec2Backbone(**kwargs)


def _yamnet(**kwargs: Any) -> nn.Module:
    from .yamnet import YamnetBackbone

    return YamnetBackbone(**kwargs)


# The only backbones a spec (from a config, a checkpoint or a bundle) may name.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "faultsense.models.cnn.FaultCNN": _cnn,
    "faultsense.models.hf_encoder.HFEncoder": _hf_encoder,
    # the wav2vec2 preset's name for HFEncoder, kept so older bundles and specs still build
    "faultsense.models.wav2vec2.Wav2Vec2Backbone": _wav2vec2,
    "faultsense.models.yamnet.YamnetBackbone": _yamnet,
}


class Head(nn.Module):
    """Embedding [B, in_dim] -> logits [B, num_classes]: dropout, optional hidden layer."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout)]
            in_dim = hidden
        layers.append(nn.Linear(in_dim, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CategoryHead(nn.Module):
    """Embedding [B, in_dim] -> label logits [B, num_classes], scored through the source's
    finer categories: a Head scores every category [B, K], and a label's logit is the
    log-sum-exp of its categories' logits, so softmax over labels is each label's share of
    the probability its categories get (categories without a label compete in training
    only). A fault label lumps unrelated sounds together (saws and clocks); one linear
    boundary per sound is easier to learn than one per lump.

    `category_labels[k]` is category k's label index, -1 for a category with none.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        category_labels: list[int],
        hidden: int = 0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        members = torch.zeros(num_classes, len(category_labels), dtype=torch.bool)
        for k, label in enumerate(category_labels):
            if label >= 0:
                members[int(label), k] = True
        empty = [i for i in range(num_classes) if not bool(members[i].any())]
        if empty:
            raise ConfigError(
                f"model.net.head.by_category: label index {empty} has no category in the "
                "data; use a plain head (by_category: false) for labels without categories."
            )
        self.categories = Head(in_dim, len(category_labels), hidden, dropout)
        # -1e4 not -inf: exp() of it is 0 in float32, and ONNX/quantisers keep it finite
        self.register_buffer("mask", (~members).float() * -1e4, persistent=False)

    def category_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding [B, in_dim] -> category logits [B, K]."""
        return self.categories(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.category_logits(x).unsqueeze(1) + self.mask  # [B, L, K]
        return torch.logsumexp(scores, dim=2)


class FaultNet(nn.Module):
    """Waveform [B, T] float32 at `spec['sample_rate']` -> logits [B, num_classes].

    Eval mode adds no augmentation (SpecAugment in the frontend is training-only).
    `spec` is the plain dict `build_net` rebuilds this exact architecture from.
    """

    def __init__(
        self, frontend: Frontend, backbone: nn.Module, head: Head | CategoryHead, spec: dict
    ) -> None:
        super().__init__()
        self.frontend = frontend
        self.backbone = backbone
        self.head = head
        self.spec = spec

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveform [B, T] -> embedding [B, backbone.out_dim] (what the head classifies)."""
        return self.backbone(self.frontend(wave))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(wave))


def build_net(spec: Mapping[str, Any]) -> FaultNet:
    """Build a FaultNet from `{frontend, backbone: {_target_, ...}, head, num_classes,
    sample_rate, clip_samples}`; the backbone `_target_` must be in BACKBONES."""
    spec = plain(spec)
    missing = [
        k
        for k in ("frontend", "backbone", "num_classes", "sample_rate", "clip_samples")
        if k not in spec
    ]
    if missing:
        raise ConfigError(f"Model spec is missing {', '.join(missing)}.")
    backbone_spec = dict(spec["backbone"])
    target = backbone_spec.pop("_target_", None)
    if target not in BACKBONES:
        raise ConfigError(
            f"model.net.backbone._target_={target!r} is not an allowed backbone; "
            f"choose one of: {', '.join(BACKBONES)}."
        )
    frontend = build_frontend({"sample_rate": spec["sample_rate"], **spec["frontend"]})
    try:
        backbone = BACKBONES[target](**backbone_spec)
    except TypeError as err:
        raise ConfigError(f"model.net.backbone ({target}): {err}") from None
    head_spec = dict(spec.get("head") or {})
    head_cls = CategoryHead if "category_labels" in head_spec else Head
    try:
        head = head_cls(backbone.out_dim, int(spec["num_classes"]), **head_spec)
    except TypeError as err:
        raise ConfigError(f"model.net.head: {err}") from None
    resolved = backbone.spec() if hasattr(backbone, "spec") else backbone_spec
    full = {
        "frontend": dict(spec["frontend"]),
        "backbone": {"_target_": target, **resolved},
        "head": head_spec,
        "num_classes": int(spec["num_classes"]),
        "sample_rate": int(spec["sample_rate"]),
        "clip_samples": int(spec["clip_samples"]),
    }
    return FaultNet(frontend, backbone, head, full)
