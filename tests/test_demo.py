"""`make demo` run for real: Ctrl-C stops the server and the app it started, even when
its stdout is a pipe that is already gone (`make demo 2>&1 | tee demo.log`, where the same
Ctrl-C kills `tee`), so the next `make demo` finds its ports free."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.server import free_port

REPO = Path(__file__).resolve().parents[1]
READY_LINE = b"[demo] press Ctrl-C"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def read_until(fd: int, marker: bytes, proc: subprocess.Popen, timeout_s: float) -> bytes:
    """Everything the demo wrote to `fd` up to and including `marker`."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        assert proc.poll() is None, f"demo exited with {proc.returncode}:\n{seen[-3000:]!r}"
        assert time.monotonic() < deadline, f"demo not ready in {timeout_s:g} s:\n{seen[-3000:]!r}"
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 65536)
    return seen


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def test_ctrl_c_stops_server_and_app_with_stdout_closed(trained_registry, tmp_path):
    shutil.copytree(trained_registry, tmp_path / "models")  # a current model: no training
    server_port, app_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAULTSENSE_", "GRADIO_"))}
    env.update(
        FAULTSENSE_ROOT=str(tmp_path),
        GRADIO_TEMP_DIR=str(tmp_path / "gradio-tmp"),
        PYTHONUNBUFFERED="1",
        WANDB_MODE="disabled",
    )
    argv = [
        sys.executable, "-m", "serving.demo", "host=127.0.0.1", f"port={app_port}",
        f"demo.server_port={server_port}", "demo.example_seconds=1.0",
    ]  # fmt: skip
    demo = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: the SIGINT below is a terminal's Ctrl-C
    )
    started: list[int] = []
    try:
        output = read_until(demo.stdout.fileno(), READY_LINE, demo, START_TIMEOUT_S)
        assert f"127.0.0.1:{server_port}".encode() in output
        assert f"127.0.0.1:{app_port}".encode() in output
        started = child_pids(demo.pid)
        assert len(started) == 2, f"expected the server and the app, found {started}"

        demo.stdout.close()  # the reader is gone (tee died with the same Ctrl-C)
        os.killpg(demo.pid, signal.SIGINT)
        stopping = time.monotonic()
        demo.wait(timeout=STOP_TIMEOUT_S)
        print(f"the demo stopped in {time.monotonic() - stopping:.1f} s")
        deadline = time.monotonic() + 10.0
        while not (refuses(server_port) and refuses(app_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert refuses(server_port), f"the server still listens on {server_port}"
        assert refuses(app_port), f"the app still listens on {app_port}"
        assert demo.returncode == 0
    finally:
        for pid in [demo.pid, *started]:  # whatever the demo left behind, with its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            demo.wait(timeout=10)
