"""The `faultsense` CLI: predict and models list/promote/rollback, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from faultsense.cli import main
from faultsense.registry import Registry
from faultsense.taxonomy import LABELS

CLI = Path(sys.executable).parent / "faultsense"


def write_wav(path: Path, seconds: float, sr: int = 22_050, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 0.05, t.size)
    sf.write(path, wave.astype(np.float32), sr)
    return path


def add_version(root: Path) -> str:
    reg = Registry(root)
    bundle = reg.current()
    net = bundle.load_net()
    with torch.no_grad():
        net.head.layers[-1].bias += torch.tensor([0.0, 0.0, 6.0, 0.0])
    meta = {k: v for k, v in bundle.meta.items() if k not in ("version", "parent_version")}
    return reg.register(net, meta, reason="cli test")


def test_predict_prints_label_confidence_probabilities_version(trained_registry, tmp_path, capsys):
    short = write_wav(tmp_path / "pump short.wav", 0.5)
    long = write_wav(tmp_path / "fan.wav", 7.0, seed=1)
    assert main(["predict", str(short), str(long), "--registry", str(trained_registry)]) == 0
    out = capsys.readouterr().out
    for path in (short, long):
        assert f"{path}:" in out
    assert out.count("model v1") == 2
    assert all(label in out for label in LABELS)  # every probability is shown

    code = main(["predict", str(short), str(long), "--json", "--registry", str(trained_registry)])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [str(short), str(long)]
    for row in rows:
        assert row["version"] == "v1"
        assert row["label"] in LABELS
        assert set(row["probabilities"]) == set(LABELS)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["confidence"] == pytest.approx(max(row["probabilities"].values()))
    assert rows[0]["duration_s"] == pytest.approx(0.5, abs=1e-3)
    assert len(rows[1]["windows"]) > 1  # a long clip is classified window by window
    # The numbers are the Predictor's for the same files, not merely well-formed.
    from faultsense.inference import Predictor

    predictor = Predictor.from_registry(trained_registry)
    for row, path in zip(rows, (short, long), strict=True):
        expected = predictor.predict_bytes(path.read_bytes(), name=path.name)
        assert row["label"] == expected["label"]
        assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert [w["label"] for w in row["windows"]] == [w["label"] for w in expected["windows"]]


def test_models_list_promote_rollback(trained_registry_copy, tmp_path, capsys):
    root = str(trained_registry_copy)
    v2 = add_version(trained_registry_copy)
    assert main(["models", "list", "--registry", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("* v1") and lines[1].startswith("  v2")
    assert "val/f1_macro=" in lines[0]

    assert main(["models", "promote", v2, "--reason", "better", "--registry", root]) == 0
    assert capsys.readouterr().out.strip() == f"current: {v2}"
    wav = write_wav(tmp_path / "x.wav", 1.0)
    assert main(["predict", str(wav), "--json", "--registry", root]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == v2
    assert main(["predict", str(wav), "--json", "--registry", root, "--version", "v1"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"

    assert main(["models", "rollback", "--registry", root]) == 0
    assert capsys.readouterr().out.strip() == "current: v1"
    assert main(["models", "rollback", v2, "--registry", root]) == 0
    assert capsys.readouterr().out.strip() == f"current: {v2}"

    assert main(["models", "list", "--json", "--registry", root]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["current"] == v2
    assert [v["version"] for v in doc["versions"]] == ["v1", v2]
    assert [h["action"] for h in doc["history"]][-3:] == ["promote", "rollback", "rollback"]
    assert doc["history"][-3]["reason"] == "better"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "{tmp}/missing.wav"], "AudioError: {tmp}/missing.wav does not exist"),
        (["predict", "{tmp}/bad.wav"], "AudioError: {tmp}/bad.wav could not be decoded"),
        (["models", "promote", "v9"], "RegistryError: Model version v9 is not registered"),
        (["models", "promote", "../etc"], "Invalid model version"),
        (["models", "rollback"], "Nothing to roll back to"),
        (["predict", "{tmp}/bad.wav", "--version", "v3"], "v3 is not registered"),
    ],
)
def test_errors_are_one_clean_line_and_exit_2(trained_registry, tmp_path, capsys, argv, message):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--registry", str(trained_registry)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message.format(tmp=tmp_path) in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_empty_registry_says_what_to_do(tmp_path, capsys):
    wav = write_wav(tmp_path / "x.wav", 0.5)
    assert main(["predict", str(wav), "--registry", str(tmp_path / "models")]) == 2
    assert "No current model" in capsys.readouterr().err
    assert main(["models", "list", "--registry", str(tmp_path / "models")]) == 0
    assert "no models registered" in capsys.readouterr().out


def test_console_script_uses_faultsense_root(trained_registry_copy, tmp_path):
    # `models` commands never import torch, so the real entry point is cheap to run here;
    # predict goes through the same main() tested above.
    env = {**os.environ, "FAULTSENSE_ROOT": str(trained_registry_copy.parent)}
    run = {"env": env, "capture_output": True, "text": True, "timeout": 120, "cwd": tmp_path}
    ok = subprocess.run([str(CLI), "models", "list", "--json"], **run)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["current"] == "v1"
    bad = subprocess.run([str(CLI), "models", "promote", "v5"], **run)
    assert bad.returncode == 2
    assert "v5 is not registered" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_models_list_shows_each_versions_backbone_and_label_count(trained_registry_copy, capsys):
    """Labels are data (issue 14): a version with other labels lists its own count."""
    from tests.test_labels import OWN_LABELS as labels
    from tests.test_labels import register_with_labels

    v2 = register_with_labels(trained_registry_copy, labels)
    root = str(trained_registry_copy)

    assert main(["models", "list", "--registry", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "FaultCNN" in lines[0] and "4 labels" in lines[0]
    assert lines[1].startswith(f"  {v2}") and "FaultCNN" in lines[1] and "3 labels" in lines[1]

    assert main(["models", "list", "--json", "--registry", root]) == 0
    versions = json.loads(capsys.readouterr().out)["versions"]
    assert [v["backbone"] for v in versions] == ["FaultCNN", "FaultCNN"]
    assert versions[1]["labels"] == labels
