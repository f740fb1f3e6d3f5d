"""Load with change: sustained concurrent /predict while a retrain runs and promotes a new
version, and a rollback follows — no request fails, and every answer names a version
that was current while the request was in flight.

A thread of its own (not the event loop that runs the clients, which load can delay)
watches registry.json every 5 ms and dates each change of `current` to the poll before
it saw the change, the earliest moment it can have happened (the retrain job promotes on
its own; the rollback is timed around its HTTP call). A worker
looks for a new current version at most every `server.reload_check_s` before a batch, so
an answer may name the version that was current up to that long before it was sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from faultsense.registry import Registry
from tests import hostile

CONCURRENCY = 8
RELOAD_CHECK_S = float(
    yaml.safe_load(Path("configs/serve.yaml").read_text())["server"]["reload_check_s"]
)
# Allowed lag between a change of `current` and the workers serving it.
GRACE_S = RELOAD_CHECK_S + 0.25
RETRAIN_TIMEOUT_S = 300.0
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class Timeline:
    """When each version became current: [(t, version)], t from time.monotonic()."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, str | None]] = []

    def note(self, t: float, version: str | None) -> None:
        if not self.changes or self.changes[-1][1] != version:
            self.changes.append((t, version))

    def current_during(self, start: float, end: float) -> set[str | None]:
        """Versions that were current at some moment of [start, end]."""
        seen = set()
        for i, (t, version) in enumerate(self.changes):
            until = self.changes[i + 1][0] if i + 1 < len(self.changes) else float("inf")
            if t <= end and until >= start:
                seen.add(version)
        return seen


def watch_registry(root: Path, timeline: Timeline, stop: threading.Event) -> None:
    registry = Registry(root)
    last_poll = time.monotonic()
    while not stop.is_set():
        # registry.json is replaced atomically: a read never sees half a file.
        version = registry.current_version()
        now = time.monotonic()
        timeline.note(last_poll if timeline.changes else now, version)
        last_poll = now
        stop.wait(0.005)


async def predict_loop(
    client: httpx.AsyncClient, clips: list[bytes], results: list, stop: asyncio.Event, n: int
) -> None:
    i = n
    while not stop.is_set():
        i += CONCURRENCY
        sent = time.monotonic()
        try:
            resp = await client.post(
                "/predict", content=clips[i % len(clips)], headers={"Content-Type": "audio/wav"}
            )
            version = resp.json().get("version") if resp.status_code == 200 else None
            results.append((sent, time.monotonic(), resp.status_code, version, resp.text[:200]))
        except httpx.HTTPError as err:
            results.append((sent, time.monotonic(), None, None, repr(err)))


async def until(predicate, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"not reached within {timeout:g} s")


async def campaign(server) -> tuple[list, Timeline, dict[str, float]]:
    clips = [hostile.valid_wav(1.0, seed=s) for s in range(16)]
    timeline, results, marks = Timeline(), [], {}
    stop = asyncio.Event()
    watching = threading.Event()
    watcher = threading.Thread(
        target=watch_registry, args=(server.registry_dir, timeline, watching), daemon=True
    )
    watcher.start()
    limits = httpx.Limits(max_connections=CONCURRENCY + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        admin = {"X-API-Key": server.api_key}
        loops = [
            asyncio.create_task(predict_loop(client, clips, results, stop, n))
            for n in range(CONCURRENCY)
        ]
        await asyncio.sleep(2.0)
        marks["retrain_requested"] = time.monotonic()
        resp = await client.post("/retrain", json={"epochs": 1, "force": True}, headers=admin)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]

        async def job_done():
            job = (await client.get(f"/retrain/{job_id}")).json()
            return job if job["state"] in ("succeeded", "failed") else None

        job = await until(job_done, RETRAIN_TIMEOUT_S)
        assert job["state"] == "succeeded" and job["decision"]["promoted"], job
        marks["retrain_done"] = time.monotonic()
        new = job["decision"]["version"]
        # Serve the new version under load for a while before going back.
        await until(
            lambda: asyncio.sleep(0, result=any(r[3] == new for r in results[-CONCURRENCY:])),
            30,
            0.1,
        )
        await asyncio.sleep(2.0)
        marks["rollback_sent"] = time.monotonic()
        resp = await client.post("/models/rollback", json={}, headers=admin)
        marks["rollback_answered"] = time.monotonic()
        assert resp.status_code == 200 and resp.json()["current"] == "v1", resp.text
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*loops)
    watching.set()
    watcher.join()
    marks["new_version"] = new
    return results, timeline, marks


@pytest.mark.timeout(600)
def test_no_request_fails_and_every_answer_names_a_then_current_version(live_server):
    results, timeline, marks = asyncio.run(campaign(live_server))

    failures = [r for r in results if r[2] != 200]
    wrong = [
        r
        for r in results
        if r[2] == 200 and r[3] not in timeline.current_during(r[0] - GRACE_S, r[1])
    ]
    versions = Counter(r[3] for r in results if r[2] == 200)
    new = marks["new_version"]
    promoted_at = next(t for t, v in timeline.changes if v == new)
    hostile.record(
        "load",
        requests=len(results),
        failures=len(failures),
        wrong_version=len(wrong),
        versions=dict(versions),
        concurrency=CONCURRENCY,
        seconds=round(results[-1][1] - results[0][0], 1),
        promote_after_s=round(promoted_at - results[0][0], 2),
        rollback_after_s=round(marks["rollback_answered"] - results[0][0], 2),
    )
    assert not failures, f"{len(failures)} of {len(results)} failed, e.g. {failures[:3]}"
    assert not wrong, f"{len(wrong)} answers named a version not current then: {wrong[:3]}"
    # The switch really happened under load, both ways.
    # (a request sent before the rollback but answered after it may rightly name v1)
    after_promote = [
        r[3] for r in results if r[0] > promoted_at + GRACE_S and r[1] < marks["rollback_sent"]
    ]
    after_rollback = [r[3] for r in results if r[0] > marks["rollback_answered"] + GRACE_S]
    assert after_promote and set(after_promote) == {new}
    assert after_rollback and set(after_rollback) == {"v1"}
    assert versions["v1"] > 0 and versions[new] > 0
