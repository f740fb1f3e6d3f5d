"""Hugging Face audio encoders as one backbone (HFEncoder): tiny random wav2vec2, WavLM, AST
and Whisper encoders saved with save_pretrained and loaded the way users load theirs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra.utils import instantiate

from faultsense.errors import ModelError
from faultsense.models.hf_encoder import HFEncoder, transformer_layers
from faultsense.models.net import build_net
from tests.fixtures.data import compose_config
from tests.test_models import few_steps_trainer

SR = 16_000
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 48,
}
CONV = {
    "conv_dim": (16, 16, 16),
    "conv_stride": (5, 4, 4),
    "conv_kernel": (10, 8, 4),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "mask_time_prob": 0.0,
}


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(**TINY, **CONV)), None  # no preprocessor_config


def _wavlm():
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    config = WavLMConfig(**TINY, **CONV, num_buckets=16, max_bucket_distance=20)
    return WavLMModel(config), Wav2Vec2FeatureExtractor(do_normalize=False)


def _ast():
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    # 1 s of 10-ms frames (98) padded to 100; 16x16 patches every 10 frames -> 9 + 2 tokens.
    shape = {"num_mel_bins": 16, "max_length": 100}
    config = ASTConfig(**TINY, **shape, patch_size=16, frequency_stride=10, time_stride=10)
    return ASTModel(config), ASTFeatureExtractor(**shape)


def _whisper():
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    sizes = {"layers": 2, "attention_heads": 2, "ffn_dim": 48}
    stacks = {f"{side}_{key}": n for side in ("encoder", "decoder") for key, n in sizes.items()}
    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
    config = WhisperConfig(
        d_model=32,
        **stacks,
        num_mel_bins=16,
        max_source_positions=50,  # 100 mel frames = 1 s (instead of Whisper's 30)
        max_target_positions=16,
        vocab_size=64,
        **tokens,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    return WhisperModel(config), WhisperFeatureExtractor(feature_size=16, chunk_length=1)


TINY_ENCODERS = {"wav2vec2": _wav2vec2, "wavlm": _wavlm, "ast": _ast, "whisper": _whisper}
# The module of each family that freeze=feature_encoder freezes.
FRONT = {"wav2vec2": "feature_extractor", "wavlm": "feature_extractor"}
FRONT |= {"ast": "embeddings.patch_embeddings", "whisper": "conv1"}


def save_tiny(arch: str, path):
    """A tiny random `arch` encoder (+ its feature extractor) written with save_pretrained."""
    torch.manual_seed(0)
    model, extractor = TINY_ENCODERS[arch]()
    model.save_pretrained(path)
    if extractor is not None:
        extractor.save_pretrained(path)
    return path


def net_spec(pretrained, **backbone) -> dict:
    return {
        "frontend": {"kind": "waveform", "normalize": False},
        "backbone": {
            "_target_": "faultsense.models.hf_encoder.HFEncoder",
            "pretrained": str(pretrained),
            **backbone,
        },
        "head": {"dropout": 0.0},
        "num_classes": 4,
        "sample_rate": SR,
        "clip_samples": SR,
    }


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_tiny(arch, root / arch) for arch in TINY_ENCODERS}


@pytest.mark.parametrize("arch", sorted(TINY_ENCODERS))
def test_encoder_embeds_and_rebuilds_from_its_spec_without_the_folder(arch, tmp_path, tiny_dirs):
    pretrained = shutil.copytree(tiny_dirs[arch], tmp_path / arch)
    net = build_net(net_spec(pretrained, pooling="attention")).eval()
    wave = torch.randn(3, SR)
    with torch.no_grad():
        embedding = net.embed(wave)
        logits = net(wave)
    assert embedding.shape == (3, net.backbone.out_dim) and net.backbone.out_dim == 32
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()

    spec = json.loads(json.dumps(net.spec))  # what a bundle stores: plain JSON
    assert spec["backbone"]["config"]["model_type"] == net.backbone.encoder.config.model_type
    shutil.rmtree(pretrained)  # the rebuild must need neither the hub nor the folder
    rebuilt = build_net(spec).eval()
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(wave), logits)


def test_feature_settings_come_from_the_saved_extractor(tiny_dirs):
    wavlm = HFEncoder(str(tiny_dirs["wavlm"])).feature_settings
    assert wavlm == {"kind": "waveform", "do_normalize": False, "sampling_rate": SR}
    # A folder without preprocessor_config.json gets the library's defaults.
    assert HFEncoder(str(tiny_dirs["wav2vec2"])).feature_settings["do_normalize"] is True
    whisper = HFEncoder(str(tiny_dirs["whisper"])).feature_settings
    assert whisper["n_samples"] == SR and whisper["n_mels"] == 16


@pytest.mark.parametrize("arch", ["ast", "whisper"])
def test_spectrogram_frontends_match_the_hf_feature_extractors(arch, tiny_dirs):
    """The torch features inside the model are the feature extractor's, value for value."""
    _, extractor = TINY_ENCODERS[arch]()
    backbone = HFEncoder(str(tiny_dirs[arch]))
    torch.manual_seed(1)
    waves = [0.3 * torch.randn(SR), 0.01 * torch.randn(SR // 2)]  # a short clip gets padded
    for wave in waves:
        expected = extractor(wave.numpy(), sampling_rate=SR, return_tensors="pt")
        key = "input_values" if arch == "ast" else "input_features"
        got = backbone.features(wave.unsqueeze(0))
        assert got.shape == expected[key].shape
        assert torch.allclose(got, expected[key], atol=1e-4), (got - expected[key]).abs().max()


def _trainable(module) -> bool:
    params = list(module.parameters())
    assert params
    return all(p.requires_grad for p in params)


def _frozen(module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("arch", sorted(TINY_ENCODERS))
def test_freeze_options_choose_what_trains(arch, tiny_dirs):
    pretrained = str(tiny_dirs[arch])
    top = HFEncoder(pretrained, freeze="all", unfreeze_top_k=1)
    layers = transformer_layers(top.encoder)
    assert _frozen(layers[0]) and _trainable(layers[1])
    assert _frozen(top.encoder.get_submodule(FRONT[arch]))
    assert top.layer_weights.requires_grad
    assert _frozen(HFEncoder(pretrained, freeze="all").encoder)

    front = HFEncoder(pretrained, freeze="feature_encoder").encoder
    assert _frozen(front.get_submodule(FRONT[arch]))
    assert all(_trainable(layer) for layer in transformer_layers(front))

    free = HFEncoder(pretrained, freeze="none").encoder
    assert _trainable(free.get_submodule(FRONT[arch])) and _trainable(transformer_layers(free))


def test_bad_options_and_encoders_are_clear_model_errors(tiny_dirs, tmp_path, monkeypatch):
    pretrained = str(tiny_dirs["wav2vec2"])
    with pytest.raises(ModelError, match="freeze='some'"):
        HFEncoder(pretrained, freeze="some")
    with pytest.raises(ModelError, match="unfreeze_top_k=3: the encoder has 2 layers"):
        HFEncoder(pretrained, unfreeze_top_k=3)
    with pytest.raises(ModelError, match="model.net.backbone.pretrained"):
        HFEncoder(str(tmp_path / "no-such-model"))
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**TINY, vocab_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="'bert' is not supported"):
        HFEncoder(str(tmp_path / "bert"))
    with pytest.raises(ModelError, match="frontend.kind=waveform"):
        HFEncoder(pretrained)(torch.randn(2, 1, 64, 50))
    # A hub name that cannot be fetched: a ModelError that says to pass a local folder.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="pass the local folder"):
        HFEncoder("faultsense-tests/no-such-encoder")


def test_a_spec_saved_before_feature_settings_still_builds(tiny_dirs):
    """Older wav2vec2 bundles name Wav2Vec2Backbone and record no feature settings."""
    current = build_net(net_spec(tiny_dirs["wav2vec2"])).spec
    old = dict(current["backbone"], _target_="faultsense.models.wav2vec2.Wav2Vec2Backbone")
    del old["features"]
    net = build_net({**current, "backbone": old})
    assert net.backbone.feature_settings["do_normalize"] is False  # their frontend normalized
    assert net.spec["backbone"]["_target_"].endswith("Wav2Vec2Backbone")


@pytest.mark.parametrize("arch", ["ast", "whisper"])
def test_hf_encoder_config_trains_a_step_through_lightning(arch, tiny_dirs, synthetic_datamodule):
    dm = synthetic_datamodule
    cfg = compose_config(
        "train",
        [
            "model=hf_encoder",
            f"model.net.backbone.pretrained={tiny_dirs[arch]}",
            "model.net.backbone.unfreeze_top_k=1",
            "model.net.head.hidden=16",
            "model.optimizer.lr=0.01",
            "model.scheduler.name=none",
        ],
    )
    model = instantiate(
        cfg.model,
        num_classes=len(dm.labels),
        labels=list(dm.labels),
        sample_rate=dm.sample_rate,
        clip_samples=dm.clip_samples,
        _recursive_=False,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = few_steps_trainer(3)  # one epoch of the fixture's 48 clips: train/loss is logged
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = {
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    }
    assert any("layer_weights" in n for n in changed)
    top = len(transformer_layers(model.net.backbone.encoder)) - 1
    assert any(f".{top}." in n and "backbone.encoder" in n for n in changed)
    assert not any(".0." in n and "backbone.encoder" in n for n in before)  # frozen layer
