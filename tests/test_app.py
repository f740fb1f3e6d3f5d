"""The Gradio app launched for real (a subprocess) against the real server; driven with
gradio_client the way a script or the browser would drive it."""

from __future__ import annotations

import contextlib
import os
import shutil
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
    server_url: str,
    workdir: Path,
    *,
    api_key: str | None = None,
    examples: dict[str, Path] | None = None,
    env_extra: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """Start `python -m serving.app` on a free port; yield its URL; always stop it.

    `examples` (label -> clip) become the app's example clips (workdir/data/examples).
    """
    for label, clip in (examples or {}).items():
        (workdir / "data" / "examples" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, workdir / "data" / "examples" / label / clip.name)
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
    env.update(env_extra or {})
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
                pytest.fail(
                    f"app did not start in {APP_START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}"
                )
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
        message, probabilities, figure, _ = client.predict(
            handle_file(str(clip)), api_name="/predict"
        )
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


def test_app_login_is_required_when_configured(tmp_path):
    creds = {"FAULTSENSE_APP_USER": "operator", "FAULTSENSE_APP_PASSWORD": "s3cret-pw"}
    with running_app(closed_port_url(), tmp_path / "app", env_extra=creds) as url:
        anonymous = httpx.get(f"{url}/config", timeout=10)
        assert anonymous.status_code in (401, 403)
        with pytest.raises(Exception, match="(?i)login|auth|401|403"):
            gradio(url).predict(api_name="/models")
        wrong = httpx.post(f"{url}/login", data={"username": "operator", "password": "nope"})
        assert wrong.status_code in (400, 401)
        from gradio_client import Client

        client = Client(url, auth=("operator", "s3cret-pw"), verbose=False)
        status, *_ = client.predict(api_name="/models")
    assert "not reachable" in status  # logged in: the app itself answers


# -- against the real server -----------------------------------------------------------


def write_label_clips(folder: Path, seconds: float = 2.0, seed: int = 7) -> dict[str, Path]:
    """One synthetic clip per label (unseen by training: its own seed) as folder/<label>/x.wav."""
    from faultsense.data import synthetic

    rng = np.random.default_rng(seed)
    mapping = {"mechanical_fault": "chainsaw", "electrical_fault": "crackling_fire",
               "fluid_leak": "water_drops", "normal": "engine"}  # fmt: skip
    clips = {}
    for label, category in mapping.items():
        path = folder / label / f"{category}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, synthetic.synth_clip(category, rng, seconds), synthetic.SAMPLE_RATE)
        clips[label] = path
    return clips


@pytest.fixture(scope="module")
def app_server(live_server, tmp_path_factory) -> dict:
    """The real server (tests/fixtures/server.py) plus one unseen clip per label."""
    version = httpx.get(f"{live_server.url}/status", timeout=10).json()["model"]["version"]
    return {
        "url": live_server.url,
        "api_key": live_server.api_key,
        "version": version,
        "clips": write_label_clips(tmp_path_factory.mktemp("clips")),
    }


@pytest.fixture(scope="module")
def app_url(app_server, tmp_path_factory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("app")
    with running_app(
        app_server["url"], workdir, api_key=app_server["api_key"], examples=app_server["clips"]
    ) as url:
        yield url


def plot_value(output: dict | None) -> dict | None:
    """A gr.Plot output as gradio_client returns it: the plot, or an update holding one."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output.get("value")
    return output


def confidences(label_value: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_value["confidences"]}


def test_predict_shows_what_the_server_says(app_server, app_url):
    from gradio_client import handle_file

    clip = app_server["clips"]["mechanical_fault"]
    message, probabilities, figure, timeline = gradio(app_url).predict(
        handle_file(str(clip)), api_name="/predict"
    )
    with open(clip, "rb") as f:
        direct = httpx.post(f"{app_server['url']}/predict", files={"file": f}, timeout=30).json()
    assert message.startswith(f"## {direct['label']}")
    assert f"model **{direct['version']}**" in message
    assert probabilities["label"] == direct["label"]
    shown = confidences(probabilities)
    assert set(shown) == set(LABELS)
    for label, p in direct["probabilities"].items():
        assert shown[label] == pytest.approx(p, abs=1e-6)
    assert figure is not None  # waveform + log-mel rendered
    assert plot_value(timeline) is None  # a short clip has no timeline


def test_long_recording_gets_a_timeline(app_server, app_url, tmp_path):
    from gradio_client import handle_file

    waves = [sf.read(app_server["clips"][label])[0] for label in LABELS]
    rate = sf.info(app_server["clips"][LABELS[0]]).samplerate
    long_clip = tmp_path / "shift.wav"
    sf.write(long_clip, np.concatenate(waves * 2), rate, subtype="PCM_16")
    message, _, _, timeline = gradio(app_url).predict(
        handle_file(str(long_clip)), api_name="/predict"
    )
    assert "windows" in message
    assert plot_value(timeline) is not None


def test_upload_reports_each_file_and_counts(app_server, app_url, tmp_path):
    from gradio_client import handle_file

    client = gradio(app_url)
    good = [tmp_path / "pump_a.wav", tmp_path / "pump_b.wav"]
    for i, path in enumerate(good):
        tone_wav(path, seconds=1.0, freq=300.0 + 97 * i)
    junk = tmp_path / "notes.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    before = httpx.get(f"{app_server['url']}/status", timeout=10).json()["uploads"].get("normal", 0)

    status, rows, counts = client.predict(
        [handle_file(str(p)) for p in [*good, junk]], "normal", api_name="/upload"
    )
    results = {row[0]: row for row in rows["data"]}
    assert {name: row[1] for name, row in results.items()} == {
        "pump_a.wav": "stored",
        "pump_b.wav": "stored",
        "notes.wav": "rejected",
    }
    assert "decoded" in results["notes.wav"][2]  # the reason, from the server
    assert "2 stored" in status and "1 rejected" in status
    assert dict(map(tuple, counts["data"]))["normal"] == before + 2

    _, rows, _ = client.predict([handle_file(str(good[0]))], "normal", api_name="/upload")
    assert rows["data"][0][:2] == ["pump_a.wav", "duplicate"]


def test_wrong_api_key_is_a_clear_refusal(app_server, tmp_path):
    from gradio_client import handle_file

    clip = app_server["clips"]["normal"]
    with running_app(app_server["url"], tmp_path / "app", api_key="not-the-key") as url:
        client = gradio(url)
        status, rows, _ = client.predict([handle_file(str(clip))], "normal", api_name="/upload")
        message, *_ = client.predict(handle_file(str(clip)), api_name="/predict")
    assert "refused POST /upload (403)" in status
    assert "FAULTSENSE_API_KEY" in status
    assert rows["data"] == []
    assert message.startswith("## ")  # predicting needs no key


def test_retrain_runs_to_a_gate_decision_then_models_switch(app_server, app_url):
    client = gradio(app_url)
    job, decision, comparison, log_tail = client.predict(1, True, api_name="/retrain")
    assert "succeeded" in job, f"{job}\n{log_tail}"
    assert decision.startswith("**Promoted**")  # force=True skips the gate
    compared = {row[0]: row for row in comparison["data"]}
    assert "test/f1_macro" in compared
    assert all(cell not in ("", "—") for cell in compared["test/f1_macro"][1:3])

    status, table, history, _ = client.predict(api_name="/models")
    rows = table["data"]
    assert len(rows) >= 2
    current = [row[1] for row in rows if row[0]]
    assert current == [rows[0][1]]  # the retrained version is the newest and current
    assert history["data"]

    status, table, _, _ = client.predict(api_name="/rollback")
    assert "Rolled back" in status
    assert [row[1] for row in table["data"] if row[0]] == [app_server["version"]]
    assert (
        httpx.get(f"{app_server['url']}/status", timeout=10).json()["model"]["version"]
        == (app_server["version"])
    )

    status, table, _, _ = client.predict(rows[0][1], api_name="/promote")
    assert f"Promoted **{rows[0][1]}**" in status
    client.predict(app_server["version"], api_name="/promote")  # leave v1 current


def test_insights_show_the_current_models_report(app_server, app_url):
    out = gradio(app_url).predict(api_name="/insights")
    status, distribution, curves, confusion, per_label, uploads = out[:6]
    examples_md = out[6 : 6 + len(LABELS)]
    assert "Current model" in status
    assert distribution is not None and confusion is not None and curves is not None
    assert [row[0] for row in per_label["data"]] == list(LABELS)
    assert [row[0] for row in uploads["data"]] == list(LABELS)
    assert len(examples_md) == len(LABELS)
    for label, text in zip(LABELS, examples_md, strict=True):
        assert text.startswith(f"**{label}**") and "*log-mel*: energy centred near" in text
    assert all(plot_value(p) is not None for p in out[6 + len(LABELS) :])


# -- the client and the handlers, called directly (no app process, no browser) -----------


def test_client_tells_a_refusal_from_an_unreachable_server(app_server):
    from serving.client import ServerClient, ServerError, ServerUnreachable

    with pytest.raises(ServerError) as refused:
        ServerClient(app_server["url"], api_key="not-the-key").rollback()
    assert not isinstance(refused.value, ServerUnreachable)  # it answered: a refusal
    assert refused.value.status == 403
    assert "refused POST /models/rollback (403)" in str(refused.value)
    assert "FAULTSENSE_API_KEY" in str(refused.value)

    with pytest.raises(ServerUnreachable, match="is not reachable") as down:
        ServerClient(closed_port_url()).status()
    assert down.value.status is None


def test_handlers_answer_without_a_browser(app_server):
    from faultsense.config import plain
    from serving import handlers
    from serving.client import ServerClient
    from tests.fixtures.data import compose_config

    ctx = handlers.AppContext(
        client=ServerClient(app_server["url"], app_server["api_key"]),
        views=plain(compose_config("app").views),
        example_dirs=[],
    )
    clip = app_server["clips"]["normal"]
    message, probabilities, figure, _ = handlers.predict(ctx, str(clip))
    with open(clip, "rb") as f:
        direct = httpx.post(f"{app_server['url']}/predict", files={"file": f}, timeout=30).json()
    assert message.startswith(f"## {direct['label']}")
    assert probabilities == pytest.approx(direct["probabilities"], abs=1e-6)
    assert figure is not None

    current = httpx.get(f"{app_server['url']}/status", timeout=10).json()["model"]["version"]
    status, rows, _, _ = handlers.models_view(ctx, toast=False)
    assert status.startswith(f"Serving **{current}**")
    assert [row[1] for row in rows if row[0]] == [current]

    status, rows, _ = handlers.upload(ctx, [str(clip)], None)  # no label chosen
    assert "Choose the label" in status and rows == []


def _handler_context(app_server):
    from faultsense.config import plain
    from serving import handlers
    from serving.client import ServerClient
    from tests.fixtures.data import compose_config

    return handlers.AppContext(
        client=ServerClient(app_server["url"], app_server["api_key"]),
        views=plain(compose_config("app").views),
        example_dirs=[],
    )


def _lines(fig) -> dict[str, tuple[list[float], list[float]]]:
    """{legend label: (x, y)} of every line drawn in a matplotlib Figure."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in fig.axes
        for line in ax.lines
    }


def test_insights_figures_hold_the_servers_report(app_server):
    from serving import handlers
    from tests.fixtures.model import SMOKE_EPOCHS

    report = httpx.get(f"{app_server['url']}/insights", timeout=30).json()
    out = handlers.insights(_handler_context(app_server), toast=False)
    _, _, curves, confusion = out[:4]
    # The curves figure draws every curve of the report, one point per epoch, same values.
    drawn = _lines(curves)
    assert set(drawn) == set(report["curves"]) >= {"train/loss", "val/loss", "val/f1_macro"}
    for name, points in report["curves"].items():
        assert drawn[name] == ([p[0] for p in points], [p[1] for p in points]), name
    assert drawn["val/f1_macro"][0] == [float(e) for e in range(SMOKE_EPOCHS)]
    # The confusion figure is the report's matrix: same cells, every evaluated clip once.
    matrix = np.asarray(report["confusion_matrix"]["matrix"], dtype=float)
    shown = np.asarray(confusion.axes[0].images[0].get_array())
    np.testing.assert_array_equal(shown, matrix)
    assert shown.sum() == sum(report["dataset"][report["confusion_matrix"]["split"]].values())


def test_timeline_shows_the_servers_windows(app_server, tmp_path):
    from serving import handlers

    waves = [sf.read(app_server["clips"][label])[0] for label in LABELS]
    rate = sf.info(app_server["clips"][LABELS[0]]).samplerate
    long_clip = tmp_path / "shift.wav"
    sf.write(long_clip, np.concatenate(waves * 2), rate, subtype="PCM_16")
    with open(long_clip, "rb") as f:
        direct = httpx.post(f"{app_server['url']}/predict", files={"file": f}, timeout=30).json()
    _, _, _, timeline = handlers.predict(_handler_context(app_server), str(long_clip))
    drawn = _lines(timeline["value"])
    windows = direct["windows"]
    assert len(windows) > 1 and set(drawn) == set(direct["probabilities"])
    centres = [(w["start_s"] + w["end_s"]) / 2 for w in windows]
    for label, (xs, ys) in drawn.items():
        assert xs == pytest.approx(centres)
        assert ys == pytest.approx([w["probabilities"][label] for w in windows], abs=1e-6)
    # The top line in each window is the label the server gave that window.
    top = [max(drawn, key=lambda lab, i=i: drawn[lab][1][i]) for i in range(len(windows))]
    assert top == [w["label"] for w in windows]
