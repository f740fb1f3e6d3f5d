"""`make demo`: the first run, offline. Synthetic data -> a small trained model in the
registry -> the server and the web app, until Ctrl-C.

    make demo                                    # server :8000, app :7860
    make demo ARGS="port=7861 demo.server_port=8001"
    make demo ARGS="demo.retrain=true"           # train a fresh model even if one exists

Options come from configs/app.yaml (`demo:` and the app's own keys). Everything it writes
goes under FAULTSENSE_ROOT (default: the working directory): data/, models/, logs/.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from faultsense import CONFIG_DIR
from faultsense.errors import ConfigError, FaultSenseError
from faultsense.taxonomy import LABELS
from serving.process import stop_group

# Absolute, so the installed `faultsense-app` script finds configs/ from any module path.


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def make_synthetic(train_cfg: DictConfig) -> Path:
    """Write the synthetic ESC-50-layout set the demo preset trains on (kept if current)."""
    from faultsense.data import synthetic

    source = Path(train_cfg.data.source)
    params = dict(train_cfg.data.synthetic)
    if synthetic.matches(source, **params):
        say(f"synthetic dataset already at {source}")
    else:
        say(f"writing the synthetic dataset to {source} ...")
        synthetic.write_synthetic(source, **params)
    return source


def write_examples(train_cfg: DictConfig, folder: Path, seed: int, seconds: float) -> None:
    """One unseen synthetic clip per label under folder/<label>/, for Predict and Insights."""
    import numpy as np
    import soundfile as sf

    from faultsense.data import synthetic

    classes = train_cfg.data.mapping.classes
    rng = np.random.default_rng(seed)
    for label in LABELS:
        category = next((c for c in synthetic.CATEGORIES if c in classes[label]), None)
        if category is None:
            continue
        path = folder / label / f"{category}-example.wav"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        wave = synthetic.synth_clip(category, rng, seconds)
        sf.write(path, wave, synthetic.SAMPLE_RATE, subtype="PCM_16")
    say(f"example clips (one per label) in {folder}")


def train_model(experiment: str) -> None:
    say(f"training the demo model (faultsense-train experiment={experiment}) ...")
    argv = [sys.executable, "-m", "faultsense.train", f"experiment={experiment}", "register=true"]
    rc = subprocess.call(argv)
    if rc != 0:
        raise ConfigError(f"training failed (exit code {rc}); see its output above.")


def wait_http(url: str, proc: subprocess.Popen, name: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(
                f"the {name} exited with code {proc.returncode}; see its output above."
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ConfigError(f"the {name} did not answer at {url} within {timeout_s:g} s.")


def start(argv: list[str]) -> subprocess.Popen:
    # Own process group, so a Ctrl-C reaches only this script, which then stops the app
    # first and the server (with its worker processes) after it, in order.
    return subprocess.Popen(argv, start_new_session=True)


def stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    say(f"stopping the {name} ...")
    stop_group(proc)


def demo(cfg: DictConfig) -> None:
    """Prepare data and a model if needed, then run server + app until interrupted."""
    from hydra import compose

    from faultsense.registry import Registry

    host, app_port, server_port = str(cfg.host), int(cfg.port), int(cfg.demo.server_port)
    for port in (server_port, app_port):
        if not port_free(host, port):
            raise ConfigError(
                f"port {port} on {host} is in use (an earlier demo or server?). Stop it, or "
                'pick others: make demo ARGS="port=7861 demo.server_port=8001".'
            )
    train_cfg = compose(config_name="train", overrides=[f"experiment={cfg.demo.experiment}"])
    registry = Registry(cfg.paths.registry_dir)
    if cfg.demo.retrain or registry.current_version() is None:
        make_synthetic(train_cfg)
        train_model(str(cfg.demo.experiment))
    say(f"serving model {registry.current_version()} from {registry.root}")
    write_examples(
        train_cfg,
        Path(cfg.examples_dir),
        int(cfg.demo.example_seed),
        float(cfg.demo.example_seconds),
    )

    server_url = f"http://{host}:{server_port}"
    app_url = f"http://{host}:{app_port}"
    server = app = None
    try:
        # Retraining from the app fine-tunes on the same synthetic data (offline).
        retrain_overrides = f"retrain.overrides=['experiment={cfg.demo.experiment}']"
        server = start(
            [
                sys.executable,
                "-m",
                "serving.server",
                f"host={host}",
                f"port={server_port}",
                retrain_overrides,
            ]
        )
        wait_http(f"{server_url}/health", server, "server", float(cfg.demo.startup_timeout_s))
        app = start(
            [
                sys.executable,
                "-m",
                "serving.app",
                f"host={host}",
                f"port={app_port}",
                f"server_url={server_url}",
            ]
        )
        wait_http(app_url, app, "app", float(cfg.demo.startup_timeout_s))
        say(f"server: {server_url}  (try: curl -F file=@clip.wav {server_url}/predict)")
        say(f"app:    {app_url}")
        say("press Ctrl-C to stop both")
        while server.poll() is None and app.poll() is None:
            time.sleep(0.5)
        say("a process exited; shutting down")
    except KeyboardInterrupt:
        print(flush=True)
    finally:
        stop(app, "app")
        stop(server, "server")


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
def main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        demo(cfg)
    except FaultSenseError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
