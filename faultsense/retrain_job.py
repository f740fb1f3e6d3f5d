"""The files a retrain job leaves in its `job_dir` for whoever watches it (the server's
`serving.jobs`): their names, and the progress writer. Light: no torch, no Hydra.

    status.json    progress: state, stage, epoch, max_epochs, metrics, version, decision
    decision.json  the gate's decision, once made
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import utc_now
from .fileio import write_json_atomic

STATUS_FILE = "status.json"
DECISION_FILE = "decision.json"


class JobStatus:
    """Progress of one retrain run in `job_dir/status.json` (atomic writes); no-op without a dir."""

    def __init__(self, job_dir: str | Path | None) -> None:
        self.job_dir = Path(job_dir) if job_dir else None
        self.path = self.job_dir / STATUS_FILE if self.job_dir else None
        self.data: dict[str, Any] = {"state": "running", "epoch": 0, "metrics": {}}

    def update(self, **fields: Any) -> None:
        """Merge `fields` into the status and rewrite status.json."""
        self.data.update(fields, updated_at=utc_now())
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)

    def write_decision(self, decision: dict[str, Any]) -> None:
        """Write the gate's decision to decision.json (no-op without a job dir)."""
        if self.job_dir is not None:
            write_json_atomic(self.job_dir / DECISION_FILE, decision)
