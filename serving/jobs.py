"""Retraining jobs run by the server: one `faultsense.retrain` subprocess at a time.

Every job has a folder `jobs_dir/<job_id>/` holding

    job.json       written here: request (epochs, force), pid, state, return code, times
    status.json    written by the retrain process: state, epoch, max_epochs, metrics, decision
    decision.json  written by the retrain process once it decided to promote or not
    log.txt        the subprocess's stdout + stderr

so job history survives a server restart, and several uvicorn processes agree on what
runs (a file lock guards "is one running? then start"). The subprocess's command line is
built only from typed, range-checked values and operator config: request text never
reaches Hydra, a shell or a path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faultsense.config import utc_now
from faultsense.errors import ConfigError
from faultsense.fileio import write_json_atomic
from faultsense.retrain_job import DECISION_FILE, STATUS_FILE

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
LOG_FILE = "log.txt"
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed")
_JOB_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
# Secrets the child has no use for: keep them out of its environment (and its logs).
_SECRET_ENV = ("FAULTSENSE_API_KEY", "LIT_SERVER_API_KEY", "LIT_SHUTDOWN_API_KEY")


class JobBusyError(Exception):
    """A retrain job is already queued or running (HTTP 409)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"Retraining job {job_id} is still running; wait for it to finish "
            f"(GET /retrain/{job_id}) before starting another."
        )
        self.job_id = job_id


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def hydra_value(value: str | Path) -> str:
    """Quote a path-like value for a Hydra override so `=`, spaces, commas stay literal."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:+\-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    return True


class JobRunner:
    """Start, watch and describe retrain jobs under `jobs_dir`.

    `command` is the program prefix (default: this Python running `-m faultsense.retrain`);
    `base_overrides` are operator-chosen Hydra overrides added to every job.
    """

    def __init__(
        self,
        jobs_dir: str | os.PathLike[str],
        *,
        registry_dir: str | os.PathLike[str],
        uploads_dir: str | os.PathLike[str],
        base_overrides: Sequence[str] = (),
        command: Sequence[str] | None = None,
        timeout_s: float = 3600.0,
        log_tail_lines: int = 40,
    ) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.registry_dir = Path(registry_dir)
        self.uploads_dir = Path(uploads_dir)
        self.base_overrides = [str(o) for o in base_overrides]
        self.command = list(command) if command else [sys.executable, "-m", "faultsense.retrain"]
        self.timeout_s = float(timeout_s)
        self.log_tail_lines = int(log_tail_lines)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    # -- reads ------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path | None:
        """The folder of `job_id`, or None if the id is malformed or unknown."""
        if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
            return None
        path = self.jobs_dir / job_id
        return path if (path / JOB_FILE).is_file() else None

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The merged view of a job (see the HTTP contract), or None if unknown."""
        path = self.job_dir(job_id)
        if path is None:
            return None
        job = self._settle(path)
        status = _read_json(path / STATUS_FILE) or {}
        decision = _read_json(path / DECISION_FILE) or status.get("decision")
        return {
            "job_id": job_id,
            "state": job.get("state", "queued"),
            "epochs": job.get("epochs"),
            "force": job.get("force"),
            "created_at": job.get("created_at"),
            "started_at": job.get("started_at"),
            "finished_at": job.get("finished_at"),
            "returncode": job.get("returncode"),
            "error": job.get("error") or status.get("error"),
            "epoch": status.get("epoch", 0),
            "max_epochs": status.get("max_epochs", job.get("epochs")),
            "metrics": status.get("metrics") or {},
            "version": status.get("version"),
            "decision": decision,
            "log_tail": self.log_tail(path),
        }

    def log_tail(self, path: Path) -> list[str]:
        try:
            with open(path / LOG_FILE, encoding="utf-8", errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=self.log_tail_lines)]
        except OSError:
            return []

    def job_ids(self) -> list[str]:
        """Known job ids, oldest first (ids start with a UTC timestamp)."""
        return sorted(
            p.name for p in self.jobs_dir.iterdir() if _JOB_ID_RE.match(p.name) and p.is_dir()
        )

    def latest(self) -> dict[str, Any] | None:
        ids = self.job_ids()
        return self.get(ids[-1]) if ids else None

    def active(self) -> str | None:
        """Id of the job that is queued or running, if any."""
        for job_id in reversed(self.job_ids()):
            path = self.jobs_dir / job_id
            if self._settle(path).get("state") in ACTIVE_STATES:
                return job_id
        return None

    # -- writes -----------------------------------------------------------------------

    def start(self, *, epochs: int, force: bool) -> str:
        """Start a job unless one is active (JobBusyError); returns its id."""
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}.")
        if not isinstance(force, bool):
            raise ConfigError(f"force must be true or false, got {force!r}.")
        from filelock import FileLock

        with FileLock(str(self.jobs_dir / ".lock"), timeout=30):
            busy = self.active()
            if busy:
                raise JobBusyError(busy)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
            job_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
            path = self.jobs_dir / job_id
            path.mkdir(parents=True)
            job = {
                "job_id": job_id,
                "state": "queued",
                "epochs": epochs,
                "force": force,
                "created_at": utc_now(),
            }
            write_json_atomic(path / JOB_FILE, job)
            argv = self._argv(path, epochs=epochs, force=force)
            env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
            env["PYTHONUNBUFFERED"] = "1"
            with open(path / LOG_FILE, "ab") as log_file:
                proc = subprocess.Popen(
                    argv,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    close_fds=True,
                )
            job.update(state="running", pid=proc.pid, started_at=utc_now(), argv=argv)
            write_json_atomic(path / JOB_FILE, job)
        threading.Thread(
            target=self._watch, args=(proc, path), name=f"retrain-{job_id}", daemon=True
        ).start()
        log.info("Started retrain job %s (epochs=%d, force=%s)", job_id, epochs, force)
        return job_id

    def _argv(self, path: Path, *, epochs: int, force: bool) -> list[str]:
        overrides = [
            f"epochs={int(epochs)}",
            f"force={'true' if force else 'false'}",
            f"job_dir={hydra_value(path.resolve())}",
            f"paths.registry_dir={hydra_value(self.registry_dir.resolve())}",
            f"paths.uploads_dir={hydra_value(self.uploads_dir.resolve())}",
            f"hydra.run.dir={hydra_value((path / 'hydra').resolve())}",
            *self.base_overrides,
        ]
        return [*self.command, *overrides]

    def _watch(self, proc: subprocess.Popen, path: Path) -> None:
        deadline = time.monotonic() + self.timeout_s
        error = None
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    rc = proc.wait()
                    error = (
                        f"Retraining ran past the limit of {self.timeout_s:g} s and was stopped."
                    )
                    break
        job = _read_json(path / JOB_FILE) or {}
        status = _read_json(path / STATUS_FILE) or {}
        job["returncode"] = rc
        job["finished_at"] = utc_now()
        if rc == 0 and error is None:
            job["state"] = (
                status.get("state") if status.get("state") in FINAL_STATES else "succeeded"
            )
        else:
            job["state"] = "failed"
            job["error"] = error or status.get("error") or self._failure_reason(path, rc)
        write_json_atomic(path / JOB_FILE, job)
        log.info("Retrain job %s finished: %s", path.name, job["state"])

    def _failure_reason(self, path: Path, rc: int) -> str:
        tail = [line for line in self.log_tail(path) if line.strip()]
        last = tail[-1].strip() if tail else "no output"
        return f"Retraining exited with code {rc}: {last}"

    def _settle(self, path: Path) -> dict[str, Any]:
        """job.json, with a job whose process vanished (e.g. the server restarted while it
        ran, or it was killed) marked failed — or adopted from its own final status."""
        job = _read_json(path / JOB_FILE) or {}
        if job.get("state") not in ACTIVE_STATES or _pid_alive(job.get("pid")):
            return job
        if job.get("state") == "queued" and not job.get("pid"):
            # Between mkdir and Popen under the lock; only stale if old.
            created = job.get("created_at")
            with contextlib.suppress(Exception):
                age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created)
                if age.total_seconds() < 60:
                    return job
        # The watcher may be finishing right now; give it a moment before deciding.
        time.sleep(0.05)
        fresh = _read_json(path / JOB_FILE) or job
        if fresh.get("state") not in ACTIVE_STATES:
            return fresh
        status = _read_json(path / STATUS_FILE) or {}
        if status.get("state") in FINAL_STATES:
            fresh["state"] = status["state"]
        else:
            fresh["state"] = "failed"
            fresh["error"] = "Retraining was interrupted (its process is gone)."
        fresh.setdefault("finished_at", utc_now())
        with contextlib.suppress(OSError):
            write_json_atomic(path / JOB_FILE, fresh)
        return fresh
