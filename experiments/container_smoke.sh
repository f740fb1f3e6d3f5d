#!/usr/bin/env bash
# Container smoke test (issue 15): train a first model into a models folder with the image,
# serve it from the image, then check /health and one /predict from the host; stops and
# removes everything it started.
#
#   podman build --format docker -t faultsense:dev .      # (or docker build)
#   bash experiments/container_smoke.sh [image]
#
# On this project's 2-core dev box the build that worked was
#   podman --runtime runc --cgroup-manager=cgroupfs build --isolation chroot --format docker -t faultsense:dev .
# (base image made locally with debootstrap + `podman import`, tagged python:3.11-slim-bookworm;
# 6.26 GB, ~4 min with downloads from PyPI; runc from Debian's `runc` package).
#
# On hosts where podman's default runtime cannot start containers (crun on a cgroup-v1
# "hybrid" host: "cgroups in hybrid mode not supported"; or no right to raise rlimits:
# "setrlimit RLIMIT_NOFILE: Operation not permitted"), this uses runc with the cgroupfs
# manager and lowered ulimits, and host networking (no port publishing needed).
# PODMAN_RUNTIME=crun to use podman's default runtime instead.
set -euo pipefail

IMAGE=${1:-faultsense:dev}
# The image's HEALTHCHECK asks port 8000 inside the container; with host networking that is
# the host's 8000, so it must be free.
PORT=8000
NAME=faultsense-smoke-$$
PODMAN=(podman --runtime "${PODMAN_RUNTIME:-runc}" --cgroup-manager=cgroupfs)
OPTS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --shm-size 1g --network host)
WORK=$(mktemp -d)
cleanup() {
    "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK" 2>/dev/null || podman unshare rm -rf "$WORK" 2>/dev/null || true
}
trap cleanup EXIT
if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
    echo "port $PORT is in use on this host; stop what listens there first" >&2
    exit 1
fi
for d in models data logs; do
    mkdir -p "$WORK/$d"
    chmod 777 "$WORK/$d"  # the image runs as uid 10001
done
VOLUMES=(-v "$WORK/models:/srv/faultsense/models" -v "$WORK/data:/srv/faultsense/data"
    -v "$WORK/logs:/srv/faultsense/logs")

echo "== train a first model in the container (experiment=demo, synthetic data)"
"${PODMAN[@]}" run --rm "${OPTS[@]}" "${VOLUMES[@]}" "$IMAGE" \
    faultsense-train experiment=demo register=true logger=none trainer.enable_progress_bar=false

echo "== serve it on 127.0.0.1:$PORT"
"${PODMAN[@]}" run -d --name "$NAME" "${OPTS[@]}" "${VOLUMES[@]}" -e FAULTSENSE_API_KEY=smoke \
    "$IMAGE" faultsense-serve host=127.0.0.1 port="$PORT" >/dev/null
for _ in $(seq 1 180); do
    if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    if [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$NAME")" != "true" ]; then
        "${PODMAN[@]}" logs "$NAME" | tail -30
        echo "the server container exited" >&2
        exit 1
    fi
    sleep 1
done
echo "GET /health: $(curl -fsS "http://127.0.0.1:$PORT/health")"
echo "container user: $("${PODMAN[@]}" exec "$NAME" id -un)"
# The image's HEALTHCHECK, run once (no systemd here to schedule it).
"${PODMAN[@]}" healthcheck run "$NAME"
echo "HEALTHCHECK: healthy"

WAV="$WORK/tone.wav"
python3 - "$WAV" <<'EOF'
import math, struct, sys, wave
rate, seconds = 16000, 2.0
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
    w.writeframes(b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
        for i in range(int(rate * seconds))
    ))
EOF
echo "POST /predict:"
curl -fsS --data-binary "@$WAV" -H 'Content-Type: audio/wav' "http://127.0.0.1:$PORT/predict" \
    | python3 -c 'import json, sys; r = json.load(sys.stdin); print({k: r[k] for k in ("label", "confidence", "version")})'
echo "POST /upload without the key: HTTP $(curl -s -o /dev/null -w '%{http_code}' \
    -F label=normal -F "files=@$WAV" "http://127.0.0.1:$PORT/upload")"
echo "container smoke test passed"
