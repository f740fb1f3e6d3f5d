"""The Gradio app launched for real (a subprocess) against the real server; driven with
gradio_client the way a script or the browser would drive it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from faultsense.taxonomy import LABELS

REPO = Path(__file__).resolve().parents[1]
APP_START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(
    server_url: str, workdir: Path, *, api_key: str | None = None, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    """Start `python -m serving.app` on a free port; yield its URL; always stop it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAULTSENSE_", "GRADIO_"))}
    env.update(
        FAULTSENSE_ROOT=str(workdir),
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(workdir / "gradio-tmp"),
        PYTHONUNBUFFERED="1",
    )
    if api_key is not None:
        env["FAULTSENSE_API_KEY"] = api_key
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"app-{port}.log"
    argv = [sys.executable, "-m", "serving.app", f"port={port}", f"server_url={server_url}", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + APP_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"app did not start in {APP_START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def gradio(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def tone_wav(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 16_000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe closed


# -- a server that is down ----------------------------------------------------------


def test_down_server_gives_a_clear_message_not_a_traceback(tmp_path):
    from gradio_client import handle_file

    down = closed_port_url()
    clip = tone_wav(tmp_path / "pump.wav")
    with running_app(down, tmp_path / "app") as url:
        client = gradio(url)
        message, probabilities, figure, _ = client.predict(handle_file(str(clip)), api_name="/predict")
        status, rows, _ = client.predict([handle_file(str(clip))], "normal", api_name="/upload")
        job_status, *_ = client.predict(1, False, api_name="/retrain")
        models_status, *_ = client.predict(api_name="/models")
    for text in (message, status, job_status, models_status):
        assert f"server at {down} is not reachable" in text
        assert "make serve" in text  # what to do next
        assert "Traceback" not in text
    assert probabilities in ({}, None) or not probabilities.get("confidences")
    assert figure is not None  # the clip's own views still render without a server
    assert rows["data"] == []
