"""The real server (subprocess, 127.0.0.1, real HTTP): prediction in every input form,
dynamic batching, the upload -> retrain -> promote -> rollback loop without failed
requests, the API key, and a clear 4xx for every kind of bad input."""

from __future__ import annotations

import base64
import csv
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

from faultsense.audio import to_wav_bytes
from faultsense.taxonomy import LABELS
from tests.fixtures.server import REPO

pytestmark = pytest.mark.timeout(600)
MAX_REQUEST_BYTES = int(
    yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["limits"]["max_request_bytes"]
)


def _wav(seconds: float = 2.0, rate: int = 16_000, freq: float = 440.0, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.05
    return to_wav_bytes((0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), rate)


def _client(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60.0)


def _check_prediction(body: dict, seconds: float) -> None:
    assert body["label"] in LABELS
    assert set(body["probabilities"]) == set(LABELS)
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-3
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    assert body["version"].startswith("v")
    assert body["duration_s"] == pytest.approx(seconds, abs=1e-3)
    assert body["windows"] and all(w["label"] in LABELS for w in body["windows"])


def _assert_healthy(client: httpx.Client) -> None:
    assert client.get("/health").text == "ok"
    ok = client.post("/predict", content=_wav(), headers={"Content-Type": "audio/wav"})
    assert ok.status_code == 200, ok.text


# -- prediction ---------------------------------------------------------------------------


def test_predict_accepts_multipart_raw_bytes_and_base64_json(live_server):
    wav = _wav(seconds=2.0)
    with _client(live_server) as client:
        forms = {
            "multipart": client.post("/predict", files={"file": ("pump.wav", wav, "audio/wav")}),
            "raw": client.post("/predict", content=wav, headers={"Content-Type": "audio/wav"}),
            "octet": client.post(
                "/predict", content=wav, headers={"Content-Type": "application/octet-stream"}
            ),
            "json": client.post(
                "/predict",
                json={"audio_base64": base64.b64encode(wav).decode(), "filename": "pump.wav"},
            ),
        }
    bodies = {}
    for form, response in forms.items():
        assert response.status_code == 200, f"{form}: {response.text}"
        bodies[form] = response.json()
        _check_prediction(bodies[form], 2.0)
    # Same audio, same model: every input form gives the same answer.
    first = bodies["raw"]["probabilities"]
    for body in bodies.values():
        assert body["probabilities"] == pytest.approx(first, abs=1e-5)


def test_long_clip_gets_per_window_results(live_server):
    with _client(live_server) as client:
        response = client.post(
            "/predict", content=_wav(seconds=7.0), headers={"Content-Type": "audio/wav"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    _check_prediction(body, 7.0)
    assert len(body["windows"]) > 1
    assert body["windows"][0]["start_s"] == 0.0 and body["windows"][-1]["end_s"] == pytest.approx(
        7.0
    )


def test_concurrent_requests_are_batched(live_server):
    wav = _wav(seconds=2.0)
    with _client(live_server) as client:
        before = client.get("/status").json()["serving"]

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=live_server.url, timeout=60.0) as c:
            return c.post("/predict", content=wav, headers={"Content-Type": "audio/wav"})

    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(one, range(48)))
    assert all(r.status_code == 200 for r in responses), [
        r.text for r in responses if r.status_code != 200
    ]
    sizes = [r.json()["batch_size"] for r in responses]
    with _client(live_server) as client:
        after = client.get("/status").json()["serving"]
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 48
    assert max(sizes) > 1, sizes
    assert batches < requests, (batches, requests)
    assert after["max_batch_size_seen"] >= max(sizes)


# -- bad input ------------------------------------------------------------------------------


def _nan_wav() -> bytes:
    wave = np.zeros(16_000, dtype=np.float32)
    wave[::7] = 0.1
    wave[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, wave, 16_000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


BAD_PREDICTS = {
    "empty": ({"content": b"", "headers": {"Content-Type": "audio/wav"}}, 422, "empty"),
    "truncated header": (
        {"content": _wav()[:30], "headers": {"Content-Type": "audio/wav"}},
        422,
        "could not be decoded",
    ),
    "not audio": (
        {
            "content": b"<html><body>hello</body></html>" * 20,
            "headers": {"Content-Type": "audio/wav"},
        },
        422,
        "could not be decoded",
    ),
    "nan samples": ({"content": _nan_wav(), "headers": {"Content-Type": "audio/wav"}}, 422, "NaN"),
    "huge": (
        {"content": b"\0" * (MAX_REQUEST_BYTES + 1), "headers": {"Content-Type": "audio/wav"}},
        413,
        "over the limit",
    ),
    "bad base64": ({"json": {"audio_base64": "%%%not base64%%%"}}, 400, "base64"),
    "json without audio": ({"json": {"audio": "x"}}, 400, "audio_base64"),
    "multipart without file": ({"files": {"other": ("a.wav", b"abc")}}, 400, "'file'"),
    "wrong content type": (
        {"content": b"abc", "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type",
    ),
    "path-like filename, bad audio": (
        {"files": {"file": ("../../../etc/passwd", b"root:x:0:0")}},
        422,
        "passwd could not be decoded",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PREDICTS), ids=str)
def test_bad_predict_input_gets_a_4xx_with_a_message(live_server, case):
    kwargs, status, fragment = BAD_PREDICTS[case]
    with _client(live_server) as client:
        response = client.post("/predict", **kwargs)
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]
        assert "Traceback" not in response.text
        _assert_healthy(client)


def _stream_chunked(url: str, path: str, chunk: bytes, max_bytes: int) -> tuple[int, bytes]:
    """POST a chunked body (no Content-Length) over a raw socket until the server answers
    or `max_bytes` are sent; returns (bytes sent, what the server answered)."""
    import select
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    sent, answer = 0, b""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: audio/wav\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        try:
            while sent < max_bytes:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed) while we were sending
                sock.sendall(frame)
                sent += len(chunk)
        except OSError:
            pass  # closed by the server mid-send: read what it said before closing
        sock.settimeout(30)
        try:
            while not _whole_answer(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    return sent, answer


def _whole_answer(answer: bytes) -> bool:
    """Whether `answer` holds an HTTP response's headers and all of its Content-Length body
    (the body may come in a later packet than the headers)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def test_oversized_streamed_body_without_length_is_refused(live_server):
    chunk = b"\0" * (64 << 10)
    log_before = len(live_server.log_text())
    sent, answer = _stream_chunked(live_server.url, "/predict", chunk, 4 * MAX_REQUEST_BYTES)
    # A 413, not a crash or a silent close: and the server stopped reading near the limit
    # (what loopback's socket buffers absorb aside), not after the whole body.
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"over the limit" in answer or b"Content-Length" in answer, answer[:600]
    assert sent < MAX_REQUEST_BYTES + 16 * (1 << 20), sent
    log = live_server.log_text()[log_before:]
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
    with _client(live_server) as client:
        _assert_healthy(client)


def test_bad_uploads_get_a_4xx_and_path_like_names_stay_names(live_server):
    headers = live_server.headers()
    with _client(live_server) as client:
        wrong_label = client.post(
            "/upload", headers=headers, data={"label": "../normal"},
            files=[("files", ("a.wav", _wav(seed=1), "audio/wav"))],
        )  # fmt: skip
        assert wrong_label.status_code == 422 and "Unknown label" in wrong_label.json()["error"]
        not_audio = client.post(
            "/upload", headers=headers, data={"label": "normal"},
            files=[("files", ("notes.txt", b"just some text", "text/plain"))],
        )  # fmt: skip
        assert not_audio.status_code == 422, not_audio.text
        assert not_audio.json()["results"][0]["status"] == "rejected"
        assert "notes.txt" in not_audio.json()["results"][0]["error"]
        tricky = client.post(
            "/upload", headers=headers, data={"label": "fluid_leak"},
            files=[("files", ("../../../../tmp/evil.wav", _wav(seed=2), "audio/wav"))],
        )  # fmt: skip
        assert tricky.status_code == 200, tricky.text
        result = tricky.json()["results"][0]
        assert result["status"] == "stored" and result["filename"] == "evil.wav"
        stored = live_server.uploads_dir / "fluid_leak" / f"{result['sha256']}.wav"
        assert stored.is_file()
        assert not Path("/tmp/evil.wav").exists()
        _assert_healthy(client)


def test_mutating_routes_need_the_api_key(live_server):
    routes = [
        (
            "/upload",
            {"data": {"label": "normal"}, "files": [("files", ("a.wav", _wav(), "audio/wav"))]},
        ),
        ("/retrain", {"json": {"epochs": 1}}),
        ("/models/v1/promote", {}),
        ("/models/rollback", {"json": {}}),
    ]
    with _client(live_server) as client:
        jobs_before = client.get("/retrain").json()["jobs"]
        current_before = client.get("/models").json()["current"]
        for path, kwargs in routes:
            missing = client.post(path, **kwargs)
            assert missing.status_code == 401, (path, missing.text)
            assert "X-API-Key" in missing.json()["error"]
            wrong = client.post(path, headers={"X-API-Key": "not-the-key"}, **kwargs)
            assert wrong.status_code == 403, (path, wrong.text)
        assert client.get("/retrain").json()["jobs"] == jobs_before  # nothing started
        assert client.get("/models").json()["current"] == current_before
    assert live_server.api_key not in live_server.log_text()


# -- the MLOps loop -------------------------------------------------------------------------


def _labeled_synthetic_clips(source: Path, n: int) -> list[tuple[str, bytes, str]]:
    mapping = yaml.safe_load((REPO / "configs" / "data" / "esc50_fault.yaml").read_text())[
        "classes"
    ]
    label_of = {category: label for label, categories in mapping.items() for category in categories}
    with open(source / "meta" / "esc50.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    clips = []
    for row in rows:
        label = label_of.get(row["category"])
        if label and row["fold"] == "1":
            clips.append(
                (row["filename"], (source / "audio" / row["filename"]).read_bytes(), label)
            )
    return clips[:n]


def _predict_version(client: httpx.Client) -> str:
    response = client.post("/predict", content=_wav(), headers={"Content-Type": "audio/wav"})
    assert response.status_code == 200, response.text
    return response.json()["version"]


def test_upload_retrain_promote_predict_rollback(live_server, synthetic_source):
    headers = live_server.headers()
    with _client(live_server) as client:
        assert client.get("/models").json()["current"] == "v1"
        # Upload labeled clips (44.1 kHz in the synthetic set: normalized to 16 kHz on upload).
        clips = _labeled_synthetic_clips(synthetic_source, 4)
        for filename, data, label in clips:
            response = client.post(
                "/upload", headers=headers, data={"label": label},
                files=[("files", (filename, data, "audio/wav"))],
            )  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["status"] == "stored"
        again = client.post(
            "/upload", headers=headers, data={"label": clips[0][2]},
            files=[("files", (clips[0][0], clips[0][1], "audio/wav"))],
        )  # fmt: skip
        assert again.json()["results"][0]["status"] == "duplicate"
        status = client.get("/status").json()
        assert sum(status["uploads"].values()) >= len(clips)

        # Retrain (one epoch, forced so the new version is promoted whatever the gate says).
        started = client.post("/retrain", headers=headers, json={"epochs": 1, "force": True})
        assert started.status_code == 202, started.text
        job_id = started.json()["job_id"]
        second = client.post("/retrain", headers=headers, json={"epochs": 1})
        assert second.status_code == 409, second.text
        assert job_id in second.json()["error"]

        deadline = time.monotonic() + 300
        while True:
            job = client.get(f"/retrain/{job_id}").json()
            if job["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
                break
            # Serving goes on while it trains (v2 once the job promoted it, just before it ends).
            assert _predict_version(client) in ("v1", "v2")
            time.sleep(1.0)
        assert job["state"] == "succeeded", job
        assert job["epoch"] == 1 and job["max_epochs"] == 1 and job["log_tail"]
        decision = job["decision"]
        assert decision["promoted"] is True and decision["parent_version"] == "v1"
        assert decision["version"] == "v2" and decision["train_clips"] >= 48 + len(clips)
        assert client.get(f"/retrain/{job_id}").json()["state"] == "succeeded"
        assert client.get("/status").json()["retrain"]["job_id"] == job_id

        models = client.get("/models").json()
        assert models["current"] == "v2"
        assert {v["version"]: v["parent_version"] for v in models["versions"]}["v2"] == "v1"
        assert _predict_version(client) == "v2"  # the very next batch uses the new model

        # Roll back while requests keep coming: none fails, each names a version then current.
        def hammer(_: int) -> tuple[int, str]:
            with httpx.Client(base_url=live_server.url, timeout=60.0) as c:
                r = c.post("/predict", content=_wav(), headers={"Content-Type": "audio/wav"})
                return r.status_code, r.json().get("version", "")

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(hammer, i) for i in range(40)]
            rolled = client.post("/models/rollback", headers=headers, json={})
            results = [f.result() for f in futures]
        assert rolled.status_code == 200 and rolled.json()["current"] == "v1", rolled.text
        assert all(code == 200 for code, _ in results), results
        assert {version for _, version in results} <= {"v1", "v2"}
        assert _predict_version(client) == "v1"

        # Promote v2 explicitly, then leave v1 current for the other tests.
        promoted = client.post("/models/v2/promote", headers=headers)
        assert promoted.status_code == 200 and promoted.json()["current"] == "v2"
        assert _predict_version(client) == "v2"
        unknown = client.post("/models/v9/promote", headers=headers)
        assert unknown.status_code == 404 and "v9" in unknown.json()["error"]
        weird = client.post("/models/..%2Fv1/promote", headers=headers)
        assert 400 <= weird.status_code < 500
        back = client.post("/models/rollback", headers=headers, json={"version": "v1"})
        assert back.status_code == 200 and back.json()["current"] == "v1"
        _assert_healthy(client)


def test_retrain_request_fields_are_allowlisted_and_typed(live_server):
    headers = live_server.headers()
    with _client(live_server) as client:
        for body in (
            {"epochs": "3"},
            {"epochs": 0},
            {"epochs": 10_000},
            {"force": "yes"},
            {"epochs": 1, "data": "hydra/launcher=evil"},
            {"epochs": 1, "overrides": ["trainer.max_epochs=1000"]},
        ):
            response = client.post("/retrain", headers=headers, json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"].startswith("Invalid request")
        assert client.get("/retrain/not-a-job").status_code == 404
        assert client.get("/retrain/..%2F..%2Fetc%2Fpasswd").status_code == 404


# -- startup ------------------------------------------------------------------------------


def test_server_refuses_to_start_without_a_current_model(tmp_path):
    env = {**os.environ, "FAULTSENSE_ROOT": str(tmp_path)}
    env.pop("FAULTSENSE_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "serving.server", "port=8799"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "No current model" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# -- devices ------------------------------------------------------------------------------


def test_server_on_an_explicit_device_reports_it_per_worker(tmp_path, trained_registry):
    """`server.accelerator` reaches the model: each worker's Predictor is built on the
    device LitServe gives it, and /status says which (here two workers on the CPU)."""
    from tests.fixtures.server import start_server

    extra = ["server.accelerator=cpu", "server.workers_per_device=2", "server.num_api_servers=1"]
    with start_server(tmp_path / "srv", trained_registry, extra=extra) as server:
        with _client(server) as client:
            serving = client.get("/status").json()["serving"]
            assert serving["workers"] == 2
            assert serving["devices"] == ["cpu", "cpu"], serving
            response = client.post(
                "/predict", content=_wav(), headers={"Content-Type": "audio/wav"}
            )
            assert response.status_code == 200, response.text
            _check_prediction(response.json(), 2.0)
        assert "Worker ready on cpu" in server.log_text()


def test_shared_stats_keep_one_device_per_worker():
    from serving.worker import DEVICE_CHARS, SharedStats, torch_device

    stats = SharedStats(3)
    assert stats.devices() == [None, None, None]
    stats.set_device(2, "cuda:1")
    stats.set_device(0, "cpu")
    stats.set_device(0, "cuda:0")  # a restarted worker overwrites its own slot
    stats.set_device(7, "cpu")  # a worker id LitServe did not announce is ignored
    stats.set_device(1, "x" * (DEVICE_CHARS + 5))
    assert stats.devices() == ["cuda:0", "x" * DEVICE_CHARS, "cuda:1"]
    stats.record_batch(requests=4, served=3)
    assert stats.counts()[:4] == [4, 1, 3, 1]  # requests, batches, max batch, rejected
    assert torch_device("cpu") == "cpu"
    assert torch_device(["cuda:0", "cuda:1"]) == "cuda:0"
    assert torch_device(None) == "cpu"
