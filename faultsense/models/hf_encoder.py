"""Any Hugging Face audio encoder (`transformers` AutoModel) as one backbone.

Supported: waveform encoders with a convolutional feature encoder (wav2vec2, HuBERT, WavLM,
data2vec-audio, ...), the Audio Spectrogram Transformer (Kaldi fbank input) and Whisper's
encoder (log-mel input; the decoder is dropped). Each encoder's own feature extractor is
re-implemented in torch as a submodule, so the frontend stays part of the model: serving
feeds waveforms, and the features match what the encoder was pretrained on.

Loaded by hub name or a local `save_pretrained` folder. `spec()` records the encoder's
config and the feature extractor's settings, so a checkpoint or bundle rebuilds the
architecture with `AutoModel.from_config` (no hub, no folder); its weights then come
from the state dict.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

log = logging.getLogger(__name__)

FREEZE = ("all", "feature_encoder", "none")
POOLING = ("mean", "attention")
# Where each family keeps its convolutional / patch-embedding front ("feature encoder"),
# and its stack of transformer layers (wav2vec2 family, AST, Whisper's encoder).
_FEATURE_ENCODER_PATHS = ("feature_extractor", "embeddings.patch_embeddings", "conv1", "conv2")
_LAYER_PATHS = ("encoder.layers", "encoder.layer", "layers", "layer")
_SUPPORTED = (
    "waveform encoders with a conv feature encoder (wav2vec2, hubert, wavlm, data2vec-audio, "
    "...), audio-spectrogram-transformer (AST), whisper"
)


# --- the encoders' feature extractors, in torch -------------------------------------------


class WaveformInput(nn.Module):
    """Waveform [B, T] -> input_values [B, T]; Wav2Vec2FeatureExtractor's zero-mean,
    unit-variance normalization per clip when `do_normalize`."""

    def __init__(self, do_normalize: bool = True, sampling_rate: int = 16_000) -> None:
        super().__init__()
        self.do_normalize = do_normalize

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if not self.do_normalize:
            return wave
        mean = wave.mean(dim=-1, keepdim=True)
        var = wave.var(dim=-1, keepdim=True, unbiased=False)
        return (wave - mean) / torch.sqrt(var + 1e-7)

    def valid_frames(self, num_samples: int) -> int | None:
        return None  # every output frame covers the clip


class ASTFbank(nn.Module):
    """Waveform [B, T] -> input_values [B, max_length, num_mel_bins], as ASTFeatureExtractor:
    Kaldi fbank (25 ms Hanning window, 10 ms shift), zero-padded or cut to `max_length`
    frames, then `(fbank - mean) / (2 std)` when `do_normalize`."""

    def __init__(
        self,
        num_mel_bins: int = 128,
        max_length: int = 1024,
        do_normalize: bool = True,
        mean: float = -4.2677393,
        std: float = 4.5689974,
        sampling_rate: int = 16_000,
    ) -> None:
        super().__init__()
        self.num_mel_bins = num_mel_bins
        self.max_length = max_length
        self.do_normalize = do_normalize
        self.mean = mean
        self.std = std
        self.sampling_rate = sampling_rate

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        from torchaudio.compliance import kaldi

        feats = []
        for clip in wave:  # kaldi.fbank takes one [channels, T] signal
            fbank = kaldi.fbank(
                clip.unsqueeze(0),
                sample_frequency=self.sampling_rate,
                window_type="hanning",
                num_mel_bins=self.num_mel_bins,
            )[: self.max_length]
            feats.append(nn.functional.pad(fbank, (0, 0, 0, self.max_length - fbank.shape[0])))
        out = torch.stack(feats)
        return (out - self.mean) / (self.std * 2) if self.do_normalize else out

    def valid_frames(self, num_samples: int) -> int | None:
        return None  # AST's tokens are patches over time and frequency, not frames


class WhisperLogMel(nn.Module):
    """Waveform [B, T] -> input_features [B, n_mels, n_samples // hop_length], as
    WhisperFeatureExtractor: zero-pad or cut to `n_samples`, |STFT|^2 (Hann, centered, last
    frame dropped), Slaney mel filters 0-8 kHz, log10 floored 8 below each clip's peak,
    then (x + 4) / 4."""

    def __init__(
        self,
        n_mels: int = 80,
        n_samples: int = 480_000,
        n_fft: int = 400,
        hop_length: int = 160,
        sampling_rate: int = 16_000,
    ) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_samples = n_samples
        self.n_fft = n_fft
        self.hop_length = hop_length
        filters = mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        # Fixed by the settings, so not in the state dict (old bundles stay loadable).
        self.register_buffer(
            "mel_filters", torch.tensor(filters.T, dtype=torch.float32), persistent=False
        )
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = nn.functional.pad(
            wave[:, : self.n_samples], (0, max(0, self.n_samples - wave.shape[-1]))
        )
        stft = torch.stft(
            wave, self.n_fft, self.hop_length, window=self.window, return_complex=True
        )
        power = stft[..., :-1].abs() ** 2  # [B, freqs, frames]
        log_spec = torch.clamp(self.mel_filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    def valid_frames(self, num_samples: int) -> int | None:
        """Encoder frames (conv stride 2 over mel frames) that cover the clip, not padding."""
        return max(1, math.ceil(min(num_samples, self.n_samples) / self.hop_length / 2))


_INPUTS: dict[str, type[nn.Module]] = {
    "waveform": WaveformInput,
    "ast_fbank": ASTFbank,
    "whisper_logmel": WhisperLogMel,
}


def input_kind(config: Any) -> str:
    """Which feature extractor an encoder config takes: a key of `_INPUTS`."""
    if config.model_type == "audio-spectrogram-transformer":
        return "ast_fbank"
    if config.model_type == "whisper":
        return "whisper_logmel"
    if hasattr(config, "conv_dim"):
        return "waveform"
    raise ModelError(
        f"model.net.backbone: encoder type {config.model_type!r} is not supported; "
        f"supported: {_SUPPORTED}."
    )


def _default_extractor(kind: str) -> Any:
    """The feature extractor with its library defaults (a folder without preprocessor_config)."""
    from transformers import ASTFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    default = {
        "waveform": Wav2Vec2FeatureExtractor,
        "ast_fbank": ASTFeatureExtractor,
        "whisper_logmel": WhisperFeatureExtractor,
    }
    return default[kind]()


def feature_settings(config: Any, extractor: Any | None = None) -> dict[str, Any]:
    """Plain settings of the encoder's input features: `{kind, ...kwargs of _INPUTS[kind]}`.
    Shapes come from the model config (its position embeddings fix them); normalization,
    window and rate from the feature extractor (library defaults when there is none)."""
    kind = input_kind(config)
    fx = extractor if extractor is not None else _default_extractor(kind)
    rate = int(fx.sampling_rate)
    if kind == "waveform":
        return {"kind": kind, "do_normalize": bool(fx.do_normalize), "sampling_rate": rate}
    if kind == "ast_fbank":
        return {
            "kind": kind,
            "num_mel_bins": int(config.num_mel_bins),
            "max_length": int(config.max_length),
            "do_normalize": bool(fx.do_normalize),
            "mean": float(fx.mean),
            "std": float(fx.std),
            "sampling_rate": rate,
        }
    # Whisper's encoder takes exactly 2 x max_source_positions mel frames (conv stride 2).
    hop = int(fx.hop_length)
    return {
        "kind": kind,
        "n_mels": int(config.num_mel_bins),
        "n_samples": int(config.max_source_positions) * 2 * hop,
        "n_fft": int(fx.n_fft),
        "hop_length": hop,
        "sampling_rate": rate,
    }


def build_features(settings: dict[str, Any]) -> nn.Module:
    """The torch feature extractor for `feature_settings(...)`."""
    settings = dict(settings)
    kind = settings.pop("kind", None)
    if kind not in _INPUTS:
        raise ModelError(
            f"model.net.backbone.features.kind={kind!r}: choose one of {sorted(_INPUTS)}."
        )
    try:
        return _INPUTS[kind](**settings)
    except TypeError as err:
        raise ModelError(f"model.net.backbone.features ({kind}): {err}") from None


# --- loading ------------------------------------------------------------------------------


def _no_layerdrop(config: Any) -> None:
    """Every layer's hidden state must exist every step (the layer mix stacks them)."""
    for key in ("layerdrop", "encoder_layerdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)


def _encoder_only(model: nn.Module) -> nn.Module:
    """The audio encoder of an encoder-decoder model (Whisper); the model itself otherwise."""
    return model.get_encoder() if model.config.is_encoder_decoder else model


def _source(pretrained: str) -> str:
    """A hub name as it is, or a local folder (which must hold config.json) as a path."""
    path = Path(pretrained).expanduser()
    if not (pretrained.startswith((".", "/", "~")) or path.exists()):
        return pretrained
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.net.backbone.pretrained={pretrained!r}: no config.json there. Pass a folder "
            "written by save_pretrained() (config.json + weights)."
        )
    return str(path)


def _fetch_error(pretrained: str, err: Exception) -> ModelError:
    first = str(err).splitlines()[0] if str(err) else ""
    return ModelError(
        f"Could not load pretrained encoder {pretrained!r} ({type(err).__name__}: {first}). "
        "Without network access, download it elsewhere with save_pretrained() (model and "
        "feature extractor) and pass the local folder: "
        "model.net.backbone.pretrained=/path/to/encoder"
    )


def _extractor(source: str) -> Any | None:
    """The folder's/hub model's feature extractor, or None when it ships none."""
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("%s has no feature extractor config; using the library defaults.", source)
        return None


def load_pretrained(pretrained: str) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder in float32, its feature settings) from a hub name or save_pretrained folder."""
    from transformers import AutoConfig, AutoModel

    source = _source(pretrained)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _fetch_error(pretrained, err) from None
    input_kind(config)  # an unsupported encoder fails before its weights download
    _no_layerdrop(config)
    try:
        model = AutoModel.from_pretrained(source, config=config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise _fetch_error(pretrained, err) from None
    return _encoder_only(model), feature_settings(config, _extractor(source))


def encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """The encoder architecture from its saved config dict, randomly initialized (no hub)."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(config)
    model_type = cfg.pop("model_type", "wav2vec2")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as err:
        raise ModelError(f"model.net.backbone.config: {str(err).splitlines()[0]}") from None
    input_kind(hf_config)
    _no_layerdrop(hf_config)
    if not hf_config.is_encoder_decoder:
        return AutoModel.from_config(hf_config, dtype=torch.float32)
    # Build only the encoder: find its class on the meta device (no memory, no init).
    with torch.device("meta"):
        encoder_cls = type(AutoModel.from_config(hf_config).get_encoder())
    return encoder_cls._from_config(hf_config, dtype=torch.float32)


# --- the backbone -------------------------------------------------------------------------


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (bottom first)."""
    for path in _LAYER_PATHS:
        layers = _submodule(encoder, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"{type(encoder).__name__}: no transformer layer stack found.")


def set_trainable(encoder: nn.Module, freeze: str, unfreeze_top_k: int) -> None:
    """Freeze `all` (then unfreeze the top k layers), only the `feature_encoder`, or `none`.
    Parameters the encoder keeps fixed itself (Whisper's sinusoidal positions) stay fixed."""
    trainable = {id(p) for p in encoder.parameters() if p.requires_grad}
    if freeze == "feature_encoder":
        fronts = [_submodule(encoder, path) for path in _FEATURE_ENCODER_PATHS]
        fronts = [module for module in fronts if module is not None]
        if not fronts:
            raise ModelError(
                f"model.net.backbone.freeze=feature_encoder: {type(encoder).__name__} has no "
                "separate feature encoder; choose 'all' or 'none'."
            )
        for module in fronts:
            module.requires_grad_(False)
    if freeze != "all":
        return
    encoder.requires_grad_(False)
    layers = list(transformer_layers(encoder))
    for layer in layers[len(layers) - unfreeze_top_k :] if unfreeze_top_k else []:
        for p in layer.parameters():
            p.requires_grad = id(p) in trainable


class HFEncoder(nn.Module):
    """Waveform [B, T] (at the encoder's rate, 16 kHz for all listed) -> embedding
    [B, out_dim = hidden_size].

    The encoder's feature extractor (in torch) makes its input; the hidden states of all
    layers are mixed by learned softmax weights, then pooled over frames (Whisper: only the
    frames that cover the clip, not its 30-s padding).

    Args:
        pretrained: hub name (e.g. MIT/ast-finetuned-audioset-10-10-0.4593) or a local
            save_pretrained folder.
        freeze: "all" (the encoder frozen; layer mix, pooling and head train),
            "feature_encoder" (only the conv/patch-embedding front frozen) or "none".
        unfreeze_top_k: with freeze="all", fine-tune the top k transformer layers.
        pooling: "mean" or "attention" (learned attentive pooling over frames).
        config: the encoder's config dict; when given, the architecture is built from it
            with random weights (no hub access): checkpoints and bundles use this.
        features: the feature extractor's settings (`feature_settings`); read from the
            pretrained encoder when not given.
    """

    def __init__(
        self,
        pretrained: str,
        freeze: str = "all",
        unfreeze_top_k: int = 0,
        pooling: str = "mean",
        config: dict[str, Any] | None = None,
        features: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if freeze not in FREEZE:
            raise ModelError(f"model.net.backbone.freeze={freeze!r}: choose one of {FREEZE}.")
        if pooling not in POOLING:
            raise ModelError(f"model.net.backbone.pooling={pooling!r}: choose one of {POOLING}.")
        self.pretrained = str(pretrained)
        self.freeze = freeze
        self.unfreeze_top_k = int(unfreeze_top_k)
        self.pooling = pooling
        if config is None:
            encoder, loaded = load_pretrained(self.pretrained)
        else:
            encoder = encoder_from_config(config)
            loaded = features or _legacy_features(encoder.config)
        self.feature_settings = dict(features or loaded)
        self.features = build_features(self.feature_settings)
        # from_pretrained returns eval mode; follow the parent module's mode like any layer.
        self.encoder = encoder.train()
        n_layers = len(transformer_layers(self.encoder))
        if not 0 <= self.unfreeze_top_k <= n_layers:
            raise ModelError(
                f"model.net.backbone.unfreeze_top_k={unfreeze_top_k}: the encoder has "
                f"{n_layers} layers."
            )
        set_trainable(self.encoder, freeze, self.unfreeze_top_k)
        hidden = int(self.encoder.config.hidden_size)
        self.layer_weights = nn.Parameter(torch.zeros(n_layers + 1))  # + the embeddings
        self.attention = nn.Linear(hidden, 1) if pooling == "attention" else None
        self.out_dim = hidden

    def spec(self) -> dict[str, Any]:
        """Plain, JSON-able kwargs that rebuild this backbone without the hub."""
        return {
            "pretrained": self.pretrained,
            "freeze": self.freeze,
            "unfreeze_top_k": self.unfreeze_top_k,
            "pooling": self.pooling,
            "config": json.loads(self.encoder.config.to_json_string(use_diff=False)),
            "features": dict(self.feature_settings),
        }

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise ModelError(
                f"{type(self).__name__} takes waveforms [B, T], got {tuple(wave.shape)}: "
                "use model.net.frontend.kind=waveform."
            )
        out = self.encoder(self.features(wave), output_hidden_states=True)
        states = torch.stack(out.hidden_states, dim=0)  # [L+1, B, frames, H]
        weights = torch.softmax(self.layer_weights, dim=0).view(-1, 1, 1, 1)
        hidden = (weights * states).sum(dim=0)[:, : self.features.valid_frames(wave.shape[-1])]
        if self.attention is not None:
            attn = torch.softmax(self.attention(hidden), dim=1)  # [B, frames, 1]
            return (attn * hidden).sum(dim=1)
        return hidden.mean(dim=1)


def _legacy_features(config: Any) -> dict[str, Any]:
    """Feature settings for a spec saved without them: library defaults, except that a
    waveform encoder takes the waveform as it is (the wav2vec2 bundles saved so
    before had their frontend normalize it already)."""
    settings = feature_settings(config)
    if settings["kind"] == "waveform":
        settings["do_normalize"] = False
    return settings
