"""Serving benchmark: the FaultSense LitServe server vs a naive FastAPI baseline.

First the model-only limit: the Predictor alone (the serving fast path, batch 32) in one
process per core, one torch thread each, all at once: the clips/s no server on this box
can beat. Then it starts each server as a subprocess on 127.0.0.1 over the same registry, drives 5-s
16 kHz WAV requests (raw `audio/wav` bodies) at several concurrency levels from one
asyncio process (aiohttp: cheap per request, so the client leaves the cores to the
server), and prints req/s, p50/p95/p99 latency and failures per level, then the
throughput ratio, the load average at each level, and (the server runs with
`server.debug_timing=true`) where a FaultSense request's time went: the mean of each
phase of its `x-faultsense-timing` header (serving/worker.py PHASES), and the CPU each
kind of process spent per request (API servers, LitServe's Manager, inference workers,
and this load generator, from psutil). Asserts nothing.

    python experiments/bench_serve.py                      # the default model with an untrained head, temp registry
    python experiments/bench_serve.py --registry models    # the current trained model
    python experiments/bench_serve.py --server-arg server.max_batch_size=16 --skip-naive
    python experiments/bench_serve.py --accelerator cuda --concurrency 1 32 128
    python experiments/bench_serve.py --runtime torch onnx --skip-naive --seconds 5

`--runtime torch onnx` compares the worker's runtimes (`server.runtime`) in one run: the
model-only limit of each (interleaved, `--model-batch 1 32` for both batch sizes), then
the server on each.

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
from typing import Any

import numpy as np

from serving.process import stop_group

TIMING_HEADER = "x-faultsense-timing"
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
    spent: dict[str, float] = {}
    timed = 0
    failures = 0
    sent = 0
    stop_at = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "audio/wav"}

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal failures, sent, timed
            while sent < requests and time.perf_counter() < stop_at:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/predict", data=body, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                        timed += add_phases(spent, resp.headers.get(TIMING_HEADER))
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
        "load": os.getloadavg()[0],
        "phases": {k: v / timed for k, v in spent.items()} if timed else {},
    }


def add_phases(spent: dict[str, float], header: str | None) -> int:
    """Add one `x-faultsense-timing` header's phases (ms) to `spent`; 1 if it had any."""
    if not header:
        return 0
    for part in header.split(","):
        name, _, value = part.partition("=")
        spent[name] = spent.get(name, 0.0) + float(value)
    return 1


def measure(
    url: str,
    bodies: list[bytes],
    levels: list[int],
    requests: int,
    seconds: float,
    warm: bool = True,
    roles: dict[int, str] | None = None,
) -> list[dict]:
    """One `drive` per level (after a warm-up pass); with `roles` (pid -> role, see
    `process_roles`) each row also gets `cpu`: CPU ms per request spent by each role's
    processes during that level, the load generator (this process) as "client"."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    if warm and levels:
        asyncio.run(drive(url, bodies, max(levels), min(4 * max(levels), requests), seconds))
    rows = []
    for c in levels:
        before = cpu_seconds(roles or {})
        row = asyncio.run(drive(url, bodies, c, requests, seconds))
        after = cpu_seconds(roles or {})
        row["cpu"] = {
            role: 1000 * (after[role] - before.get(role, 0.0)) / max(1, row["requests"])
            for role in after
        }
        rows.append(row)
    return rows


def process_roles(proc: subprocess.Popen, port: int) -> dict[int, str]:
    """A server's processes by role: "main" (the one started), "manager" (LitServe's
    multiprocessing Manager, which carries its request queue: it listens on a
    `listener-*` unix socket), "api" (uvicorn processes, listening on `port`), "worker"
    (spawned inference workers), "other"."""
    import psutil

    roles = {proc.pid: "main"}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if "resource_tracker" in cmd:
                continue
            manager = any("listener-" in str(c.laddr) for c in child.net_connections("unix"))
            listening = any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in child.net_connections("tcp")
            )
        except psutil.Error:
            continue
        roles[child.pid] = (
            "manager" if manager
            else "api" if listening
            else "worker" if "multiprocessing" in cmd
            else "other"
        )  # fmt: skip
    return roles


def cpu_seconds(roles: dict[int, str]) -> dict[str, float]:
    """User + system CPU seconds so far of each role's processes, and of this process
    (the load generator) as "client"."""
    import psutil

    totals: dict[str, float] = {}
    for pid, role in [(os.getpid(), "client"), *roles.items()]:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            totals[role] = totals.get(role, 0.0) + t.user + t.system
    return totals


def cpu_table(rows: list[dict]) -> str:
    """CPU ms per request by process role, one row per concurrency level: where the box's
    cores went (at saturation, 1000 x cores / req/s in all)."""
    names = sorted({k for r in rows for k in r.get("cpu", {})})
    lines = [
        "| concurrency | " + " | ".join(names) + " | sum |",
        "|---:|" + "---:|" * (len(names) + 1),
    ]
    for r in rows:
        values = [r.get("cpu", {}).get(n, 0.0) for n in names]
        lines.append(
            f"| {r['concurrency']} | "
            + " | ".join(f"{v:.2f}" for v in values)
            + f" | {sum(values):.2f} |"
        )
    return "\n".join(lines)


def table(name: str, rows: list[dict]) -> str:
    lines = [
        f"| {name} | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | failures | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| | {r['concurrency']} | {r['requests']} | {r['req_s']:.1f} | {r['p50']:.1f} | "
            f"{r['p95']:.1f} | {r['p99']:.1f} | {r['failures']} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def phase_table(rows: list[dict]) -> str:
    """Mean ms per phase of a FaultSense request, one row per concurrency level."""
    names = list(next((r["phases"] for r in rows if r["phases"]), {}))
    if not names:
        return "(no x-faultsense-timing headers: server.debug_timing is off)"
    lines = [
        "| concurrency | " + " | ".join(names) + " | sum |",
        "|---:|" + "---:|" * (len(names) + 1),
    ]
    for r in rows:
        values = [r["phases"].get(n, 0.0) for n in names]
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {r['concurrency']} | {cells} | {sum(values):.2f} |")
    return "\n".join(lines)


# -- the model-only limit -----------------------------------------------------------------


def _model_worker(
    registry: str, device: str, seconds: float, barrier: Any, out: Any, runtime: str, batch: int
) -> None:
    """One process: the Predictor (one torch thread, `runtime`) on batches of `batch`
    decoded 5-s clips, timed for `seconds` once every process is warm; puts clips/s on `out`."""
    import torch

    from faultsense.audio import decode
    from faultsense.inference import Predictor

    torch.set_num_threads(1)
    cache = Path(registry).parent / "onnx-cache"
    predictor = Predictor.from_registry(registry, device=device, runtime=runtime, onnx_cache=cache)
    clips = [
        decode(b, sample_rate=predictor.sample_rate, max_seconds=None, name="bench")
        for b in wav_bodies(batch)
    ]
    for _ in range(3):
        predictor.predict(clips)
    barrier.wait()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.predict(clips)
        done += len(clips)
    out.put(done / (time.perf_counter() - started))


def model_only(
    registry: Path, device: str, processes: int, seconds: float, runtime: str, batch: int
) -> list[float]:
    """clips/s of each of `processes` Predictor processes running at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    work = (str(registry), device, seconds, barrier, out, runtime, batch)
    procs = [ctx.Process(target=_model_worker, args=work) for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [out.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join()
    return rates


# -- profiling ----------------------------------------------------------------------------


def profile(pids: dict[int, str], py_spy: str, seconds: float, work: Path) -> list:
    """Start `py-spy record` (raw collapsed stacks) on each pid; returns the running jobs."""
    jobs = []
    for pid, name in pids.items():
        raw = work / f"profile-{pid}.txt"
        argv = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
        argv += ["--format", "raw", "--nonblocking", "--output", str(raw)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        jobs.append((proc, raw, f"{name} (pid {pid})"))
    return jobs


def flame_summary(raw: Path, top: int = 12) -> str:
    """The frames with the largest share of a py-spy raw profile: self (the innermost
    frame of a sample) and inclusive (anywhere on its stack), as text lines."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; self share:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {frame}")
    lines.append("  inclusive share (project and LitServe frames):")
    mine = [
        kv
        for kv in incl.items()
        if any(k in kv[0] for k in ("serving/", "faultsense/", "litserve/"))
    ]
    for frame, n in sorted(mine, key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
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
    parser.add_argument(
        "--accelerator", default="cpu", help="server.accelerator (cpu, cuda, auto); the "
        "naive server and the model-only limit use the same device",
    )  # fmt: skip
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--naive-threads", type=int, default=0, help="torch threads in the baseline (0: default)"
    )
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-model", action="store_true", help="no model-only limit")
    parser.add_argument("--model-seconds", type=float, default=8.0)
    parser.add_argument(
        "--model-batch", type=int, nargs="+", default=[32], help="model-only batch sizes"
    )
    parser.add_argument(
        "--runtime", nargs="+", default=["onnx"], choices=["torch", "onnx"],
        help="server.runtime value(s) to measure, in this order (model-only and server)",
    )  # fmt: skip
    parser.add_argument(
        "--py-spy", help="path to py-spy: profile the server's processes during the last level"
    )
    return parser.parse_args()


def run_faultsense(
    args: argparse.Namespace, registry: Path, work: Path, env: dict, runtime: str
) -> list:
    """FaultSense on `runtime` at each level (debug timing on), then its batching counters
    and, with --py-spy, a profile of each process taken during the last level."""
    import httpx

    port = free_port()
    argv = [
        sys.executable, "-m", "serving.server", f"port={port}", f"paths.registry_dir={registry}",
        f"jobs_dir={work / 'jobs'}", f"server.accelerator={args.accelerator}",
        "server.debug_timing=true", f"server.runtime={runtime}", *args.server_arg,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    bodies = wav_bodies(8)
    with running(argv, url, env, work / "server.log") as proc:
        roles = process_roles(proc, port)
        rows = measure(url, bodies, args.concurrency[:-1], args.requests, args.seconds, roles=roles)
        # Every server process but the main one (it only supervises) is worth profiling.
        busy = {pid: role for pid, role in roles.items() if role != "main"}
        jobs = profile(busy, args.py_spy, args.seconds, work) if args.py_spy else []
        rows += measure(
            url, bodies, args.concurrency[-1:], args.requests, args.seconds, warm=False, roles=roles
        )
        for job, _, _ in jobs:
            job.wait(timeout=args.seconds + 60)
        serving = httpx.get(f"{url}/status", timeout=10).json()["serving"]
    print(table(f"FaultSense (LitServe, {runtime})", rows))
    print(f"server batching: {serving}\n")
    print("Where a FaultSense request's time goes (mean ms per phase, x-faultsense-timing):")
    print(phase_table(rows) + "\n")
    print("CPU ms per request by process (psutil; client = this load generator):")
    print(cpu_table(rows) + "\n")
    for _, raw, name in jobs:
        if raw.exists():
            print(f"py-spy, {name}, concurrency {args.concurrency[-1]}:")
            print(flame_summary(raw) + "\n")
    return rows


def run_naive(args: argparse.Namespace, registry: Path, work: Path, env: dict) -> list:
    port = free_port()
    device = "cuda" if args.accelerator == "cuda" else "cpu"
    argv = [
        sys.executable, str(ROOT / "experiments" / "naive_server.py"), "--registry", str(registry),
        "--port", str(port), "--threads", str(args.naive_threads), "--device", device,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(argv, url, env, work / "naive.log") as proc:
        roles = {proc.pid: "naive"}
        rows = measure(
            url, wav_bodies(8), args.concurrency, args.requests, args.seconds, roles=roles
        )
    print(table("naive FastAPI", rows))
    print("CPU ms per request by process:")
    print(cpu_table(rows) + "\n")
    return rows


def print_model_only(args: argparse.Namespace, registry: Path) -> dict[str, float]:
    """The model-only limit of each runtime and batch size, the runtimes interleaved;
    returns each runtime's clips/s at the largest batch size."""
    device = "cuda:0" if args.accelerator == "cuda" else "cpu"
    procs = 1 if device != "cpu" else os.cpu_count() or 1
    limits = {}
    for batch in sorted(args.model_batch):
        for runtime in args.runtime:
            rates = model_only(registry, device, procs, args.model_seconds, runtime, batch)
            limits[runtime] = sum(rates)
            print(
                f"model-only limit ({runtime}, batch {batch}, {procs} process(es) x 1 thread "
                f"on {device}, load {os.getloadavg()[0]:.1f}): {sum(rates):.0f} clips/s "
                f"({', '.join(f'{r:.0f}' for r in rates)})"
            )
    print()
    return limits


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="faultsense-bench-"))
    try:
        registry = (
            args.registry.resolve() if args.registry else build_untrained_registry(work / "models")
        )
        env = {**os.environ, "FAULTSENSE_ROOT": str(work), "PYTHONUNBUFFERED": "1"}
        env.pop("FAULTSENSE_API_KEY", None)
        limits = {} if args.skip_model else print_model_only(args, registry)
        ours = {}
        if not args.skip_server:
            ours = {rt: run_faultsense(args, registry, work, env, rt) for rt in args.runtime}
        for runtime, rows in ours.items():
            if runtime in limits and rows:
                top = rows[-1]
                print(
                    f"{runtime}, concurrency {top['concurrency']}: served "
                    f"{top['req_s']:.1f} req/s = {100 * top['req_s'] / limits[runtime]:.0f}% "
                    f"of the model-only limit ({limits[runtime]:.0f} clips/s)"
                )
        naive = [] if args.skip_naive else run_naive(args, registry, work, env)
        for runtime, rows in ours.items() if naive else ():
            print()
            for mine, base in zip(rows, naive, strict=True):
                print(
                    f"{runtime}, concurrency {mine['concurrency']:>3}: "
                    f"{mine['req_s'] / base['req_s']:.2f}x the naive baseline's throughput "
                    f"(p50 {mine['p50']:.1f} vs {base['p50']:.1f} ms)"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
