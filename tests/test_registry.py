"""Registry: versions, promote/rollback, integrity, concurrency and crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from faultsense.errors import RegistryError
from faultsense.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def meta(**extra) -> dict:
    return {
        "net_spec": {"kind": "tiny-test-net"},
        "labels": ["mechanical_fault", "electrical_fault", "fluid_leak", "normal"],
        "sample_rate": 16000,
        "clip_samples": 8,
        "metrics": {"val/f1_macro": 0.5},
        **extra,
    }


def test_register_writes_a_self_describing_bundle(tmp_path):
    reg = Registry(tmp_path)
    net = tiny_net()
    version = reg.register(net, meta(), reason="first")
    assert version == "v1"
    assert reg.current_version() is None  # registering does not promote
    bundle = reg.get("v1")
    for key in ("version", "net_spec", "labels", "sample_rate", "clip_samples", "metrics"):
        assert key in bundle.meta
    for key in ("weights_sha256", "created_at", "git_commit", "parent_version"):
        assert key in bundle.meta
    assert bundle.meta["parent_version"] is None
    state = bundle.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value)
    # bundle.json is plain JSON: nothing in the bundle needs unpickling.
    json.loads((tmp_path / "v1" / "bundle.json").read_text())


def test_versions_increment_and_parent_is_the_current_version(tmp_path):
    reg = Registry(tmp_path)
    assert reg.register(tiny_net(), meta(), promote=True) == "v1"
    assert reg.register(tiny_net(1), meta()) == "v2"
    assert reg.get("v2").meta["parent_version"] == "v1"
    assert [row["version"] for row in reg.list()] == ["v1", "v2"]
    assert [row["current"] for row in reg.list()] == [True, False]


def test_promote_and_rollback_sequences(tmp_path):
    reg = Registry(tmp_path)
    for seed in range(4):
        reg.register(tiny_net(seed), meta())
    with pytest.raises(RegistryError, match="No current model"):
        reg.current()
    reg.promote("v1", reason="baseline")
    reg.promote("v2", reason="better f1")
    reg.promote("v3", reason="retrained")
    assert reg.current().version == "v3"
    # rollback() walks back through promotions instead of bouncing between two versions.
    assert reg.rollback(reason="v3 misbehaves") == "v2"
    assert reg.rollback() == "v1"
    with pytest.raises(RegistryError, match="Nothing to roll back to"):
        reg.rollback()
    assert reg.current_version() == "v1"
    # rollback(version) goes to a given version, even one never promoted.
    assert reg.rollback("v4", reason="pin") == "v4"
    assert reg.rollback() == "v1"
    reg.promote("v3")
    assert reg.rollback("v1") == "v1"
    with pytest.raises(RegistryError, match="Nothing to roll back to"):
        reg.rollback()

    actions = [(h["action"], h["version"], h["previous"]) for h in reg.history()]
    changes = [a for a in actions if a[0] != "register"]
    assert changes == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
        ("promote", "v3", "v2"),
        ("rollback", "v2", "v3"),
        ("rollback", "v1", "v2"),
        ("rollback", "v4", "v1"),
        ("rollback", "v1", "v4"),
        ("promote", "v3", "v1"),
        ("rollback", "v1", "v3"),
    ]
    reasons = {h["reason"] for h in reg.history()}
    assert {"baseline", "better f1", "v3 misbehaves", "pin"} <= reasons
    assert all(h["at"].endswith("+00:00") for h in reg.history())


def test_unknown_and_malformed_versions_are_refused(tmp_path):
    reg = Registry(tmp_path)
    reg.register(tiny_net(), meta(), promote=True)
    with pytest.raises(RegistryError, match="v7 is not registered"):
        reg.promote("v7")
    for bad in ("../v1", "v0", "latest", "v1/..", ""):
        with pytest.raises(RegistryError, match="Invalid model version"):
            reg.get(bad)
    with pytest.raises(RegistryError, match="without net_spec"):
        reg.register(tiny_net(), {k: v for k, v in meta().items() if k != "net_spec"})
    assert reg.versions() == ["v1"]


def test_empty_registry_reads_cleanly(tmp_path):
    reg = Registry(tmp_path / "nothing-here")
    assert reg.current_version() is None
    assert reg.list() == []
    assert reg.history() == []
    with pytest.raises(RegistryError, match="No current model"):
        reg.current()


def test_tampered_weights_are_refused_and_never_become_current(tmp_path):
    reg = Registry(tmp_path)
    reg.register(tiny_net(0), meta(), promote=True)
    reg.register(tiny_net(1), meta())
    weights = tmp_path / "v2" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight value
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256"):
        reg.get("v2").state_dict()
    with pytest.raises(RegistryError, match="sha256"):
        reg.promote("v2")
    with pytest.raises(RegistryError, match="sha256"):
        reg.rollback("v2")
    assert reg.current_version() == "v1"
    reg.get("v1").verify()


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("labels", lambda m: m["labels"].reverse()),  # same labels, other class order
        ("net_spec", lambda m: m["net_spec"].update(kind="other-net")),
        ("sample_rate", lambda m: m.update(sample_rate=8000)),
    ],
)
def test_edited_bundle_json_is_refused_and_never_becomes_current(tmp_path, field, edit):
    reg = Registry(tmp_path)
    reg.register(tiny_net(0), meta(), promote=True)
    reg.register(tiny_net(1), meta())
    path = tmp_path / "v2" / "bundle.json"
    bundle = json.loads(path.read_text())
    edit(bundle)
    path.write_text(json.dumps(bundle, indent=4))  # valid JSON, weights untouched
    for action in (lambda: reg.get("v2"), lambda: reg.promote("v2"), lambda: reg.rollback("v2")):
        with pytest.raises(RegistryError, match="bundle.json does not match its recorded sha256"):
            action()
    assert reg.current_version() == "v1"
    assert [r.get("error", "") for r in reg.list()][1].startswith("Bundle v2"), field
    # Formatting alone (indentation, key order) is not an edit.
    path = tmp_path / "v1" / "bundle.json"
    path.write_text(json.dumps(dict(reversed(json.loads(path.read_text()).items()))))
    reg.get("v1").verify()


def test_corrupt_onnx_file_is_refused(tmp_path):
    reg = Registry(tmp_path)
    reg.register(tiny_net(0), meta(), promote=True)
    version = reg.register(tiny_net(1), meta(), onnx=True)  # a real export, parity-checked
    bundle = reg.get(version)
    bundle.verify()
    data = bytearray(bundle.onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit inside the graph or its weights
    bundle.onnx_path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="model.onnx is missing or does not match"):
        reg.get(version).verify()
    with pytest.raises(RegistryError, match="model.onnx"):
        reg.promote(version)
    assert reg.current_version() == "v1"


def test_half_written_bundle_is_refused(tmp_path):
    reg = Registry(tmp_path)
    reg.register(tiny_net(0), meta(), promote=True)
    reg.register(tiny_net(1), meta())
    (tmp_path / "v2" / "bundle.json").unlink()
    with pytest.raises(RegistryError, match="half-written"):
        reg.promote("v2")
    (tmp_path / "v1" / "weights.safetensors").unlink()
    with pytest.raises(RegistryError, match="incomplete"):
        reg.current().verify()
    assert reg.current_version() == "v1"


def test_failed_final_write_leaves_previous_current(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    reg.register(tiny_net(0), meta(), promote=True)
    before = (tmp_path / "registry.json").read_bytes()
    real_replace = os.replace

    def crash_on_registry_json(src, dst):
        if Path(dst).name == "registry.json":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_registry_json)
    with pytest.raises(OSError, match="No space"):
        reg.register(tiny_net(1), meta(), promote=True)
    monkeypatch.setattr(os, "replace", real_replace)

    assert (tmp_path / "registry.json").read_bytes() == before
    assert reg.current_version() == "v1"
    assert reg.versions() == ["v1"]
    with pytest.raises(RegistryError, match="not registered"):
        reg.get("v2")  # the orphaned folder is not a version
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".staging", ".registry"))]
    # The orphan's number is never reused, so nothing can point at a stale folder.
    assert reg.register(tiny_net(2), meta()) == "v3"


CRASHING_REGISTER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from faultsense.registry import Registry

    real_replace = os.replace
    def replace(src, dst):
        if Path(dst).name == "registry.json":
            os.kill(os.getpid(), signal.SIGKILL)  # die between the bundle and the pointer
        return real_replace(src, dst)
    os.replace = replace
    meta = {"net_spec": {}, "labels": ["a"], "sample_rate": 16000, "clip_samples": 8}
    Registry(sys.argv[1]).register(torch.nn.Linear(8, 4), meta, promote=True)
    """
)


def test_process_killed_mid_register_leaves_previous_current(tmp_path):
    reg = Registry(tmp_path)
    reg.register(tiny_net(0), meta(), promote=True, reason="good")
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_REGISTER, str(tmp_path)],
        cwd=REPO,
        timeout=120,
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert reg.current_version() == "v1"
    assert reg.versions() == ["v1"]
    reg.current().verify()
    # The dead process held the lock; the OS released it, so the registry is still writable.
    assert reg.register(tiny_net(1), meta(), promote=True) == "v3"
    assert reg.current_version() == "v3"


CONCURRENT_REGISTER = textwrap.dedent(
    """
    import sys
    import torch
    from faultsense.registry import Registry

    root, worker = sys.argv[1], int(sys.argv[2])
    reg = Registry(root)
    for i in range(3):
        torch.manual_seed(worker * 10 + i)
        meta = {"net_spec": {}, "labels": ["a"], "sample_rate": 16000, "clip_samples": 8,
                "metrics": {"worker": worker, "i": i}}
        v = reg.register(torch.nn.Linear(8, 4), meta, promote=(i % 2 == 0), reason=f"w{worker}")
        print(v, flush=True)
    """
)


def test_concurrent_registrations_get_distinct_versions(tmp_path):
    workers = 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_REGISTER, str(tmp_path), str(w)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    printed = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        printed += out.split()
    expected = [f"v{i}" for i in range(1, 3 * workers + 1)]
    assert sorted(printed, key=lambda v: int(v[1:])) == expected

    reg = Registry(tmp_path)
    assert reg.versions() == expected
    seen = set()
    for version in expected:
        bundle = reg.get(version)
        bundle.verify()
        m = bundle.meta["metrics"]
        seen.add((m["worker"], m["i"]))
    assert len(seen) == 3 * workers  # every registration landed in its own folder
    history = reg.history()
    assert sum(h["action"] == "register" for h in history) == 3 * workers
    promotions = [h for h in history if h["action"] == "promote"]
    assert len(promotions) == 2 * workers
    assert reg.current_version() == promotions[-1]["version"]
    # Each promotion saw the previous one as current: the file was never written blind.
    for prev, nxt in zip(promotions, promotions[1:], strict=False):
        assert nxt["previous"] == prev["version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_exported_bundle_gives_identical_logits_to_the_checkpoint(
    trained_registry, smoke_checkpoint
):
    from faultsense.models.classifier import FaultClassifier

    ckpt_path, metrics, _ = smoke_checkpoint
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module = FaultClassifier(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    bundle = Registry(trained_registry).current()
    net = bundle.load_net()
    assert not net.training
    waves = torch.randn(4, bundle.clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        assert torch.equal(net(waves), module(waves))

    meta = bundle.meta
    assert meta["labels"] == module.labels
    assert meta["sample_rate"] == module.hparams["sample_rate"]
    assert meta["clip_samples"] == module.hparams["clip_samples"]
    assert meta["net_spec"] == module.net_spec()
    for key in ("val/f1_macro", "test/f1_macro"):
        assert meta["metrics"][key] == pytest.approx(metrics[key])
    assert meta["data_fingerprint"]
    assert set(meta["mapping"]["classes"]) == set(module.labels)
    assert meta["config"]["model"]["net"]["backbone"]["_target_"].endswith("FaultCNN")
    assert meta["created_at"].endswith("+00:00")
    assert meta["parent_version"] is None
    history = Registry(trained_registry).history()
    assert [h["action"] for h in history] == ["register", "promote"]
