"""The prediction log and drift: a rotating, crash-safe JSON-lines log; PSI against the
bundle's reference; and on the real server, mixed traffic stays `stable` while clips of
one label only turn `drifting` on."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.monitor import (
    MonitorSettings,
    PredictionLog,
    drift,
    psi,
    reference_for,
    request_source,
)
from tests.fixtures.server import REPO, LiveServer, start_server

pytestmark = pytest.mark.timeout(600)
WINDOW = 16


def _record(i: int, label: str = "normal", version: str = "v1", confidence: float = 0.9) -> dict:
    return {"time": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00", "version": version,
            "label": label, "confidence": confidence}  # fmt: skip


def test_log_rotates_by_size_and_keeps_the_newest(tmp_path: Path):
    plog = PredictionLog(MonitorSettings(log_dir=str(tmp_path), max_bytes=400, backups=2))
    for i in range(30):
        plog.append([_record(i)])
    assert (tmp_path / "predictions.1.jsonl").exists() and (
        tmp_path / "predictions.2.jsonl"
    ).exists()
    assert not (tmp_path / "predictions.3.jsonl").exists()
    assert all(p.stat().st_size <= 400 for p in tmp_path.glob("predictions*.jsonl"))
    newest = plog.records(5)
    assert [r["time"] for r in newest] == [_record(i)["time"] for i in range(25, 30)]


def test_a_torn_last_line_is_skipped_and_the_next_append_is_readable(tmp_path: Path):
    plog = PredictionLog(MonitorSettings(log_dir=str(tmp_path)))
    plog.append([_record(0), _record(1)])
    with open(plog.path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"time": "2025-01-01T00:00:02+00:00", "label": "nor')
    assert [r["time"] for r in plog.records(10)] == [_record(i)["time"] for i in range(2)]
    plog.append([_record(3)])
    assert [r["time"] for r in plog.records(10)][-1] == _record(3)["time"]
    assert len(plog.records(10)) == 3


def test_records_from_the_writer_thread_reach_the_file(tmp_path: Path):
    plog = PredictionLog(MonitorSettings(log_dir=str(tmp_path)))
    for i in range(20):
        plog.record(_record(i))
    plog.flush()
    assert len(plog.path.read_text().splitlines()) == 20


def test_psi_is_zero_for_the_same_distribution_and_large_for_one_label():
    assert psi([25, 25, 25, 25], [10, 10, 10, 10]) == pytest.approx(0.0)
    assert psi([25, 25, 25, 25], [16, 0, 0, 0]) > 5
    assert 0 < psi([25, 25, 25, 25], [5, 3, 4, 4]) < 0.25


def test_drift_needs_a_full_window_and_a_reference():
    s = MonitorSettings(log_dir=".", window=WINDOW, min_predictions=WINDOW, psi_threshold=0.25)
    reference = {"source": "val predictions", "labels": {"a": 0.5, "b": 0.5}, "confidence": None}
    one_label = [_record(i, "a") for i in range(WINDOW)]
    assert drift([], reference, s)["label_psi"] is None
    assert drift(one_label[:4], reference, s)["state"] == "warming up"
    state = drift(one_label, reference, s)
    assert state["drifting"] and state["state"] == "drifting" and state["label_psi"] > 1
    mixed = [_record(i, "ab"[i % 2]) for i in range(WINDOW)]
    assert drift(mixed, reference, s)["drifting"] is False
    assert drift(mixed, {"labels": None}, s)["state"] == "no reference"


def test_confidence_drift_turns_drifting_on_unless_turned_off():
    s = MonitorSettings(log_dir=".", window=WINDOW, min_predictions=WINDOW, confidence_bins=2)
    # val predictions were mostly confident; now every answer is a guess, labels as before
    reference = {"source": "val predictions", "labels": {"a": 0.5, "b": 0.5}, "confidence": [1, 9]}
    unsure = [_record(i, "ab"[i % 2], confidence=0.3) for i in range(WINDOW)]
    state = drift(unsure, reference, s)
    assert state["label_psi"] == 0 and state["confidence_psi"] > 1 and state["drifting"]
    off = drift(unsure, reference, dataclasses.replace(s, confidence_drift=False))
    assert not off["drifting"] and off["confidence_psi"] == state["confidence_psi"]


def test_reference_is_the_val_confusion_matrix_columns(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"confusion": {"val": [[3, 1], [0, 4]]}, "confidence_histogram": {"val": [1, 7]}}
    (run / "metrics.json").write_text(json.dumps(summary))
    meta = {"labels": ["a", "b"], "training_log": {"run_dir": str(run)}}
    reference = reference_for(meta)
    assert reference["labels"] == {"a": 3 / 8, "b": 5 / 8}  # what the model predicted
    assert reference["confidence"] == [1, 7]
    assert reference_for({"labels": ["a"]})["labels"] is None


def test_source_header_is_one_of_a_fixed_set():
    assert [request_source(v) for v in ("app", " CLI ", None, "evil\n")] == [
        "app", "cli", "api", "api",
    ]  # fmt: skip


# -- the real server ----------------------------------------------------------------------


def _clips_by_label(source: Path) -> dict[str, list[bytes]]:
    """The synthetic set's clips by the fault label of their category (what the fixture
    model learned to tell apart)."""
    mapping = yaml.safe_load((REPO / "configs" / "data" / "esc50_fault.yaml").read_text())
    label_of = {c: label for label, cats in mapping["classes"].items() for c in cats}
    clips: dict[str, list[bytes]] = {}
    with open(source / "meta" / "esc50.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in label_of:
                data = (source / "audio" / row["filename"]).read_bytes()
                clips.setdefault(label_of[row["category"]], []).append(data)
    return clips


@pytest.fixture(scope="module")
def server(trained_registry, tmp_path_factory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("monitor_server")
    extra = [
        f"monitor.window={WINDOW}", f"monitor.min_predictions={WINDOW}",
        "monitor.store_audio=all", "auth.protect_metrics=true",
        # 16 predictions over 10 confidence bins of a 2-epoch fixture model: the label
        # PSI is what this server is for; confidence drift has its own test below.
        "monitor.confidence_drift=false",
    ]  # fmt: skip
    with start_server(root, trained_registry, extra=extra) as live:
        yield live


def _predict(client: httpx.Client, clip: bytes, source: str | None = None) -> dict:
    headers = {"Content-Type": "audio/wav"}
    if source:
        headers["X-FaultSense-Source"] = source
    response = client.post("/predict", content=clip, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_one_label_traffic_turns_drifting_on_and_mixed_traffic_leaves_it_off(
    server, synthetic_source
):
    clips = _clips_by_label(synthetic_source)
    labels = sorted(clips)
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        for i in range(WINDOW):  # mixed: every label in turn, half of it from the app
            _predict(client, clips[labels[i % 4]][i // 4], "app" if i % 2 else None)
        mixed = client.get("/monitor").json()
        for clip in clips["normal"][:WINDOW]:
            _predict(client, clip)
        one_label = client.get("/monitor").json()
        assert client.get("/metrics").status_code == 401  # auth.protect_metrics
        text = client.get("/metrics", headers=server.headers()).text
    assert mixed["records"] == WINDOW and mixed["recent"]["sources"] == {
        "api": 8,
        "app": 8,
        "cli": 0,
    }
    assert mixed["drift"]["reference"].startswith("val predictions")
    assert mixed["drift"]["confidence_psi"] is not None  # metrics.json's val histogram
    assert mixed["drift"]["state"] == "stable" and mixed["drift"]["drifting"] is False, mixed[
        "drift"
    ]
    assert sum(mixed["confidence"]["counts"]) == WINDOW
    assert one_label["drift"]["drifting"] is True, one_label["drift"]
    assert one_label["drift"]["label_psi"] > one_label["drift"]["threshold"]
    assert one_label["recent"]["labels"]["normal"] >= WINDOW - 2
    assert sum(sum(c) for c in one_label["timeline"]["counts"].values()) == 2 * WINDOW
    drifting = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "faultsense_drifting"
    ]
    assert drifting == [1.0]


def test_every_prediction_is_logged_with_its_audio_when_asked(server, synthetic_source):
    clip = _clips_by_label(synthetic_source)["fluid_leak"][0]
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        answer = _predict(client, clip, "cli")
        client.get("/monitor")  # flushes the log writer of the process that answers
    log_dir = server.root / "logs" / "predictions"
    deadline = time.monotonic() + 30  # the answering API server's writer thread may still write
    while True:
        lines = [json.loads(x) for x in (log_dir / "predictions.jsonl").read_text().splitlines()]
        if lines[-1]["source"] == "cli" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    last = lines[-1]
    assert last["source"] == "cli" and last["label"] == answer["label"]
    assert last["version"] == "v1" and last["probabilities"] == answer["probabilities"]
    assert last["duration_s"] == answer["duration_s"] and last["latency_s"] > 0
    assert (log_dir / last["audio"]).read_bytes() == clip


def test_app_predictions_are_marked_and_the_monitor_tab_shows_the_state(server, synthetic_source):
    """The app's client sends its source header; the Monitor handler (no browser) renders
    the drift state, the figure and the per-label rows."""
    from serving.client import ServerClient
    from serving.handlers import AppContext, monitor

    clip = (
        synthetic_source
        / "audio"
        / sorted(p.name for p in (synthetic_source / "audio").iterdir())[0]
    )
    ctx = AppContext(client=ServerClient(server.url, server.api_key), views={}, example_dirs=[])
    before = ctx.client.monitor()["recent"]["sources"]["app"]
    ctx.client.predict(clip)
    deadline = time.monotonic() + 30  # the answering API server's writer thread
    while (
        ctx.client.monitor()["recent"]["sources"]["app"] == before and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert ctx.client.monitor()["recent"]["sources"]["app"] == before + 1
    markdown, figure, rows = monitor(ctx, toast=False)
    assert "drifting:" in markdown and "PSI" in markdown, markdown
    assert figure is not None and len(figure.axes) == 2
    assert [row[0] for row in rows] == ctx.client.monitor()["labels"]
