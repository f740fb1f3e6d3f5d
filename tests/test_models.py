"""Models: frontends, augmentation, FaultNet specs, the backbone allowlist, wav2vec2."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from faultsense.errors import ConfigError, ModelError
from faultsense.models.classifier import FaultClassifier, build_net
from faultsense.models.frontend import MFCC, LogMel, SpecAugment, WaveAugment, mixup

SR = 16_000
CNN = {"_target_": "faultsense.models.cnn.FaultCNN", "widths": [8, 16], "dropout": 0.0}


def cnn_spec(**frontend) -> dict:
    return {
        "frontend": {"kind": "logmel", "n_mels": 32, "hop_ms": 20, **frontend},
        "backbone": dict(CNN),
        "head": {"dropout": 0.0},
        "num_classes": 4,
        "sample_rate": SR,
        "clip_samples": SR,
    }


def few_steps_trainer(steps: int) -> L.Trainer:
    """A quiet CPU Trainer that fits `steps` batches and validates on one."""
    return L.Trainer(
        max_steps=steps,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def test_logmel_and_mfcc_shapes_and_per_clip_normalization():
    wave = torch.randn(3, SR)
    mel = LogMel(SR, n_mels=40, hop_ms=20)(wave)
    assert mel.shape == (3, 1, 40, SR // 320 + 1)
    assert torch.allclose(mel.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-4)
    mfcc = MFCC(SR, n_mfcc=20, n_mels=40, hop_ms=20)(wave)
    assert mfcc.shape == (3, 1, 20, SR // 320 + 1)
    # Per-clip normalization: a louder copy of a clip gives the same features.
    assert torch.allclose(LogMel(SR)(wave * 10), LogMel(SR)(wave), atol=1e-3)


def test_top_db_floors_digital_silence_per_clip():
    """Zero padding sits at the 1e-10 floor (-100 dB) unless top_db lifts it to peak - top_db;
    the floor is each clip's own, so a clip's features do not depend on its batch."""
    t = torch.arange(SR) / SR
    tone = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    padded = torch.cat([tone[: SR // 2], torch.zeros(SR // 2)])
    quiet = 0.01 * torch.randn(SR)
    raw = LogMel(SR, normalize=False)(padded[None])
    assert float(raw.min()) == pytest.approx(-100.0)
    clipped = LogMel(SR, normalize=False, top_db=80.0)(torch.stack([padded, quiet]))
    peaks = clipped.amax(dim=(1, 2, 3))
    floors = clipped.amin(dim=(1, 2, 3))
    assert float(floors[0]) == pytest.approx(float(peaks[0]) - 80.0)  # the padding, lifted
    assert float(floors[1]) > float(peaks[1]) - 80.0  # noise spans < 80 dB: untouched
    alone = LogMel(SR, top_db=80.0)(padded[None])
    assert torch.allclose(LogMel(SR, top_db=80.0)(torch.stack([padded, quiet]))[:1], alone)
    # MFCC shares the log-mel, so it takes the same option.
    assert MFCC(SR, n_mfcc=20, top_db=80.0)(padded[None]).isfinite().all()
    with pytest.raises(ConfigError, match="top_db"):
        build_net(cnn_spec(top_db=-5))


def test_spec_augment_masks_only_in_training():
    x = torch.randn(4, 1, 32, 100)
    aug = SpecAugment(freq_masks=2, freq_width=8, time_masks=2, time_width=20)
    assert torch.equal(aug.eval()(x), x)
    torch.manual_seed(0)
    out = aug.train()(x)
    assert out.shape == x.shape and (out == 0).sum() > (x == 0).sum()


def test_wave_augment_is_identity_in_eval_and_per_example_in_training():
    torch.manual_seed(0)
    wave = torch.randn(8, SR)
    aug = WaveAugment(gain_db=6, shift=0.5, noise_p=1.0, snr_db=(20, 20))
    assert torch.equal(aug.eval()(wave), wave)
    out = aug.train()(wave)
    assert out.shape == wave.shape and not torch.allclose(out, wave)
    # A circular shift alone keeps every sample (a permutation of each clip).
    shifted = WaveAugment(gain_db=0, shift=0.5, noise_p=0).train()(wave)
    assert torch.allclose(shifted.sort(dim=1).values, wave.sort(dim=1).values)
    # Noise at 20 dB SNR: the added power is ~1% of the clip's power.
    noisy = WaveAugment(gain_db=0, shift=0, noise_p=1.0, snr_db=(20, 20)).train()(wave)
    ratio = (noisy - wave).pow(2).mean() / wave.pow(2).mean()
    assert 0.008 < float(ratio) < 0.012
    speed = WaveAugment(gain_db=0, shift=0, noise_p=0, speed=(0.8, 0.9)).train()(wave)
    assert speed.shape == wave.shape


def test_mixup_keeps_the_first_clip_dominant():
    wave, target = torch.randn(6, 100), torch.arange(6)
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, a, b, lam = mixup(wave, target, alpha=0.4)
        assert mixed.shape == wave.shape and 0.5 <= lam <= 1.0
        assert torch.equal(a, target) and sorted(b.tolist()) == target.tolist()
        # Each clip is lam * itself + (1 - lam) * the clip whose label is its `b`.
        torch.testing.assert_close(mixed, lam * wave + (1 - lam) * wave[b])


def test_faultnet_is_waveform_to_logits_deterministic_and_batch_independent():
    net = build_net(cnn_spec(spec_augment={"freq_masks": 2, "freq_width": 4})).eval()
    wave = torch.randn(5, SR)
    with torch.no_grad():
        logits = net(wave)
        assert logits.shape == (5, 4)
        assert torch.equal(net(wave), logits)  # eval mode adds no augmentation
        # A clip's prediction does not depend on its batch-mates (serving batches freely).
        assert torch.allclose(net(wave[2:3]), logits[2:3], atol=1e-5)
    # The spec is plain JSON and rebuilds the same architecture.
    again = build_net(json.loads(json.dumps(net.spec)))
    again.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(again.eval()(wave), logits, atol=1e-6)


def test_stem_pool_gives_128_mel_bands_the_residual_maps_of_64():
    coarse = build_net(cnn_spec(n_mels=64)).eval()
    spec = cnn_spec(n_mels=128, n_fft=1024, win_ms=32)
    spec["backbone"]["stem_pool"] = [4, 2]  # a JSON list, as a bundle spec holds it
    fine = build_net(json.loads(json.dumps(spec))).eval()
    wave = torch.randn(2, SR)
    with torch.no_grad():
        fine_feats, coarse_feats = fine.frontend(wave), coarse.frontend(wave)
        assert fine_feats.shape[2] == 2 * coarse_feats.shape[2]
        # Same map into the residual stages, so the same cost after the stem.
        assert fine.backbone.stem(fine_feats).shape == coarse.backbone.stem(coarse_feats).shape
        assert fine(wave).shape == (2, 4)


@pytest.mark.parametrize("target", ["os.system", "torch.nn.Linear", None])
def test_backbones_come_only_from_the_allowlist(target):
    spec = cnn_spec()
    spec["backbone"] = {"_target_": target}
    with pytest.raises(ConfigError, match="allowed backbone"):
        build_net(spec)


def test_bad_frontend_and_backbone_args_are_config_errors():
    with pytest.raises(ConfigError, match="frontend.kind"):
        build_net(cnn_spec(kind="cqt"))
    spec = cnn_spec()
    spec["backbone"]["depth_multiplier"] = 2
    with pytest.raises(ConfigError, match="backbone"):
        build_net(spec)


def test_classifier_hparams_are_primitives_only():
    from omegaconf import OmegaConf

    spec = cnn_spec()
    model = FaultClassifier(
        net=OmegaConf.create({k: spec[k] for k in ("frontend", "backbone", "head")}),
        num_classes=4,
        sample_rate=SR,
        clip_samples=SR,
        class_weights=[1.0, 2.0, 1.0, 0.5],
        optimizer=OmegaConf.create({"name": "adamw", "lr": 1e-3}),
    )

    def check(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert value is None or isinstance(value, bool | int | float | str), type(value)

    check(dict(model.hparams))
    assert model.net_spec()["backbone"]["_target_"] == CNN["_target_"]


# --- wav2vec2 ---------------------------------------------------------------------------


def tiny_wav2vec2_dir(path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
    )
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(path)
    return path


def wav2vec2_model(pretrained, **backbone) -> FaultClassifier:
    return FaultClassifier(
        net={
            "frontend": {"kind": "waveform"},
            "backbone": {
                "_target_": "faultsense.models.wav2vec2.Wav2Vec2Backbone",
                "pretrained": str(pretrained),
                **backbone,
            },
            "head": {"hidden": 16, "dropout": 0.0},
        },
        sample_rate=SR,
        clip_samples=2 * SR,
        optimizer={"name": "adamw", "lr": 1e-3},
    )


def test_wav2vec2_head_trains_a_step_saves_and_reloads_without_the_hub(
    tmp_path, synthetic_datamodule
):
    import shutil

    pretrained = tiny_wav2vec2_dir(tmp_path / "tiny-w2v")
    model = wav2vec2_model(pretrained, pooling="attention")
    encoder = model.net.backbone.encoder
    assert not any(p.requires_grad for p in encoder.feature_extractor.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = few_steps_trainer(1)
    trainer.fit(model, datamodule=synthetic_datamodule)
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any("layer_weights" in n for n in changed) and any(
        "encoder.encoder" in n for n in changed
    )
    ckpt = tmp_path / "w2v.ckpt"
    trainer.save_checkpoint(ckpt)
    assert (
        torch.load(ckpt, weights_only=True)["net_spec"]["backbone"]["config"]["hidden_size"] == 32
    )

    shutil.rmtree(pretrained)  # reloading must rebuild from the stored config, not the hub/dir
    loaded = FaultClassifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    wave = torch.randn(2, 2 * SR)
    with torch.no_grad():
        assert torch.allclose(loaded(wave), model.eval()(wave), atol=1e-5)


def test_wav2vec2_full_freeze_unfreezes_only_the_top_layers(tmp_path):
    pretrained = tiny_wav2vec2_dir(tmp_path / "tiny-w2v")
    backbone = wav2vec2_model(pretrained, freeze="all", unfreeze_top_k=1).net.backbone
    layers = backbone.encoder.encoder.layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert backbone.layer_weights.requires_grad


def test_missing_pretrained_encoder_says_how_to_pass_a_local_dir(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="model.net.backbone.pretrained"):
        wav2vec2_model(tmp_path / "no-such-model")
    # A hub name that cannot be fetched (offline here, whatever the network): a ModelError
    # naming the local-folder override.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="pretrained=/path"):
        wav2vec2_model("faultsense-tests/no-such-encoder")


# --- auxiliary ESC-50 category head -----------------------------------------------------


def test_aux_category_head_trains_with_the_net_and_stays_out_of_the_bundle(
    tmp_path, synthetic_datamodule
):
    from faultsense.export import export_checkpoint

    dm = synthetic_datamodule
    spec = cnn_spec()
    model = FaultClassifier(
        net={k: spec[k] for k in ("frontend", "backbone", "head")},
        sample_rate=dm.sample_rate,
        clip_samples=dm.clip_samples,
        optimizer={"name": "adamw", "lr": 1e-3},
        num_categories=len(dm.categories),
        aux_weight=0.5,
    )
    # The 8 mapped synthetic categories + dog, an aux-only one.
    assert model.aux_head is not None
    assert model.hparams["num_categories"] == len(dm.categories) == 9

    # Targets of -1 (an upload's category, an aux-only clip's label) add nothing, never NaN.
    with torch.no_grad():
        embedding = model.net.embed(torch.randn(4, dm.clip_samples))
    unknown = torch.full((4, 2), -1)
    assert float(model._embedding_loss(embedding, unknown)) == 0.0
    labeled_only = torch.tensor([[0, -1], [1, -1], [2, -1], [3, -1]])
    both = torch.tensor([[0, 0], [1, 2], [2, 4], [3, 6]])
    assert float(model._embedding_loss(embedding, both)) > float(
        model._embedding_loss(embedding, labeled_only)
    )

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = few_steps_trainer(2)
    trainer.fit(model, datamodule=dm)
    for prefix in ("aux_head.", "net.backbone.", "net.head."):
        assert any(
            not torch.equal(p, before[n])
            for n, p in model.named_parameters()
            if n.startswith(prefix)
        ), prefix

    ckpt = tmp_path / "aux.ckpt"
    trainer.save_checkpoint(ckpt)
    net, _ = export_checkpoint(ckpt)
    assert not any("aux" in k for k in net.state_dict())
    wave = torch.randn(2, dm.clip_samples)
    with torch.no_grad():
        assert torch.allclose(net(wave), model.eval()(wave), atol=1e-5)
    reloaded = FaultClassifier.load_from_checkpoint(ckpt, weights_only=True)
    assert reloaded.aux_head is not None  # resume keeps training the aux head


# --- a head over the source's categories (head.by_category) -----------------------------


def test_category_head_gives_each_label_the_probability_of_its_categories():
    from faultsense.models.net import CategoryHead

    # 5 categories: 0, 1 -> label 0; 2 -> label 1; 3 -> label 2; 4 has no label
    head = CategoryHead(8, 3, [0, 0, 1, 2, -1], dropout=0.0).eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        label_probs = head(x).softmax(dim=1)
        cat_probs = head.category_logits(x).softmax(dim=1)
    mapped = torch.stack(
        [cat_probs[:, 0] + cat_probs[:, 1], cat_probs[:, 2], cat_probs[:, 3]], dim=1
    )
    assert torch.allclose(label_probs, mapped / mapped.sum(dim=1, keepdim=True), atol=1e-5)


def test_by_category_head_trains_on_categories_and_rebuilds_from_the_bundle_spec(
    tmp_path, synthetic_datamodule
):
    from faultsense.export import export_checkpoint
    from faultsense.models.net import CategoryHead

    dm = synthetic_datamodule
    spec = cnn_spec()
    model = FaultClassifier(
        net={**{k: spec[k] for k in ("frontend", "backbone")}, "head": {"by_category": True}},
        labels=list(dm.labels),
        sample_rate=dm.sample_rate,
        clip_samples=dm.clip_samples,
        num_categories=len(dm.categories),
        category_labels=list(dm.category_labels),
        aux_weight=1.0,
    )
    assert isinstance(model.net.head, CategoryHead) and model.aux_head is None
    # dog is the synthetic source's aux-only category: no label
    assert dm.category_labels[dm.categories.index("dog")] == -1
    head_spec = model.net_spec()["head"]
    assert "by_category" not in head_spec and head_spec["category_labels"] == dm.category_labels

    with torch.no_grad():
        embedding = model.net.embed(torch.randn(4, dm.clip_samples))
    labeled_only = torch.tensor([[0, -1], [1, -1], [2, -1], [3, -1]])
    categories_only = torch.tensor([[-1, 0], [-1, 2], [-1, 4], [-1, 8]])
    assert float(model._embedding_loss(embedding, categories_only)) > 0  # aux clips count
    assert float(model._embedding_loss(embedding, labeled_only)) > 0  # uploads count

    trainer = few_steps_trainer(2)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "by_category.ckpt"
    trainer.save_checkpoint(ckpt)
    net, _ = export_checkpoint(ckpt)
    rebuilt = build_net(net.spec)
    rebuilt.load_state_dict(net.state_dict())
    wave = torch.randn(2, dm.clip_samples)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(wave), model.eval()(wave), atol=1e-5)


def test_by_category_head_names_the_labels_without_categories():
    spec = cnn_spec()
    with pytest.raises(ConfigError, match="none for: fluid_leak"):
        FaultClassifier(
            net={**{k: spec[k] for k in ("frontend", "backbone")}, "head": {"by_category": True}},
            labels=["electrical_fault", "fluid_leak"],
            category_labels=[0, 0, -1],
        )


def test_by_category_auto_takes_the_category_head_only_where_every_label_has_categories():
    spec = cnn_spec()
    net = {**{k: spec[k] for k in ("frontend", "backbone")}, "head": {"by_category": "auto"}}
    labels = ["electrical_fault", "fluid_leak"]
    own = FaultClassifier(net=net, labels=labels, category_labels=[0, 0, -1])  # own labels
    assert "category_labels" not in own.net_spec()["head"]
    mapped = FaultClassifier(net=net, labels=labels, category_labels=[0, 1, -1])  # ESC-50-like
    assert mapped.net_spec()["head"]["category_labels"] == [0, 1, -1]
