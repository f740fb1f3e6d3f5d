"""The labelling queue: low-confidence predictions whose clip the server kept wait for an
operator, who listens, picks one of the current model's labels (the clip becomes an
upload for the next retrain) or dismisses it. On disk (the queue's state survives a new
process, rotated audio leaves it) and on the real server (routes, errors, two servers
over one root), and the app's handlers without a browser."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from faultsense.data.uploads import UploadStore
from serving.http_helpers import HTTPError
from serving.monitor import LabelQueue, MonitorSettings, PredictionLog
from tests.fixtures.server import LiveServer, start_server
from tests.test_uploads import wav_bytes

pytestmark = pytest.mark.timeout(600)


# -- on disk ------------------------------------------------------------------------------


def _log(tmp_path: Path, **settings) -> PredictionLog:
    return PredictionLog(
        MonitorSettings(log_dir=str(tmp_path), store_audio="low_confidence", **settings)
    )


def _predicted(plog: PredictionLog, i: int, confidence: float) -> dict:
    """Log one prediction the way observe_predict does (the clip kept when asked)."""
    audio = plog.keep_audio(wav_bytes(i), f"clip{i}.wav", confidence)
    record = {"time": f"2025-01-01T00:00:{i:02d}+00:00", "id": f"id{i}", "version": "v1",
              "label": "normal", "confidence": confidence, "audio": audio,
              "filename": f"clip{i}.wav"}  # fmt: skip
    plog.append([record])
    return record


def test_the_queue_holds_low_confidence_clips_until_resolved_even_after_a_restart(
    tmp_path: Path,
):
    plog = _log(tmp_path, low_confidence=0.5)
    for i, confidence in enumerate([0.3, 0.9, 0.45, 0.2]):
        _predicted(plog, i, confidence)
    queue = LabelQueue(plog)
    assert [r["id"] for r in queue.pending()] == ["id3", "id2", "id0"]  # newest first
    assert queue.record("id1") is None  # confident: its clip was never kept
    with queue.lock():
        queue.item("id2")
        queue.resolve("id2", "labelled", label="fluid_leak")
        queue.resolve("id0", "dismissed")
    with open(queue.path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"id": "id3", "sta')
    again = LabelQueue(_log(tmp_path, low_confidence=0.5))  # another process, or a restart
    assert [r["id"] for r in again.pending()] == ["id3"]
    with pytest.raises(HTTPError, match="already labelled") as err:
        again.item("id2")
    assert err.value.status == 409
    with pytest.raises(HTTPError, match="No queued prediction") as err:
        again.item("id1")
    assert err.value.status == 404


def test_items_whose_audio_rotated_away_leave_the_queue(tmp_path: Path):
    plog = _log(tmp_path, low_confidence=0.5, max_bytes=400, backups=1)
    first = _predicted(plog, 0, 0.3)
    assert [r["id"] for r in LabelQueue(plog).pending()] == ["id0"]
    for i in range(1, 12):  # two rotations: the first file and its clips are dropped
        _predicted(plog, i, 0.3)
    assert not (tmp_path / first["audio"]).exists()
    pending = [r["id"] for r in LabelQueue(plog).pending()]
    assert "id0" not in pending and pending and pending[0] == "id11"
    assert all(LabelQueue(plog).audio_path(r) for r in LabelQueue(plog).pending())
    (tmp_path / _predicted(plog, 12, 0.3)["audio"]).unlink()  # audio lost another way
    assert "id12" not in [r["id"] for r in LabelQueue(plog).pending()]


def test_a_record_cannot_point_its_audio_outside_the_audio_folder(tmp_path: Path):
    plog = _log(tmp_path)
    (tmp_path / "secret.wav").write_bytes(wav_bytes(0))
    record = {"id": "x", "label": "normal", "confidence": 0.1, "audio": "audio/../secret.wav"}
    assert LabelQueue(plog).audio_path(record) is None


# -- the real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(trained_registry, tmp_path_factory) -> Iterator[LiveServer]:
    """Keeps low-confidence clips; every prediction counts as low-confidence (the
    threshold is above any probability), so each one is queued."""
    root = tmp_path_factory.mktemp("label_queue_server")
    extra = ["monitor.store_audio=low_confidence", "monitor.low_confidence=1.01"]
    with start_server(root, trained_registry, extra=extra) as live:
        yield live


def _queued(client: httpx.Client, headers: dict, filename: str) -> dict:
    """The queue item of the clip sent as `filename` (the answering server's log writer
    may take a moment)."""
    deadline = time.monotonic() + 30
    while True:
        queue = client.get("/monitor/queue", headers=headers)
        assert queue.status_code == 200, queue.text
        found = [i for i in queue.json()["items"] if i["filename"] == filename]
        if found or time.monotonic() > deadline:
            assert found, queue.json()
            return found[0]
        time.sleep(0.1)


def _predict(client: httpx.Client, clip: bytes, filename: str) -> dict:
    response = client.post("/predict", files={"file": (filename, clip, "audio/wav")})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_low_confidence_clip_is_queued_listened_to_and_labelled_into_an_upload(server):
    headers = server.headers()
    clip = wav_bytes(101, seconds=1.0)
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        answer = _predict(client, clip, "pump 7.wav")
        item = _queued(client, headers, "pump 7.wav")
        assert item["predicted"] == answer["label"] and item["version"] == answer["version"]
        assert item["probabilities"] == answer["probabilities"]
        assert client.get("/monitor/queue").status_code == 401  # the API key is required

        audio = client.get(item["audio"], headers=headers)
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
        assert audio.content == clip
        wave, rate = sf.read(io.BytesIO(audio.content))
        assert rate == 16_000 and len(wave) == 16_000

        labels = client.get("/monitor/queue", headers=headers).json()["labels"]
        url = f"/monitor/queue/{item['id']}/label"
        wrong = client.post(url, json={"label": "bearing_wear"}, headers=headers)
        assert wrong.status_code == 422 and all(x in wrong.json()["error"] for x in labels)
        unknown = client.post("/monitor/queue/nope/label", json={"label": labels[0]},
                              headers=headers)  # fmt: skip
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
        assert client.post(url, json={"label": labels[0]}).status_code == 401

        labelled = client.post(url, json={"label": "fluid_leak"}, headers=headers)
        assert labelled.status_code == 200, labelled.text
        upload = labelled.json()["upload"]
        assert upload["status"] == "stored" and upload["label"] == "fluid_leak"
        again = client.post(url, json={"label": "fluid_leak"}, headers=headers)
        assert again.status_code == 409
        status = client.get("/status").json()
        ids = [i["id"] for i in client.get("/monitor/queue", headers=headers).json()["items"]]
    assert status["uploads"]["fluid_leak"] == 1  # where uploads are listed
    [row] = UploadStore(server.uploads_dir).rows()
    assert row["label"] == "fluid_leak" and row["filename"] == "pump 7.wav"
    assert row["sha256"] == upload["sha256"]
    assert item["id"] not in ids


def test_dismissed_and_labelled_items_stay_resolved_for_another_server_process(server):
    """A second server over the same root (as after a restart, or a second host process)
    reads the same queue state."""
    headers = server.headers()
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        _predict(client, wav_bytes(202), "drip.wav")
        _predict(client, wav_bytes(203), "hum.wav")
        drip, hum = _queued(client, headers, "drip.wav"), _queued(client, headers, "hum.wav")
        dismissed = client.post(f"/monitor/queue/{drip['id']}/dismiss", headers=headers)
        assert dismissed.status_code == 200 and dismissed.json()["state"] == "dismissed"
        assert client.post("/monitor/queue/nope/dismiss", headers=headers).status_code == 404
    with (
        start_server(
            server.root,
            None,
            api_key=server.api_key,
            extra=["monitor.store_audio=low_confidence", "monitor.low_confidence=1.01"],
        ) as second,  # fmt: skip
        httpx.Client(base_url=second.url, timeout=60.0) as client,
    ):
        ids = [i["id"] for i in client.get("/monitor/queue", headers=headers).json()["items"]]
        assert hum["id"] in ids and drip["id"] not in ids
        relabel = client.post(f"/monitor/queue/{drip['id']}/label", headers=headers,
                              json={"label": "normal"})  # fmt: skip
        assert relabel.status_code == 409 and "dismissed" in relabel.json()["error"]


def test_the_monitor_tabs_label_queue_without_a_browser(server, tmp_path):
    """The handlers list the queue, play a clip, refuse an unknown label with the server's
    message, and turn a labelled clip into an upload."""
    from faultsense.config import plain
    from serving.client import ServerClient
    from serving.handlers import AppContext, label_queue, label_queued, queue_item
    from tests.fixtures.data import compose_config

    ctx = AppContext(
        client=ServerClient(server.url, server.api_key),
        views=plain(compose_config("app").views),
        example_dirs=[],
    )
    path = tmp_path / "from the app.wav"
    path.write_bytes(wav_bytes(303, seconds=0.75))
    ctx.client.predict(path)
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        item = _queued(client, server.headers(), path.name)
    status, rows, items, labels = label_queue(ctx, toast=False)
    assert "wait for a label" in status
    assert item["id"] in [row[-1] for row in rows]
    assert item["id"] in [value for _, value in items["choices"]]
    assert labels["choices"] == ctx.client.status()["model"]["labels"]

    audio, about = queue_item(ctx, item["id"])
    rate, samples = audio
    assert rate == 16_000 and len(samples) == 12_000 and item["id"] in about

    status, *_ = label_queued(ctx, item["id"], "bearing_wear")
    assert "bearing_wear" in status and "fluid_leak" in status  # the server's refusal
    before = ctx.client.status()["uploads"]["electrical_fault"]
    status, rows, _, _ = label_queued(ctx, item["id"], "electrical_fault")
    assert "Labeled **electrical_fault**" in status
    assert item["id"] not in [row[-1] for row in rows]
    assert ctx.client.status()["uploads"]["electrical_fault"] == before + 1
