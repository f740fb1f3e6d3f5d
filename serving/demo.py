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
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from faultsense import CONFIG_DIR
from faultsense.config import plain, run_cli
from faultsense.errors import ConfigError
from serving.process import stop_group


def say(message: str) -> None:
    """Print one `[demo]` progress line."""
    write_line(f"[demo] {message}")


def write_line(text: str) -> None:
    """Print `text`; never raises. After Ctrl-C on `make demo | tee demo.log` the pipe's
    reader is gone, and stopping the server must not fail on the message that says so."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):  # BrokenPipeError; ValueError: sys.stdout was closed
        with contextlib.suppress(OSError, ValueError):
            # Later prints and the flush at exit then go nowhere instead of raising again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


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
    params = plain(train_cfg.data.synthetic)
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
    for label in classes:  # the labels the demo model is trained on
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
    """Stop `proc` and its process group, whatever printing the message does."""
    if proc is None or proc.poll() is not None:
        return
    try:
        say(f"stopping the {name} ...")
    finally:
        stop_group(proc)


def stop_both(app: subprocess.Popen | None, server: subprocess.Popen | None) -> None:
    """Stop the app, then the server (with its workers), even if stopping the app fails."""
    # A second Ctrl-C (or SIGTERM) while stopping would abandon the server on its port;
    # stop_group is bounded (SIGKILL after its grace), so ignoring them cannot hang.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        stop(app, "app")
    finally:
        stop(server, "server")


def check_ports(host: str, ports: tuple[int, ...]) -> None:
    for port in ports:
        if not port_free(host, port):
            raise ConfigError(
                f"port {port} on {host} is in use (an earlier demo or server?). Stop it, or "
                'pick others: make demo ARGS="port=7861 demo.server_port=8001".'
            )


def prepare_model(cfg: DictConfig) -> None:
    """Train and register the demo model unless the registry has one (or demo.retrain),
    and write the example clips."""
    from hydra import compose

    from faultsense.registry import Registry

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


def run_services(cfg: DictConfig, host: str, server_port: int, app_port: int) -> None:
    """Start the server, then the app; wait for Ctrl-C or for either to exit; stop both."""
    server_url = f"http://{host}:{server_port}"
    app_url = f"http://{host}:{app_port}"
    timeout_s = float(cfg.demo.startup_timeout_s)
    # Retraining from the app fine-tunes on the same synthetic data (offline).
    retrain_overrides = f"retrain.overrides=['experiment={cfg.demo.experiment}']"
    server = app = None
    try:
        server = start(
            [sys.executable, "-m", "serving.server", f"host={host}", f"port={server_port}",
             retrain_overrides]
        )  # fmt: skip
        wait_http(f"{server_url}/health", server, "server", timeout_s)
        app = start(
            [sys.executable, "-m", "serving.app", f"host={host}", f"port={app_port}",
             f"server_url={server_url}"]
        )  # fmt: skip
        wait_http(app_url, app, "app", timeout_s)
        say(f"server: {server_url}  (try: curl -F file=@clip.wav {server_url}/predict)")
        say(f"app:    {app_url}")
        say("press Ctrl-C to stop both")
        while server.poll() is None and app.poll() is None:
            time.sleep(0.5)
        say("a process exited; shutting down")
    except KeyboardInterrupt:
        write_line("")  # end the terminal's "^C" line
    finally:
        stop_both(app, server)


def demo(cfg: DictConfig) -> None:
    """Prepare data and a model if needed, then run server + app until interrupted."""
    host, app_port, server_port = str(cfg.host), int(cfg.port), int(cfg.demo.server_port)
    check_ports(host, (server_port, app_port))
    prepare_model(cfg)
    run_services(cfg, host, server_port, app_port)


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
def main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    # Started from a shell's background job (`make demo &`, nohup, a non-interactive
    # script), SIGINT arrives ignored and Python then installs no Ctrl-C handler: a SIGINT
    # sent to the demo would leave server and app running. Ctrl-C always stops both.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_cli("demo", demo, cfg)


if __name__ == "__main__":
    main()
