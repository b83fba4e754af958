# medseg for GPU (and CPU) servers: the inference service (port 8000) and the clinician web app (port 8501).
#
#   docker build -t medseg .
#   docker run --gpus all --shm-size 2g -p 8000:8000 -v /srv/models:/models:ro \
#       -e MEDSEG_BUNDLE=/models/my-model medseg                                  # inference service
#   docker run -p 8501:8501 -v /srv/models:/models:ro \
#       -e MEDSEG_HEALTH_URL=http://127.0.0.1:8501/_stcore/health medseg medseg app --models /models --host 0.0.0.0
#
# medseg is installed as README's `make setup` does (a venv, `pip install` of pyproject.toml's pinned
# dependencies, then medseg itself), without the dev extras. The PyPI torch wheel carries its CUDA libraries,
# so the same image runs on NVIDIA hosts (with the NVIDIA container toolkit) and on CPU-only hosts.
# Nothing is downloaded at run time: ImageNet encoder weights come from the offline packages, bundles are
# mounted at /models, or baked in by a two-line Dockerfile on top of this image:
#   FROM medseg
#   COPY --chown=medseg:medseg outputs/run/bundle /models/model
#
# Build arguments:
#   BASE_IMAGE           any Debian-like image; one without Python 3.11 gets Debian's (apt) first
#   PIP_FIND_LINKS_DIR   optional wheel folder (e.g. bind-mounted with `podman build -v /opt/wheels:/wheels:ro`)
#   PIP_LOCAL_INDEXES    optional extra simple indexes, space separated (e.g. file:///pypi/simple); on equal
#                        versions pip then takes the local file over PyPI's
#   PIP_CERT_FILE        optional CA bundle for pip at build time (a site whose proxy re-signs TLS), e.g.
#                        bind-mounted from the host; the image's own trust store is not changed
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG PIP_FIND_LINKS_DIR=""
ARG PIP_LOCAL_INDEXES=""
ARG PIP_CERT_FILE=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/medseg \
    PATH=/opt/medseg/bin:$PATH

# Python 3.11 from Debian when the base has none (e.g. a plain debootstrap'd bookworm); the official Python
# images already have it. ca-certificates for pip's HTTPS at build time.
RUN set -eux; \
    if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 --version; \
    python3 -m venv "$VIRTUAL_ENV"; \
    groupadd --system --gid 10001 medseg; \
    useradd --system --uid 10001 --gid medseg --home-dir /home/medseg --create-home --shell /usr/sbin/nologin medseg

WORKDIR /src

# Dependencies first (from pyproject.toml's pins), in their own layer: a code change does not re-install torch.
COPY pyproject.toml README.md ./
RUN set -eux; \
    pip_args=""; \
    if [ -n "$PIP_FIND_LINKS_DIR" ]; then pip_args="--find-links $PIP_FIND_LINKS_DIR"; fi; \
    if [ -n "$PIP_CERT_FILE" ]; then pip_args="$pip_args --cert $PIP_CERT_FILE"; fi; \
    for index in $PIP_LOCAL_INDEXES; do pip_args="$pip_args --extra-index-url $index"; done; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt; \
    pip install $pip_args --upgrade pip setuptools wheel; \
    pip install $pip_args -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

COPY medseg ./medseg
COPY app ./app
COPY configs ./configs
RUN set -eux; \
    pip install --no-deps --no-build-isolation --no-index .; \
    python -c "import medseg.cli, medseg.service.app, medseg.service.shared_jobs, fastapi, uvicorn, multipart, httpx, dramatiq, redis; print('medseg installed')"; \
    cd / && rm -rf /src; \
    install -d -o medseg -g medseg /models /results /home/medseg/.cache /tmp/medseg

USER medseg
WORKDIR /home/medseg
ENV HOME=/home/medseg \
    MPLCONFIGDIR=/tmp/medseg/matplotlib \
    HF_HUB_OFFLINE=1 \
    TORCH_HOME=/home/medseg/.cache/torch \
    MEDSEG_BUNDLE=/models/model \
    MEDSEG_SERVICE_WORK_DIR=/tmp/medseg/jobs \
    MEDSEG_HEALTH_URL=http://127.0.0.1:8000/health

EXPOSE 8000 8501

# The service's /health by default; the app's container points MEDSEG_HEALTH_URL at Streamlit's health page.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MEDSEG_HEALTH_URL'], timeout=4)"]

# Inference service; the model is MEDSEG_BUNDLE. For the app: `medseg app --models /models --host 0.0.0.0`.
CMD ["medseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
