"""Fault injection: crashes, tampering and interrupted writes never leave a half state.

- A retrain process SIGKILLed at each stage (during training, at export, inside
  registration between the bundle rename and the registry.json write) leaves a registry whose every listed version verifies, the previous version
  current, and the running server answering with it; the lock is not left held.
- A corrupt registry.json, tampered weights, a broken bundle.json or a pickle planted as
  weights is detected, reported (4xx / a status entry / a refusal to start) and never
  served; nothing is unpickled.
- An inference worker SIGKILLed is restarted, and requests sent while it was down are
  served by the new one.
- An upload cut off mid-body leaves no file and no manifest row; a server SIGKILLed in
  the middle of uploads loses no acknowledged upload and leaves no partial file; a
  restart keeps uploads, job history and the current version.

Deterministic kill points use the `FAULTSENSE_FAULT_POINT` hook (faultsense.registry.
fault_point); "during training" is a real SIGKILL of the job's pid from outside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from faultsense.data.uploads import UploadStore
from faultsense.errors import RegistryError
from faultsense.export import export_checkpoint
from faultsense.registry import Registry, bundle_json_sha256
from faultsense.taxonomy import LABELS
from tests import hostile
from tests.fixtures.server import REPO, retrain_overrides_for, start_server

TIMEOUT = httpx.Timeout(60.0, connect=5.0)
RETRAIN_TIMEOUT_S = 300


# -- helpers -------------------------------------------------------------------------------


def assert_registry_consistent(root: Path, current: str) -> list[str]:
    """registry.json parses, every listed version verifies, `current` is current; returns
    the listed versions. Unlisted vN folders (a crash after the rename) are tolerated."""
    registry = Registry(root)
    versions = registry.versions()
    for version in versions:
        registry.get(version).verify()
    assert registry.current_version() == current
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")], "staging left"
    return versions


def predict_version(url: str) -> str:
    wav = hostile.valid_wav(1.0, seed=1)
    resp = httpx.post(
        url + "/predict", content=wav, headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["version"]


def eventually(check, timeout: float = 30.0, every: float = 0.2):
    """Return check()'s first truthy value within `timeout` s (AssertionError otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout:g} s"
            return value
        time.sleep(every)


def run_retrain(server, tmp_path: Path, overrides: list[str], point: str) -> tuple[int, str]:
    """`python -m faultsense.retrain` against the server's registry, as the server's job
    runner would start it, with the fault hook armed at `point`."""
    job_dir = tmp_path / f"job-{point}"
    job_dir.mkdir()
    argv = [
        sys.executable,
        "-m",
        "faultsense.retrain",
        "epochs=1",
        "force=true",
        f"job_dir={job_dir}",
        f"paths.registry_dir={server.registry_dir}",
        f"paths.uploads_dir={server.uploads_dir}",
        f"hydra.run.dir={job_dir / 'hydra'}",
        *overrides,
    ]
    env = {**os.environ, "FAULTSENSE_FAULT_POINT": point, "WANDB_MODE": "disabled"}
    env.pop("FAULTSENSE_API_KEY", None)
    proc = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=RETRAIN_TIMEOUT_S
    )
    return proc.returncode, proc.stdout + proc.stderr


def upload(url: str, key: str, seed: int, label: str) -> httpx.Response:
    files = [("files", (f"clip{seed}.wav", hostile.valid_wav(0.5, seed=seed), "audio/wav"))]
    return httpx.post(
        url + "/upload",
        files=files,
        data={"label": label},
        headers={"X-API-Key": key},
        timeout=TIMEOUT,
    )


def assert_uploads_intact(uploads_dir: Path) -> dict[str, dict]:
    """Every manifest row names a complete file whose sha256 is its name; no visible
    partial file. Returns the rows by sha256."""
    rows = {r["sha256"]: r for r in UploadStore(uploads_dir).rows()}
    for sha, row in rows.items():
        data = (uploads_dir / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, f"{row['path']} is partial"
    for wav in uploads_dir.glob("*/*.wav"):
        # A complete file without a row is allowed (the next upload of it adopts it);
        # a partial one is not.
        assert hashlib.sha256(wav.read_bytes()).hexdigest() == wav.stem, f"{wav} is partial"
    return rows


@pytest.fixture(scope="module")
def retrain_overrides(synthetic_source, data_cache_dir) -> list[str]:
    return retrain_overrides_for(synthetic_source, data_cache_dir)


# -- nothing is unpickled ------------------------------------------------------------------


class _Bomb:
    """Unpickling this creates `marker`: proof that something ran pickle on it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_and_weights_are_refused_unexecuted(trained_registry_copy, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    import torch

    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Bomb(marker)}}, ckpt)
    with pytest.raises(RegistryError, match="cannot be loaded safely"):
        export_checkpoint(ckpt)

    # An attacker with write access swaps the weights for a pickle and fixes the checksum.
    registry = Registry(trained_registry_copy)
    bundle = registry.get("v1")
    evil = pickle.dumps({"weight": _Bomb(marker)})
    bundle.weights_path.write_bytes(evil)
    meta = json.loads((bundle.path / "bundle.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(evil).hexdigest()
    meta["bundle_sha256"] = bundle_json_sha256(meta)  # ... and the bundle.json checksum
    (bundle.path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="corrupt"):
        registry.get("v1").load_net()
    assert not marker.exists(), "a pickle was executed"
    hostile.record("fault", point="pickle_planted_as_weights", state="refused, not executed")


# -- retrain killed at each stage ---------------------------------------------------------


@pytest.mark.timeout(900)
def test_retrain_killed_at_each_stage_leaves_registry_and_serving_intact(
    trained_registry, retrain_overrides, tmp_path
):
    with start_server(tmp_path / "srv", trained_registry, retrain_overrides) as server:
        assert predict_version(server.url) == "v1"
        for point in ("export", "registry_commit"):
            rc, out = run_retrain(server, tmp_path, retrain_overrides, point)
            assert rc == -signal.SIGKILL, f"{point}: exit {rc}\n{out[-3000:]}"
            versions = assert_registry_consistent(server.registry_dir, current="v1")
            assert versions == ["v1"], f"{point}: a half-registered version is listed"
            assert predict_version(server.url) == "v1"
            listed = httpx.get(server.url + "/models", timeout=TIMEOUT).json()
            assert listed["current"] == "v1" and [v["version"] for v in listed["versions"]] == [
                "v1"
            ]
            orphans = sorted(p.name for p in server.registry_dir.glob("v*") if p.name != "v1")
            hostile.record(
                "fault",
                point=f"retrain:{point}",
                state=f"current v1, listed {versions}, unlisted folders {orphans}, serving v1",
            )

        # The lock was not left held and the orphan's number is not reused: the next
        # registration (here in-process, as retrain would do it) gets a fresh number.
        new = _register_copy_of_v1(server.registry_dir, promote=True)
        assert orphans and new not in orphans, (new, orphans)
        assert assert_registry_consistent(server.registry_dir, current=new) == ["v1", new]
        assert eventually(lambda: predict_version(server.url) == new)
        hostile.record("fault", point="register after the kills", state=f"registered {new}, served")


# -- corrupt registry and bundles -----------------------------------------------------------


def _register_copy_of_v1(root: Path, promote: bool = False) -> str:
    registry = Registry(root)
    bundle = registry.get("v1")
    meta = {k: v for k, v in bundle.meta.items() if k not in ("weights_sha256", "created_at")}
    return registry.register(bundle.load_net(), meta, promote=promote, reason="test copy")


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def inference_workers(server_pid: int) -> list[int]:
    """The pids of the server's inference workers (spawned children of its main process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == server_pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(600)
def test_a_killed_inference_worker_is_restarted_and_requests_queued_meanwhile_are_served(
    trained_registry, tmp_path
):
    with start_server(
        tmp_path / "srv", trained_registry, extra=["server.workers_per_device=1"]
    ) as server:
        assert predict_version(server.url) == "v1"
        (worker,) = inference_workers(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        # Sent while no worker is alive: they wait in the channel for the restarted one.
        answers: list[str] = []
        threads = [
            threading.Thread(target=lambda: answers.append(predict_version(server.url)))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert answers == ["v1"] * 3
        (restarted,) = inference_workers(server.process.pid)
        assert restarted != worker
        assert "Worker 0 is dead. Restarting it" in server.log_text()
        hostile.record("fault", point="inference worker SIGKILL", state="restarted, 0 failed")


@pytest.mark.timeout(600)
def test_corrupt_registry_and_bundles_are_reported_and_never_served(
    trained_registry, retrain_overrides, tmp_path
):
    root = tmp_path / "srv"
    shutil.copytree(trained_registry, root / "models")
    v2, v3 = _register_copy_of_v1(root / "models"), _register_copy_of_v1(root / "models")
    _flip_byte(root / "models" / v2 / "weights.safetensors")
    (root / "models" / v3 / "bundle.json").write_text("{ not json")
    state_path = root / "models" / "registry.json"
    good_state = state_path.read_text()

    with start_server(root, None, retrain_overrides) as server:
        key = {"X-API-Key": server.api_key}
        with httpx.Client(base_url=server.url, timeout=TIMEOUT, headers=key) as client:
            # Tampered weights: promote is refused, with the reason.
            resp = client.post(f"/models/{v2}/promote")
            assert resp.status_code == 409 and "sha256" in resp.json()["error"], resp.text
            # Broken bundle.json: listed with its error, cannot be promoted or rolled back to.
            listed = {v["version"]: v for v in client.get("/models").json()["versions"]}
            assert "error" in listed[v3] and v3 in listed[v3]["error"]
            assert client.post(f"/models/{v3}/promote").status_code == 409
            assert client.post("/models/rollback", json={"version": v3}).status_code == 409
            assert client.get("/models").json()["current"] == "v1"
            assert predict_version(server.url) == "v1"
            hostile.record("fault", point="tampered_weights_promote", state="409, v1 served")
            hostile.record("fault", point="broken_bundle_json", state="listed with error, 409")

            # registry.json edited behind the server's back to point at the tampered v2:
            # workers refuse to load it and keep serving v1.
            state = json.loads(good_state)
            state["current"] = v2
            state_path.write_text(json.dumps(state))
            time.sleep(1.0)  # several reload checks
            assert {predict_version(server.url) for _ in range(5)} == {"v1"}
            hostile.record("fault", point="registry_points_at_tampered", state="v1 served")

            # registry.json garbage: predictions continue, reads say what is wrong.
            state_path.write_text('{"current": "v1", "versions": [')
            time.sleep(0.5)
            assert predict_version(server.url) == "v1"
            resp = client.get("/models")
            assert resp.status_code == 409 and "not valid JSON" in resp.json()["error"]
            status = client.get("/status").json()
            assert (
                status["model"]["version"] is None and "not valid JSON" in status["model"]["error"]
            )
            assert client.post(f"/models/{v2}/promote").status_code == 409
            hostile.record(
                "fault", point="registry_json_garbage", state="409 + status error; v1 served"
            )

    # A restart over the broken registry refuses, clearly, instead of serving something.
    with (
        pytest.raises(RuntimeError, match="not valid JSON"),
        start_server(root, None, retrain_overrides, timeout=120),
    ):
        pass
    state = json.loads(good_state)
    state["current"] = v2
    state_path.write_text(json.dumps(state))
    with (
        pytest.raises(RuntimeError, match="sha256"),
        start_server(root, None, retrain_overrides, timeout=120),
    ):
        pass
    hostile.record("fault", point="restart_on_corrupt_registry", state="refused to start")


# -- uploads, crashes and restarts ---------------------------------------------------------


def _send_partial_upload(url: str, key: str, label: str) -> None:
    """Start a multipart upload, send half of its body, then end the stream and wait until
    the server has given up on the request (it answers or closes the connection)."""
    boundary = "hostileboundary"
    wav = hostile.valid_wav(1.0, seed=4242)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n{label}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="cut.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + wav
        + f"\r\n--{boundary}--\r\n".encode()
    )
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /upload HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body[: len(body) // 2])
        s.shutdown(socket.SHUT_WR)  # the client is gone mid-body
        while s.recv(65536):  # b"" once the server closed its side: it is done with it
            pass


@pytest.mark.timeout(900)
def test_crashes_lose_no_upload_job_or_version(trained_registry, retrain_overrides, tmp_path):
    root = tmp_path / "srv"
    with start_server(root, trained_registry, retrain_overrides) as server:
        url, key = server.url, server.api_key
        headers = {"X-API-Key": key}
        for i, label in enumerate(LABELS):
            assert upload(url, key, seed=i, label=label).json()["results"][0]["status"] == "stored"
        rows_before = assert_uploads_intact(server.uploads_dir)

        # An upload cut off mid-body leaves nothing behind.
        _send_partial_upload(url, key, LABELS[0])
        assert assert_uploads_intact(server.uploads_dir) == rows_before
        assert not [p for p in server.uploads_dir.rglob(".*tmp*")], "temp file left"
        hostile.record("fault", point="upload_cut_mid_body", state="no file, no row")

        # A retrain job SIGKILLed during training: failed, previous version serving.
        job = httpx.post(url + "/retrain", json={"epochs": 30}, headers=headers, timeout=TIMEOUT)
        assert job.status_code == 202, job.text
        killed_job = job.json()["job_id"]
        eventually(
            lambda: httpx.get(f"{url}/retrain/{killed_job}", timeout=TIMEOUT).json()["epoch"] >= 1,
            timeout=RETRAIN_TIMEOUT_S,
        )
        pid = json.loads((server.jobs_dir / killed_job / "job.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        failed = eventually(
            lambda: (
                (j := httpx.get(f"{url}/retrain/{killed_job}", timeout=TIMEOUT).json())["state"]
                == "failed"
                and j
            )
        )
        assert re.search(r"-9|killed|interrupted", failed["error"]), failed
        assert_registry_consistent(server.registry_dir, current="v1")
        assert predict_version(url) == "v1"
        hostile.record(
            "fault", point="retrain:training (job SIGKILL)", state="job failed, v1 served"
        )

        # A new job is accepted (nothing stale) and promotes v2.
        job = httpx.post(
            url + "/retrain", json={"epochs": 1, "force": True}, headers=headers, timeout=TIMEOUT
        )
        assert job.status_code == 202, job.text
        good_job = job.json()["job_id"]
        done = eventually(
            lambda: (
                (j := httpx.get(f"{url}/retrain/{good_job}", timeout=TIMEOUT).json())["state"]
                in ("succeeded", "failed")
                and j
            ),
            timeout=RETRAIN_TIMEOUT_S,
            every=1.0,
        )
        assert done["state"] == "succeeded", done
        assert eventually(lambda: predict_version(url) == "v2")

        # SIGKILL the whole server while uploads are in flight.
        acknowledged: list[str] = []
        stop = threading.Event()

        def uploader() -> None:
            seed = 1000
            while not stop.is_set():
                seed += 1
                with contextlib.suppress(httpx.HTTPError):
                    resp = upload(url, key, seed=seed, label=LABELS[seed % 4])
                    if resp.status_code == 200:
                        acknowledged.extend(
                            r["sha256"] for r in resp.json()["results"] if r["status"] == "stored"
                        )

        threads = [threading.Thread(target=uploader) for _ in range(3)]
        for t in threads:
            t.start()
        eventually(lambda: len(acknowledged) >= 6, timeout=60)
        os.killpg(server.process.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.process.wait(timeout=30)

    # Restart over the same root: uploads, jobs and the current version are all there.
    with start_server(root, None, retrain_overrides) as again:
        rows = assert_uploads_intact(again.uploads_dir)
        assert set(acknowledged) <= set(rows), "an acknowledged upload was lost"
        assert set(rows_before) <= set(rows)
        status = httpx.get(again.url + "/status", timeout=TIMEOUT).json()
        assert sum(status["uploads"].values()) == len(rows)
        assert httpx.get(f"{again.url}/retrain/{killed_job}", timeout=TIMEOUT).json()["state"] == (
            "failed"
        )
        assert httpx.get(f"{again.url}/retrain/{good_job}", timeout=TIMEOUT).json()["state"] == (
            "succeeded"
        )
        assert httpx.get(again.url + "/models", timeout=TIMEOUT).json()["current"] == "v2"
        assert predict_version(again.url) == "v2"
        leftovers = [p.name for p in again.uploads_dir.rglob(".*tmp*")]
        hostile.record(
            "fault",
            point="server SIGKILL during uploads + restart",
            state=f"{len(acknowledged)} acknowledged uploads all kept ({len(rows)} rows), "
            f"jobs failed/succeeded kept, v2 current; temp files left: {len(leftovers)}",
        )
