"""Predictor: bundle parity, short/long clips, batching, hot reload, ONNX parity."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from faultsense.audio import to_wav_bytes
from faultsense.errors import AudioError, RegistryError
from faultsense.inference import Predictor
from faultsense.onnx_export import onnx_parity
from faultsense.registry import Registry


def clip(seconds: float, seed: int, sr: int = 16_000) -> np.ndarray:
    """A noisy tone: something with structure for the frontend to see."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (200 + 300 * seed) * t)
    return (tone + rng.normal(0, 0.05, t.size)).astype(np.float32)


def softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits, dim=1).numpy()


def probs(result: dict) -> np.ndarray:
    return np.array(list(result["probabilities"].values()))


@pytest.fixture(scope="module")
def predictor(trained_registry) -> Predictor:
    return Predictor.from_registry(trained_registry)


def test_predictor_matches_the_trained_checkpoint(trained_registry, smoke_checkpoint, predictor):
    from faultsense.models.classifier import FaultClassifier

    ckpt = torch.load(smoke_checkpoint[0], map_location="cpu", weights_only=True)
    module = FaultClassifier(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    n = predictor.clip_samples
    waves = [clip(n / predictor.sample_rate, seed) for seed in range(3)]
    with torch.inference_mode():
        expected = softmax(module(torch.from_numpy(np.stack(waves))))
    results = predictor.predict(waves)
    assert predictor.version == "v1"
    assert predictor.labels == list(module.labels)
    for result, p in zip(results, expected, strict=True):
        np.testing.assert_allclose(probs(result), p, atol=1e-4)
        assert result["version"] == "v1"
        assert result["label"] == predictor.labels[int(p.argmax())]
        assert result["confidence"] == pytest.approx(float(p.max()), abs=1e-4)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_short_clip_is_padded_like_training(predictor, trained_registry, tmp_path):
    """A clip shorter than the model's length is scored on exactly the clip training sees
    for that file: the DataModule's waveform cache (decoded, padded, int16)."""
    from faultsense.data.cache import INT16_SCALE, get_or_build
    from faultsense.data.manifest import ManifestRow

    n, sr = predictor.clip_samples, predictor.sample_rate
    short = clip(0.4 * n / sr, seed=1)
    path = tmp_path / "short.wav"
    path.write_bytes(to_wav_bytes(short, sr))
    row = ManifestRow(id="short", path=str(path), category="", label="normal", fold=0, source="t")
    cache = get_or_build([row], tmp_path / "cache", "t", sample_rate=sr, clip_samples=n)
    trained_on = torch.from_numpy(np.asarray(cache.waves[0], dtype=np.float32) / INT16_SCALE)
    assert trained_on.shape == (n,) and not trained_on[len(short) + 1 :].any()  # zero-padded

    with torch.inference_mode():
        net = Registry(trained_registry).current().load_net()
        expected = softmax(net(trained_on[None]))[0]
    result = predictor.predict_bytes(path.read_bytes(), name="short.wav")
    np.testing.assert_allclose(probs(result), expected, atol=1e-4)
    assert len(result["windows"]) == 1
    assert result["duration_s"] == pytest.approx(len(short) / sr)
    assert result["windows"][0]["start_s"] == 0.0
    assert result["windows"][0]["end_s"] == pytest.approx(result["duration_s"])


def test_long_clip_is_classified_by_half_overlapping_windows(predictor):
    n, sr = predictor.clip_samples, predictor.sample_rate
    a, b = clip(n / sr, seed=0), clip(n / sr, seed=2)
    long = np.concatenate([a, b, a[: n // 4]])  # 2.25 windows long: the tail gets a window
    results = predictor.predict([long, a, b, long[n // 2 : n // 2 + n]])
    result, alone_a, alone_b, middle = results
    windows = result["windows"]
    starts = [w["start_s"] for w in windows]
    hop_s = (n // 2) / sr
    assert starts == pytest.approx([0.0, hop_s, 2 * hop_s, (len(long) - n) / sr])
    assert all(w["end_s"] - w["start_s"] == pytest.approx(n / sr) for w in windows)
    assert windows[-1]["end_s"] == pytest.approx(result["duration_s"])
    # Each window is exactly the clip it covers; the clip is the mean of its windows.
    np.testing.assert_allclose(probs(windows[0]), probs(alone_a), atol=1e-5)
    np.testing.assert_allclose(probs(windows[1]), probs(middle), atol=1e-5)
    np.testing.assert_allclose(probs(windows[2]), probs(alone_b), atol=1e-5)
    mean = np.mean([probs(w) for w in windows], axis=0)
    np.testing.assert_allclose(probs(result), mean, atol=1e-6)
    assert result["label"] == predictor.labels[int(mean.argmax())]


def test_batched_call_equals_separate_calls(trained_registry, predictor):
    sr = predictor.sample_rate
    n = predictor.clip_samples
    waves = [clip(0.3, 0), clip(3 * n / sr, 1), clip(n / sr, 2)]
    together = predictor.predict(waves)
    for wave, result in zip(waves, together, strict=True):
        (alone,) = predictor.predict([wave])
        np.testing.assert_allclose(probs(result), probs(alone), atol=1e-5)
        assert len(result["windows"]) == len(alone["windows"])
    small = Predictor.from_registry(trained_registry, max_batch=2)
    for a, b in zip(small.predict(waves), together, strict=True):
        np.testing.assert_allclose(probs(a), probs(b), atol=1e-5)


def test_fast_paths_agree(trained_registry, predictor):
    waves = [clip(1.3, seed) for seed in range(3)]
    reference = predictor.predict(waves)
    assert predictor.fast_path == "jit"
    for path in ("eager", "channels_last"):
        other = Predictor.from_registry(trained_registry, fast_path=path)
        assert other.fast_path == path
        for a, b in zip(other.predict(waves), reference, strict=True):
            np.testing.assert_allclose(probs(a), probs(b), atol=1e-4)


def test_predict_bytes_decodes_and_resamples(predictor):
    wave44 = clip(1.5, seed=3, sr=44_100)
    result = predictor.predict_bytes(to_wav_bytes(wave44, 44_100), name="pump.wav")
    assert result["duration_s"] == pytest.approx(1.5, abs=1e-3)
    assert result["label"] in predictor.labels
    with pytest.raises(AudioError, match="pump.wav"):
        predictor.predict_bytes(b"not audio at all", name="pump.wav")


@pytest.mark.parametrize(
    ("wave", "message"),
    [
        (np.zeros((2, 100), np.float32), "mono waveform"),
        (np.array([], np.float32), "no audio samples"),
        (np.array([0.1, np.nan], np.float32), "NaN"),
        (np.array(["a", "b"]), "numbers"),
    ],
)
def test_bad_waveforms_are_refused_by_name(predictor, wave, message):
    with pytest.raises(AudioError, match=message):
        predictor.predict([clip(0.5, 0), wave], names=["ok.wav", "bad.wav"])
    with pytest.raises(AudioError, match="clip 1"):
        predictor.predict([clip(0.5, 0), wave])


def register_variant(root, bias: list[float], promote: bool = False) -> str:
    """Register a copy of the current net whose head bias is shifted: a distinguishable v2."""
    reg = Registry(root)
    bundle = reg.current()
    net = bundle.load_net()
    with torch.no_grad():
        net.head.layers[-1].bias += torch.tensor(bias)
    meta = {k: v for k, v in bundle.meta.items() if k not in ("version", "parent_version")}
    return reg.register(net, meta, promote=promote, reason="test variant")


def test_reload_if_changed_follows_promote_and_rollback(trained_registry_copy):
    root = trained_registry_copy
    predictor = Predictor.from_registry(root)
    pinned = Predictor.from_registry(root, version="v1")
    wave = [clip(1.0, 0)]
    before = probs(predictor.predict(wave)[0])
    assert predictor.reload_if_changed() is False

    v2 = register_variant(root, [8.0, 0.0, 0.0, 0.0])
    assert predictor.reload_if_changed() is False  # registered, not promoted
    Registry(root).promote(v2, reason="test")
    assert predictor.reload_if_changed() is True
    assert predictor.version == "v2"
    (result,) = predictor.predict(wave)
    assert result["version"] == "v2"
    assert result["label"] == predictor.labels[0]
    assert not np.allclose(probs(result), before)

    assert pinned.reload_if_changed() is False
    assert pinned.version == "v1"

    Registry(root).rollback(reason="test")
    assert predictor.reload_if_changed() is True
    assert predictor.version == "v1"
    np.testing.assert_allclose(probs(predictor.predict(wave)[0]), before, atol=1e-6)


def test_reload_never_leaves_a_window_without_a_model(trained_registry_copy):
    root = trained_registry_copy
    predictor = Predictor.from_registry(root)
    wave = [clip(1.0, 0)]
    expected = {"v1": probs(predictor.predict(wave)[0])}
    v2 = register_variant(root, [0.0, 0.0, 0.0, 8.0])
    expected[v2] = probs(Predictor.from_registry(root, version=v2).predict(wave)[0])

    seen: list[tuple[str, np.ndarray]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        try:
            while not stop.is_set():
                (r,) = predictor.predict(wave)
                seen.append((r["version"], probs(r)))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        registry = Registry(root)
        for target in (v2, "v1", v2):
            registry.promote(target, reason="flip")
            assert predictor.reload_if_changed() is True
            n = len(seen)
            deadline = threading.Event()
            while len(seen) < n + 3 and not errors:
                deadline.wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert {v for v, _ in seen} == {"v1", v2}
    for version, p in seen:  # every answer came whole from one version
        np.testing.assert_allclose(p, expected[version], atol=1e-5)


def test_broken_new_current_keeps_serving_the_old_model(trained_registry_copy):
    root = trained_registry_copy
    predictor = Predictor.from_registry(root)
    v2 = register_variant(root, [0.0, 5.0, 0.0, 0.0], promote=True)
    weights = root / v2 / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55
    weights.write_bytes(bytes(data))
    assert predictor.reload_if_changed() is False
    assert predictor.version == "v1"
    assert predictor.predict([clip(0.5, 0)])[0]["version"] == "v1"
    with pytest.raises(RegistryError, match="sha256"):
        Predictor.from_registry(root)


def test_onnx_export_matches_pytorch(trained_registry_copy):
    root = trained_registry_copy
    reg = Registry(root)
    bundle = reg.current()
    meta = {k: v for k, v in bundle.meta.items() if k not in ("version", "parent_version")}
    version = reg.register(bundle.load_net(), meta, onnx=True, reason="onnx")
    exported = reg.get(version)
    exported.verify()
    info = exported.meta["onnx"]
    assert (root / version / info["file"]).is_file()
    # Checked here with ONNX Runtime and torch directly, not with the registry's own
    # numbers: logits on structured clips and noise, at batch sizes the export did not use.
    import onnxruntime as ort

    net = exported.load_net()
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    n, sr = exported.clip_samples, exported.sample_rate
    rng = np.random.default_rng(7)
    for batch in (1, 3, 5):
        waves = np.stack(
            [clip(n / sr, s) for s in range(batch - 1)] + [rng.normal(0, 0.3, n).astype(np.float32)]
        )
        got = session.run(None, {session.get_inputs()[0].name: waves})[0]
        with torch.inference_mode():
            want = net(torch.from_numpy(waves)).numpy()
        assert got.shape == want.shape == (batch, len(exported.labels))
        diff = float(np.abs(got - want).max())
        assert diff < 1e-3, diff
        assert (got.argmax(1) == want.argmax(1)).all()
    assert info["max_abs_diff"] < 1e-3  # what the registry recorded agrees
    assert onnx_parity(net, exported.onnx_path, n, batch=2) < 1e-3
    waves = np.stack([clip(n / sr, s) for s in range(2)])
    logits = session.run(None, {session.get_inputs()[0].name: waves})[0]
    expected = Predictor.from_bundle(exported).predict(list(waves))
    for row, result in zip(softmax(torch.from_numpy(logits)), expected, strict=True):
        np.testing.assert_allclose(row, probs(result), atol=1e-4)
