#!/usr/bin/env bash
# A stand-in for the official python:3.11-slim-bookworm base image, for machines that can
# reach Debian's package mirrors but no container registry (this project's dev box):
# Debian bookworm (python 3.11) from debootstrap, imported into podman under the name the
# Dockerfile's FROM asks for. Needs root and Debian's `debootstrap` package.
#
#   bash experiments/container_base.sh [tag]        # default tag python:3.11-slim-bookworm
#   podman build --format docker -t faultsense:dev .
#   bash experiments/container_smoke.sh faultsense:dev
set -euo pipefail

TAG=${1:-python:3.11-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT

debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$ROOT" "$MIRROR"
# The official image's layout: python and pip on /usr/local/bin, pip allowed to install
# into the system interpreter (it is the image's only Python).
ln -sf /usr/bin/python3 "$ROOT/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$ROOT/usr/local/bin/pip"
rm -f "$ROOT"/usr/lib/python3.*/EXTERNALLY-MANAGED
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/*

tar -C "$ROOT" -c . | podman import \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$TAG"
podman --runtime "${PODMAN_RUNTIME:-runc}" --cgroup-manager=cgroupfs run --rm \
    --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 --network host "$TAG" \
    python -c 'import sys, ssl; print("base image ok:", sys.version.split()[0])'
