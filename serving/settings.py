"""configs/serve.yaml -> `ServeSettings`: the plain, validated values the server, its
routes and its inference workers read (pickled into the workers, so no DictConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from faultsense.config import plain
from faultsense.errors import ConfigError

# The hosts LitServe can bind.
ALLOWED_HOSTS = ("127.0.0.1", "0.0.0.0", "::")
# What runs the net in a worker (faultsense.inference RUNTIMES).
RUNTIMES = ("torch", "onnx")


@dataclass
class ServeSettings:
    """What configs/serve.yaml says, flattened; defaults match the file."""

    registry_dir: str
    uploads_dir: str
    jobs_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    access_log: bool = False
    accelerator: str = "cpu"
    devices: int | str = "auto"
    workers_per_device: int = 1
    num_api_servers: int = 2
    torch_threads: int = 1
    runtime: str = "onnx"
    onnx_cache_dir: str = ""  # "" = a temp file per load (no cache)
    max_batch_size: int = 32
    batch_timeout: float = 0.0
    request_timeout: float = 60.0
    reload_check_s: float = 0.0
    restart_workers: bool = True
    debug_timing: bool = False
    max_request_bytes: int = 25 * 2**20
    max_upload_request_bytes: int = 100 * 2**20
    max_predict_seconds: float = 600.0
    max_upload_seconds: float = 60.0
    max_files_per_upload: int = 32
    max_filename_chars: int = 200
    api_key_env: str = "FAULTSENSE_API_KEY"
    protect_predict: bool = False
    protect_metrics: bool = False
    retrain_default_epochs: int = 5
    retrain_max_epochs: int = 50
    retrain_timeout_s: float = 3600.0
    retrain_log_tail_lines: int = 40
    retrain_overrides: list[str] = field(default_factory=list)
    monitor: dict[str, Any] = field(default_factory=dict)  # serve.yaml `monitor:` (MonitorSettings)

    @classmethod
    def from_cfg(cls, cfg: Any) -> ServeSettings:
        """The serve config (DictConfig or a mapping shaped like serve.yaml), resolved."""
        c = plain(cfg)
        s, lim, auth, rt = c["server"], c["limits"], c["auth"], c["retrain"]
        return cls(
            registry_dir=str(c["paths"]["registry_dir"]),
            uploads_dir=str(c["paths"]["uploads_dir"]),
            jobs_dir=str(c["jobs_dir"]),
            host=str(c["host"]),
            port=int(c["port"]),
            log_level=str(c.get("log_level", "warning")),
            access_log=bool(c.get("access_log", False)),
            accelerator=str(s["accelerator"]),
            devices=s["devices"],
            workers_per_device=int(s["workers_per_device"]),
            num_api_servers=int(s["num_api_servers"]),
            torch_threads=int(s["torch_threads"]),
            runtime=str(s.get("runtime", "onnx")),
            onnx_cache_dir=_onnx_cache_dir(c),
            max_batch_size=int(s["max_batch_size"]),
            batch_timeout=float(s["batch_timeout"]),
            request_timeout=float(s["request_timeout"]),
            reload_check_s=float(s["reload_check_s"]),
            restart_workers=bool(s.get("restart_workers", True)),
            debug_timing=bool(s.get("debug_timing", False)),
            max_request_bytes=int(lim["max_request_bytes"]),
            max_upload_request_bytes=int(lim["max_upload_request_bytes"]),
            max_predict_seconds=float(lim["max_predict_seconds"]),
            max_upload_seconds=float(lim["max_upload_seconds"]),
            max_files_per_upload=int(lim["max_files_per_upload"]),
            max_filename_chars=int(lim["max_filename_chars"]),
            api_key_env=str(auth["api_key_env"]),
            protect_predict=bool(auth["protect_predict"]),
            protect_metrics=bool(auth.get("protect_metrics", False)),
            retrain_default_epochs=int(rt["default_epochs"]),
            retrain_max_epochs=int(rt["max_epochs"]),
            retrain_timeout_s=float(rt["timeout_s"]),
            retrain_log_tail_lines=int(rt["log_tail_lines"]),
            retrain_overrides=[str(o) for o in rt.get("overrides") or []],
            monitor=dict(c.get("monitor") or {}),
        )

    def validate(self) -> None:
        """Raise ConfigError naming the first setting the server cannot run with."""
        if self.host not in ALLOWED_HOSTS:
            raise ConfigError(
                f"host={self.host!r} is not supported by LitServe; use one of {', '.join(ALLOWED_HOSTS)}."
            )
        if not 1024 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} must be between 1024 and 65535.")
        if self.max_batch_size < 1 or self.workers_per_device < 1 or self.num_api_servers < 1:
            raise ConfigError(
                "server.max_batch_size, workers_per_device and num_api_servers must be >= 1."
            )
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"server.runtime={self.runtime!r}: choose one of {', '.join(RUNTIMES)}."
            )
        if (
            self.retrain_max_epochs < 1
            or not 1 <= self.retrain_default_epochs <= self.retrain_max_epochs
        ):
            raise ConfigError("retrain.default_epochs must be between 1 and retrain.max_epochs.")


def _onnx_cache_dir(c: dict[str, Any]) -> str:
    """`paths.cache_dir`/onnx: where workers keep the exported ONNX graphs ("" if unset)."""
    cache = (c.get("paths") or {}).get("cache_dir")
    return f"{cache}/onnx" if cache else ""


def serve_settings(cfg: Any) -> ServeSettings:
    """`cfg` (serve config or ready ServeSettings) as validated ServeSettings; ConfigError
    when a value is out of range."""
    settings = cfg if isinstance(cfg, ServeSettings) else ServeSettings.from_cfg(cfg)
    settings.validate()
    return settings
