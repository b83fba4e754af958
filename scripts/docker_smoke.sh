#!/usr/bin/env bash
# Container smoke test (make docker-smoke; CI): build the Dockerfile on a debootstrap'd Debian bookworm base and
# run the inference service inside the built image, with Debian's podman/buildah/debootstrap and no registry.
#
#   1. debootstrap a minimal bookworm  -> `podman import` as localhost/medseg-smoke-base:bookworm
#   2. train a tiny bundle with the host's .venv (2 epochs, 8 cases, 128² patches), during the build
#   3. podman build --isolation chroot --build-arg BASE_IMAGE=<that image>  (the Dockerfile installs python3)
#   4. buildah run --isolation chroot: `medseg serve` in the image, the bundle mounted at /models/model
#   5. scripts/docker_smoke_check.py: /health, /v1/models, OpenAPI, a real DSB2018 image segmented over HTTP and
#      compared with the in-process Predictor, a corrupt upload refused
#   6. tear down: stop the service, remove the working container, images (unless MEDSEG_SMOKE_KEEP=1), temp files
#
# Needs root (debootstrap, podman storage) and network access to a Debian mirror and PyPI. Local package
# mirrors, when this machine has them (/opt/pypi, /opt/pypi-more, /opt/wheels), are bind-mounted into the
# build so torch's multi-GB wheels come from disk (see Dockerfile: PIP_LOCAL_INDEXES, PIP_FIND_LINKS_DIR).
# `podman run` is not used: it fails on rlimits on some CI machines; `buildah run --isolation chroot` works.
#
# Environment: MEDSEG_SMOKE_KEEP=1 keeps the base and built images (a rerun then skips debootstrap and, when
# pyproject.toml did not change, the dependency layer); DEBIAN_MIRROR (default http://deb.debian.org/debian);
# MEDSEG_DATASETS (default ../shared/datasets).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
T0=$(date +%s)
phase() { echo "docker smoke: [$(( $(date +%s) - T0 )) s] $*"; }

BASE_IMAGE=localhost/medseg-smoke-base:bookworm
IMAGE=localhost/medseg:smoke
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DATASETS=${MEDSEG_DATASETS:-$REPO/../shared/datasets}
PY=$REPO/.venv/bin/python
KEEP=${MEDSEG_SMOKE_KEEP:-0}

if [ "$(id -u)" != 0 ]; then
    echo "docker smoke: needs root (debootstrap and podman's storage); run it as root or via sudo" >&2
    exit 2
fi
missing=""
for tool in podman buildah debootstrap; do command -v "$tool" >/dev/null || missing="$missing $tool"; done
if [ -n "$missing" ]; then
    phase "installing$missing (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap fuse-overlayfs uidmap >/dev/null
fi
[ -x "$PY" ] || { echo "docker smoke: $PY missing; run make setup first" >&2; exit 2; }
images=("$DATASETS"/dsb2018_nuclei/images/*.png)
IMAGE_FILE=${images[38]:-}  # a fluorescence image on which the tiny model finds nuclei and background
[ -f "$IMAGE_FILE" ] || { echo "docker smoke: no DSB2018 images under $DATASETS" >&2; exit 2; }

WORK=$(mktemp -d /var/tmp/medseg-smoke.XXXXXX)
CONTAINER=""
SERVICE_PID=""
TRAIN_PID=""
cleanup() {
    status=$?
    [ -n "$TRAIN_PID" ] && kill "$TRAIN_PID" 2>/dev/null || true
    if [ -n "$SERVICE_PID" ] && kill -0 "$SERVICE_PID" 2>/dev/null; then
        kill -INT -- "-$SERVICE_PID" 2>/dev/null || true   # its own process group (setsid): buildah + medseg
        for _ in $(seq 1 30); do kill -0 "$SERVICE_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVICE_PID" 2>/dev/null || true
    fi
    [ -n "$CONTAINER" ] && buildah rm "$CONTAINER" >/dev/null 2>&1 || true
    if [ "$KEEP" != 1 ]; then
        podman rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
        podman image prune -f >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    phase "torn down (exit $status); total $(( $(date +%s) - T0 )) s"
}
trap cleanup EXIT

# 1. base image --------------------------------------------------------------------------------------------
if podman image exists "$BASE_IMAGE"; then
    phase "reusing $BASE_IMAGE"
else
    phase "debootstrap bookworm (minbase) from $MIRROR"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
    tar -C "$WORK/rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    phase "imported $BASE_IMAGE"
fi

# 2. a tiny bundle, trained while the image builds -----------------------------------------------------------
phase "training a tiny bundle (in the background)"
OMP_NUM_THREADS=1 "$REPO/.venv/bin/medseg" train configs/experiments/demo_nuclei.yaml --out "$WORK/train" \
    --epochs 2 --limit-cases 8 --set 'data.patch_size=[128,128]' --set train.batch_size=4 \
    --set train.samples_per_epoch=16 --set 'inference.tile_size=[128,128]' >"$WORK/train.log" 2>&1 &
TRAIN_PID=$!

# 3. build -------------------------------------------------------------------------------------------------
# --format docker keeps HEALTHCHECK (OCI images have none); --force-rm leaves no build containers on failure.
build_args=(--isolation chroot --format docker --force-rm --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE")
indexes=""
for mirror in /opt/pypi /opt/pypi-more; do
    if [ -d "$mirror/simple" ]; then
        name=$(basename "$mirror")
        build_args+=(-v "$mirror:/$name:ro")
        indexes="$indexes file:///$name/simple"
    fi
done
[ -n "$indexes" ] && build_args+=(--build-arg "PIP_LOCAL_INDEXES=${indexes# }")
if [ -d /opt/wheels ]; then build_args+=(-v /opt/wheels:/wheels:ro --build-arg PIP_FIND_LINKS_DIR=/wheels); fi
# A machine whose HTTPS goes through a re-signing proxy trusts its CA in the host bundle: pip in the build
# needs the same bundle (build time only; the image's trust store stays Debian's).
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$HOST_CA" ]; then build_args+=(-v "$HOST_CA:/run/host-ca.crt:ro" --build-arg PIP_CERT_FILE=/run/host-ca.crt); fi
phase "podman build ${build_args[*]}"
podman build "${build_args[@]}" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
podman image exists "$IMAGE" || { tail -n 40 "$WORK/build.log"; echo "docker smoke: no image built" >&2; exit 1; }
phase "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}'))"

wait "$TRAIN_PID" || { tail -n 30 "$WORK/train.log"; echo "docker smoke: training the bundle failed" >&2; exit 1; }
chmod -R a+rX "$WORK/train/bundle"
chmod a+x "$WORK" "$WORK/train"
phase "bundle trained"

# 4. run the service in the image --------------------------------------------------------------------------
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONTAINER=$(buildah from --pull=never --name "medseg-smoke-$$" "$IMAGE")
phase "buildah run: medseg serve on 127.0.0.1:$PORT"
# chroot isolation shares the host's network, so the service is reached on loopback; setsid gives it its own
# process group, which the cleanup stops as a whole.
setsid buildah run --isolation chroot -v "$WORK/train/bundle:/models/model:ro" "$CONTAINER" -- \
    medseg serve --host 127.0.0.1 --port "$PORT" --device cpu >"$WORK/service.log" 2>&1 &
SERVICE_PID=$!

# 5. check it ----------------------------------------------------------------------------------------------
if ! OMP_NUM_THREADS=2 "$PY" scripts/docker_smoke_check.py "http://127.0.0.1:$PORT" "$WORK/train/bundle" \
        "$IMAGE_FILE" --wait 300; then
    echo "--- service log ---"; tail -n 40 "$WORK/service.log"
    exit 1
fi
if grep -q "$(basename "$IMAGE_FILE")" "$WORK/service.log"; then
    echo "docker smoke: FAILED: the service logged the upload's file name" >&2
    exit 1
fi
phase "PASSED"
