"""Serving benchmark: the FaultSense LitServe server vs a naive FastAPI baseline.

Starts each server as a subprocess on 127.0.0.1 over the same registry, drives 5-s
16 kHz WAV requests (raw `audio/wav` bodies) at several concurrency levels from one
asyncio process (aiohttp: cheap per request, so the client leaves the cores to the
server), and prints req/s, p50/p95/p99 latency and failures per level, then the
throughput ratio. Asserts nothing.

    python experiments/bench_serve.py                      # untrained default CNN, temp registry
    python experiments/bench_serve.py --registry models    # the current trained model
    python experiments/bench_serve.py --server-arg server.max_batch_size=16 --skip-naive

Without --registry a default-config (untrained) FaultNet is registered in a temp
registry: serving cost does not depend on the weights, and the bench then runs anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serving.process import stop_group

ROOT = Path(__file__).resolve().parent.parent


def build_untrained_registry(root: Path) -> Path:
    """Register the default-config model (configs/train.yaml defaults), untrained, as v1."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from faultsense.models.classifier import FaultClassifier
    from faultsense.registry import Registry
    from faultsense.taxonomy import LABELS

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=["logger=none"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    rate = int(cfg.data.sample_rate)
    clip = int(round(float(cfg.data.clip_seconds) * rate))
    module = FaultClassifier(
        **model_cfg,
        num_classes=len(LABELS),
        labels=list(LABELS),
        sample_rate=rate,
        clip_samples=clip,
    )
    meta = {
        "net_spec": module.net_spec(),
        "labels": list(LABELS),
        "sample_rate": rate,
        "clip_samples": clip,
        "metrics": {},
        "note": "untrained default-config model for experiments/bench_serve.py",
    }
    Registry(root).register(module.net.eval(), meta, promote=True, reason="benchmark")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bodies(n: int, seconds: float = 5.0, rate: int = 16_000) -> list[bytes]:
    from faultsense.audio import to_wav_bytes

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    bodies = []
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (100 + 50 * i) * t)
        wave = (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        bodies.append(to_wav_bytes(wave, rate))
    return bodies


@contextlib.contextmanager
def running(argv: list[str], url: str, env: dict[str, str], log_path: Path, timeout: float = 300):
    """Run a server subprocess (own process group) until /health answers; always stop it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:3]} exited early:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:3]} not healthy after {timeout} s")
            time.sleep(0.5)
        yield proc
    finally:
        stop_group(proc)


async def drive(
    url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float
) -> dict:
    """Closed-loop load: `concurrency` clients each send a request after the last answer."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    sent = 0
    stop_at = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "audio/wav"}

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal failures, sent
            while sent < requests and time.perf_counter() < stop_at:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/predict", data=body, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - t0)
                failures += not ok

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "req_s": len(latencies) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "failures": failures,
    }


def measure(
    url: str, bodies: list[bytes], levels: list[int], requests: int, seconds: float
) -> list[dict]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(drive(url, bodies, max(levels), min(4 * max(levels), requests), seconds))  # warm-up
    return [asyncio.run(drive(url, bodies, c, requests, seconds)) for c in levels]


def table(name: str, rows: list[dict]) -> str:
    lines = [
        f"| {name} | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| | {r['concurrency']} | {r['requests']} | {r['req_s']:.1f} | {r['p50']:.1f} | "
            f"{r['p95']:.1f} | {r['p99']:.1f} | {r['failures']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--registry", type=Path, help="registry dir (default: temp, untrained model)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000, help="max requests per level")
    parser.add_argument("--seconds", type=float, default=15.0, help="max seconds per level")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="Hydra override for faultsense-serve"
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--naive-threads", type=int, default=0, help="torch threads in the baseline (0: default)"
    )
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="faultsense-bench-"))
    try:
        registry = (
            args.registry.resolve() if args.registry else build_untrained_registry(work / "models")
        )
        bodies = wav_bodies(8)
        env = {**os.environ, "FAULTSENSE_ROOT": str(work), "PYTHONUNBUFFERED": "1"}
        env.pop("FAULTSENSE_API_KEY", None)
        results: dict[str, list[dict]] = {}

        if not args.skip_server:
            port = free_port()
            argv = [
                sys.executable, "-m", "serving.server", f"port={port}",
                f"paths.registry_dir={registry}", f"jobs_dir={work / 'jobs'}", *args.server_arg,
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            with running(argv, url, env, work / "server.log"):
                results["litserve"] = measure(
                    url, bodies, args.concurrency, args.requests, args.seconds
                )
                import httpx

                serving = httpx.get(f"{url}/status", timeout=10).json()["serving"]
            print(table("FaultSense (LitServe)", results["litserve"]))
            print(f"server batching: {serving}\n")

        if not args.skip_naive:
            port = free_port()
            argv = [
                sys.executable, str(ROOT / "experiments" / "naive_server.py"),
                "--registry", str(registry), "--port", str(port), "--threads", str(args.naive_threads),
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            with running(argv, url, env, work / "naive.log"):
                results["naive"] = measure(
                    url, bodies, args.concurrency, args.requests, args.seconds
                )
            print(table("naive FastAPI", results["naive"]))

        if "litserve" in results and "naive" in results:
            print()
            for ours, base in zip(results["litserve"], results["naive"], strict=True):
                print(
                    f"concurrency {ours['concurrency']:>3}: {ours['req_s'] / base['req_s']:.2f}x "
                    f"the naive baseline's throughput"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
