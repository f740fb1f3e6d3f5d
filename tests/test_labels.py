"""Labels are data (issue 14): the server, the CLI and the app use the labels of the model
served now, read from its bundle, whatever they are and however many. A model with three
labels that are not the fault labels (`bearing_wear`, `cavitation`, `idle`) is registered
next to the four-label smoke model and promoted hot while the server runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from faultsense.registry import Registry
from faultsense.taxonomy import LABELS as FAULT_LABELS
from tests.fixtures.data import compose_config
from tests.fixtures.server import LiveServer, start_server

OWN_LABELS = ["bearing_wear", "cavitation", "idle"]


def register_with_labels(registry_dir: Path, labels: list[str]) -> str:
    """Register (unpromoted) a model with v1's architecture, recorded config and `labels`
    (untrained: what it predicts does not matter here, which labels it predicts does)."""
    from faultsense.models.net import build_net

    registry = Registry(registry_dir)
    v1 = registry.get("v1")
    spec = {**v1.meta["net_spec"], "num_classes": len(labels)}
    meta = {"net_spec": spec, "labels": labels, "sample_rate": v1.sample_rate,
            "clip_samples": v1.clip_samples, "metrics": {},
            "config": v1.meta.get("config") or {}}  # fmt: skip
    return registry.register(build_net(spec).eval(), meta, reason="own labels")


def tone(path: Path, freq: float, seconds: float = 1.0, sr: int = 16_000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def server(trained_registry, tmp_path_factory) -> Iterator[LiveServer]:
    """The real server over v1 (the four fault labels, current) and v2 (OWN_LABELS)."""
    registry = tmp_path_factory.mktemp("labels_registry") / "models"
    shutil.copytree(trained_registry, registry)
    assert register_with_labels(registry, OWN_LABELS) == "v2"
    with start_server(tmp_path_factory.mktemp("labels_server"), registry) as live:
        yield live


def serve(server: LiveServer, version: str) -> None:
    """Promote `version` through the API (a hot switch: the server keeps running)."""
    response = httpx.post(
        f"{server.url}/models/{version}/promote", headers=server.headers(), timeout=30
    )
    assert response.status_code == 200, response.text


def post_upload(server: LiveServer, clip: Path, label: str) -> httpx.Response:
    with open(clip, "rb") as f:
        return httpx.post(
            f"{server.url}/upload", headers=server.headers(), data={"label": label},
            files=[("files", (clip.name, f, "audio/wav"))], timeout=60,
        )  # fmt: skip


def test_predict_and_upload_follow_the_served_models_labels(server, tmp_path):
    clip = tone(tmp_path / "pump.wav", 440.0)
    serve(server, "v1")
    with open(clip, "rb") as f:
        before = httpx.post(f"{server.url}/predict", files={"file": f}, timeout=60).json()
    assert set(before["probabilities"]) == set(FAULT_LABELS)

    serve(server, "v2")
    with open(clip, "rb") as f:
        body = httpx.post(f"{server.url}/predict", files={"file": f}, timeout=60).json()
    assert body["version"] == "v2" and body["label"] in OWN_LABELS
    assert list(body["probabilities"]) == OWN_LABELS

    status = httpx.get(f"{server.url}/status", timeout=30).json()
    assert status["model"]["labels"] == OWN_LABELS
    assert list(status["uploads"])[:3] == OWN_LABELS

    stored = post_upload(server, clip, "cavitation")
    assert stored.status_code == 200, stored.text
    assert stored.json()["results"][0]["status"] == "stored"
    assert stored.json()["counts"]["cavitation"] == 1

    refused = post_upload(server, tone(tmp_path / "other.wav", 300.0), "mechanical_fault")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert "'mechanical_fault'" in error and "v2" in error
    assert all(label in error for label in OWN_LABELS)
    assert not (server.uploads_dir / "mechanical_fault").exists()


def test_cli_predict_prints_the_bundles_labels(server, tmp_path, capsys):
    from faultsense.cli import main

    clip = tone(tmp_path / "fan.wav", 600.0)
    argv = ["predict", str(clip), "--registry", str(server.registry_dir), "--version", "v2"]
    assert main([*argv, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in OWN_LABELS and list(row["probabilities"]) == OWN_LABELS
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert all(f"{label}=" in text for label in OWN_LABELS)
    assert not any(label in text for label in FAULT_LABELS)


def app_context(server: LiveServer, examples: Path):
    from faultsense.config import plain
    from serving.client import ServerClient
    from serving.handlers import AppContext

    return AppContext(
        client=ServerClient(server.url, server.api_key),
        views=plain(compose_config("app").views),
        example_dirs=[str(examples)],
    )


def test_app_handlers_pick_up_the_new_labels_after_a_hot_promote(server, tmp_path):
    from serving import handlers

    examples = tmp_path / "examples"
    for i, label in enumerate([*OWN_LABELS, *FAULT_LABELS]):
        tone(examples / label / "example.wav", 200.0 + 150 * i)
    ctx = app_context(server, examples)
    clip = tone(tmp_path / "belt.wav", 880.0)

    serve(server, "v1")
    *_, labels_md, dropdown = handlers.on_load(ctx)
    assert dropdown["choices"] == list(FAULT_LABELS) and "mechanical_fault" in labels_md

    serve(server, "v2")  # no restart: the next page load asks the server again
    *_, counts, labels_md, dropdown = handlers.on_load(ctx)
    assert dropdown["choices"] == OWN_LABELS
    assert all(f"`{label}`" in labels_md for label in OWN_LABELS) and "v2" in labels_md
    assert [row[0] for row in counts][:3] == OWN_LABELS

    _, probabilities, _, _ = handlers.predict(ctx, str(clip))
    assert list(probabilities) == OWN_LABELS

    message, rows, _ = handlers.upload(ctx, [str(clip)], None)
    assert "Choose the label" in message and all(label in message for label in OWN_LABELS)
    message, rows, _ = handlers.upload(ctx, [str(clip)], "mechanical_fault")
    assert "Unknown label 'mechanical_fault'" in message and "bearing_wear" in message
    message, rows, counts = handlers.upload(ctx, [str(clip)], "idle")
    assert rows[0][1] == "stored" and dict(map(tuple, counts))["idle"] >= 1

    out = handlers.insights(ctx, toast=False)
    status, _, _, _, _, uploads = out[:6]
    texts, figures = out[6:9], out[9:]
    assert "Current model **v2**" in status
    assert [row[0] for row in uploads][:3] == OWN_LABELS
    assert [t.split("**")[1] for t in texts] == OWN_LABELS  # one example per model label
    assert len(figures) == 3 and all(f is not None for f in figures)


def test_the_app_is_built_with_the_served_models_labels(server):
    import gradio as gr

    from serving.app import build_app

    serve(server, "v2")
    cfg = compose_config("app", [f"server_url={server.url}"])
    app = build_app(cfg)
    blocks = list(app.blocks.values())
    [dropdown] = [b for b in blocks if getattr(b, "elem_id", None) == "upload-label"]
    assert [value for _, value in dropdown.choices] == OWN_LABELS
    rows = [b for b in blocks if isinstance(b, gr.Plot) and not b.show_label]
    assert len(rows) == len(OWN_LABELS)  # one example row per label of the served model
    app.close()
