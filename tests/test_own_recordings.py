"""Your own recordings, your own labels, end to end (issue 14's "Must show"): generated
audio in the folder layout with three labels that are not the fault labels, chunks
`<rec>_<n>` of several recordings per label, taken through the commands a user runs:
`faultsense-data` -> `faultsense-cv` over group folds (no recording in two splits) ->
`faultsense-train register=true` -> the server (`/predict`, `/upload`) -> the app in
headless Chromium -> `/retrain` with no override, which must take its data (folder
kind, same source, same folds) from the served model's bundle.

One test, as one user session: each stage needs what the one before it made. About two
minutes on two cores (four Python processes start, three short trainings).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from faultsense.data.manifest import read_manifest
from faultsense.registry import Registry
from faultsense.taxonomy import LABELS as FAULT_LABELS
from tests.fixtures.server import LiveServer, start_server
from tests.test_app import running_app
from tests.test_app_browser import SCREENSHOTS, page  # noqa: F401  (fixture)
from tests.test_folder_source import GROUP_BY, OWN_LABELS, sound, write_recordings

REPO = Path(__file__).resolve().parents[1]
RECORDINGS, CHUNKS = 3, 2  # per label: one recording per fold of 3
WINDOWS = 2  # 0.5 s clips per 1 s chunk
RETRAIN_TIMEOUT_S = 300
CLI_TIMEOUT_S = 600

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def data_args(source: Path, root: Path) -> list[str]:
    """The README's data overrides (group_by quoted for Hydra, as on a shell line), 3 group
    folds, 1 s chunks cut into 0.5 s clips, everything written under `root`."""
    return [
        "data=folder",
        f"data.source={source}",
        f'data.group_by="{GROUP_BY}"',
        "data.num_folds=3",
        "data.test_fold=3",
        "data.clip_seconds=0.5",
        "data.num_workers=0",
        "data.progress=false",
        f"paths.root_dir={root}",
    ]


def quiet_training(epochs: int) -> list[str]:
    """The smoke experiment (tiny CNN) for `epochs`, without loggers or progress bars."""
    return [
        "experiment=smoke",
        "logger=none",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"trainer.max_epochs={epochs}",
    ]


def cli(module: str, *args: str) -> str:
    """Run `python -m <module> args` (an entry point) from the repo; its stdout, or a
    failure showing the end of its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTSENSE_")}
    env["WANDB_MODE"] = "disabled"
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert out.returncode == 0, f"{module} failed:\n" + (out.stdout + out.stderr)[-4000:]
    return out.stdout


def prepare(source: Path, root: Path) -> int:
    """`faultsense-data`: the manifest keeps each recording's chunks in one fold, and the
    split table counts each recording once; returns the number of training clips."""
    out = cli("faultsense.prepare", *data_args(source, root), "data.val_fold=2")
    rows = read_manifest(root / "data" / "manifests" / "folder.csv")
    assert len(rows) == len(OWN_LABELS) * RECORDINGS * CHUNKS * WINDOWS
    folds = defaultdict(set)
    for row in rows:
        folds[row.recording].add(row.fold)
    expected = {f"{label[:4]}{r}" for label in OWN_LABELS for r in range(RECORDINGS)}
    assert set(folds) == expected, sorted(folds)  # group_by named the recordings
    assert all(len(f) == 1 for f in folds.values()), dict(folds)
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    for label in OWN_LABELS:  # "clips (recordings)" in train, val, test
        recordings = [int(cell.strip("()")) for cell in table[label][1::2]]
        assert recordings == [1, 1, 1], out  # a recording in two splits would count twice
    assert "in two splits" not in out and "warning" not in out, out
    return int(re.search(r"splits: train (\d+),", out).group(1))


def cross_validate(source: Path, root: Path) -> None:
    """`faultsense-cv` rotates val over group folds 1 and 2 (3 is test), each fold a
    training of the three labels."""
    sweep = root / "cv"
    cli("faultsense.cv", *data_args(source, root), *quiet_training(1), f"hydra.sweep.dir={sweep}")
    (entry,) = json.loads((sweep / "cv.json").read_text())["models"].values()
    assert entry["folds"] == [1, 2] and "test/f1_macro" in entry["metrics"]
    for job in entry["jobs"]:
        summary = json.loads((Path(job) / "metrics.json").read_text())
        assert summary["labels"] == sorted(OWN_LABELS) and summary["test_fold"] == 3


def train_and_register(source: Path, root: Path) -> Path:
    """`faultsense-train register=true`: v1 of a new registry, with the three labels."""
    args = [*quiet_training(2), *data_args(source, root), "data.val_fold=2", "register=true"]
    cli("faultsense.train", *args)
    registry = root / "models"
    v1 = Registry(registry).get("v1")
    assert Registry(registry).current_version() == "v1" and v1.labels == sorted(OWN_LABELS)
    return registry


def clip(path: Path, label: str, seed: int) -> Path:
    """A new 1 s chunk of `label`'s sound (not one the model trained on)."""
    sf.write(path, sound(label, 1.0, 16_000, np.random.default_rng(seed)), 16_000)
    return path


def check_predict(client: httpx.Client, tmp_path: Path) -> None:
    with open(clip(tmp_path / "pump.wav", "idle", 10), "rb") as f:
        body = client.post("/predict", files={"file": f}).json()
    assert body["version"] == "v1" and body["label"] in OWN_LABELS, body
    assert sorted(body["probabilities"]) == sorted(OWN_LABELS), body


def check_app(server: LiveServer, page, tmp_path: Path) -> None:  # noqa: F811
    """The app in Chromium names the model's three labels and predicts one of them."""
    with running_app(server.url, tmp_path / "app", api_key=server.api_key) as url:
        page.goto(url, wait_until="domcontentloaded")
        labels_line = page.locator("#model-labels").filter(has_text="tells apart")
        labels_line.wait_for()
        assert all(label in labels_line.inner_text() for label in OWN_LABELS)
        page.locator("input[type=file]").first.set_input_files(
            str(clip(tmp_path / "belt.wav", "bearing_wear", 11))
        )
        page.locator("audio[data-testid^='audio-player']").wait_for(state="attached")
        page.locator("#predict-button").click()
        prediction = page.locator("#prediction").filter(has_text=re.compile("confidence"))
        prediction.wait_for()
        assert prediction.inner_text().split()[0] in OWN_LABELS, prediction.inner_text()
        probabilities = page.locator("#probabilities").inner_text()
        assert all(label in probabilities for label in OWN_LABELS), probabilities
        shown = page.locator("body").inner_text()
        assert not any(label in shown for label in FAULT_LABELS), shown
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / "own_labels.png", full_page=True)


def post_upload(client: httpx.Client, path: Path, label: str) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post(
            "/upload", data={"label": label}, files=[("files", (path.name, f, "audio/wav"))]
        )


def check_upload(client: httpx.Client, tmp_path: Path) -> None:
    """One of the model's labels is stored; a fault label is a 422 naming the three."""
    stored = post_upload(client, clip(tmp_path / "cav.wav", "cavitation", 12), "cavitation")
    assert stored.status_code == 200, stored.text
    assert stored.json()["results"][0]["status"] == "stored"
    refused = post_upload(
        client, clip(tmp_path / "saw.wav", "bearing_wear", 13), "mechanical_fault"
    )
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert "'mechanical_fault'" in error and all(label in error for label in OWN_LABELS), error


def retrain(client: httpx.Client) -> dict:
    """POST /retrain (no override: the server was started with none), polled to the end."""
    started = client.post("/retrain", json={"epochs": 1})
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    deadline = time.monotonic() + RETRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/retrain/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            assert job["state"] == "succeeded", f"{job.get('error')}\n" + "\n".join(job["log_tail"])
            return job
        time.sleep(1.0)
    pytest.fail(f"retrain job {job_id} did not finish in {RETRAIN_TIMEOUT_S} s")


def check_retrain_used_the_bundles_data(
    job: dict, registry_dir: Path, source: Path, train_clips: int
) -> None:
    """The job fine-tuned on the folder the model came from (its folds too), plus the
    upload, and the new bundle records that data for the next retrain."""
    decision = job["decision"]
    assert decision["data"] == {"from": "bundle", "kind": "folder", "source": str(source)}
    # The base training split prepared above (fold 1's windows) plus the one upload.
    assert decision["train_clips"] == train_clips + 1, decision
    assert decision["uploads"] == {"cavitation": 1} and decision["split"] == "test"
    v2 = Registry(registry_dir).get(decision["version"])
    data = v2.meta["config"]["data"]
    assert (data["kind"], data["source"], data["group_by"]) == ("folder", str(source), GROUP_BY)
    assert (data["num_folds"], data["val_fold"], data["test_fold"]) == (3, 2, 3)
    assert v2.labels == sorted(OWN_LABELS) and v2.meta["parent_version"] == "v1"


@pytest.mark.timeout(900)
def test_own_recordings_from_folder_to_served_model_and_retrain(tmp_path, page):  # noqa: F811
    source = write_recordings(tmp_path / "recordings", recordings=RECORDINGS, chunks=CHUNKS)
    work = tmp_path / "work"
    train_clips = prepare(source, work)
    cross_validate(source, work)
    registry = train_and_register(source, work)

    with (
        start_server(tmp_path / "server", registry, retrain_overrides=()) as server,
        httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as client,
    ):
        check_predict(client, tmp_path)
        check_app(server, page, tmp_path)
        check_upload(client, tmp_path)
        job = retrain(client)
    check_retrain_used_the_bundles_data(job, server.registry_dir, source, train_clips)
