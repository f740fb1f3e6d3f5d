"""The naive baseline for experiments/bench_serve.py: the common tutorial setup.

A plain FastAPI app that, per request, decodes the audio and runs the same model in eager
PyTorch, one request at a time (an `async def` endpoint that computes inline blocks the
event loop, so requests are served strictly one after another; no batching, default
torch threads, one uvicorn process).

    python experiments/naive_server.py --registry models --port 8001
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from faultsense.audio import decode, sliding_windows
from faultsense.errors import FaultSenseError
from faultsense.registry import Registry


def build_app(registry_dir: str, device: str = "cpu") -> FastAPI:
    bundle = Registry(registry_dir).current()
    net = bundle.load_net().to(device).eval()
    labels, rate, clip = bundle.labels, bundle.sample_rate, bundle.clip_samples
    app = FastAPI()

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            data = await (await request.form())["file"].read()
        else:
            data = await request.body()
        try:
            wave = decode(data, sample_rate=rate)
        except FaultSenseError as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        windows = sliding_windows(wave, clip, clip // 2)
        with torch.no_grad():
            logits = net(torch.from_numpy(windows).to(device))
            probs = torch.softmax(logits, dim=-1).mean(0).cpu().numpy()
        best = int(np.argmax(probs))
        return JSONResponse(
            {
                "label": labels[best],
                "confidence": float(probs[best]),
                "probabilities": {label: float(p) for label, p in zip(labels, probs, strict=True)},
                "version": bundle.version,
                "duration_s": len(wave) / rate,
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(
        build_app(args.registry, args.device),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
