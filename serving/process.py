"""Stopping the processes the project starts (server, app, retrain jobs) as a group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group of `proc` (started with `start_new_session=True`), wait up
    to `grace_s` for a clean exit, then SIGKILL whatever is left of the group.

    The group is killed regardless because LitServe workers or a retrain job can outlive
    the main process, and would keep the port or the CPU.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
