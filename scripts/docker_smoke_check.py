"""Checks a running inference service (the container of scripts/docker_smoke.sh) from the host's venv.

    python scripts/docker_smoke_check.py URL BUNDLE IMAGE [--wait 600]

Waits for /health, then: /v1/models names BUNDLE's weights; the OpenAPI schema has the API's paths; IMAGE is
segmented over HTTP (raw multipart upload -> job -> PNG mask, and through RemotePredictor) and the masks agree
with this host's in-process Predictor on the same bundle; a corrupt upload gets a 4xx JSON error.
Exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def fail(message: str) -> None:
    print(f"docker smoke: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--wait", type=float, default=600.0, help="seconds to wait for /health")
    args = ap.parse_args()
    url = args.url.rstrip("/")

    start = time.monotonic()
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() - start > args.wait:
            fail(f"{url}/health did not answer 200 within {args.wait:.0f} s")
        time.sleep(1.0)
    print(f"docker smoke: /health ok after {time.monotonic() - start:.1f} s: {health.json()}")

    from medseg.bundle import load_bundle
    from medseg.inference import Predictor
    from medseg.io import read_scan
    from medseg.service.client import RemotePredictor

    bundle = load_bundle(args.bundle)
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["models"][0]
    if model["weights_hash"] != bundle.weights_hash:
        fail(f"service serves weights {model['weights_hash']}, bundle has {bundle.weights_hash}")
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    for p in ("/v1/segment", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/mask", "/health", "/v1/models"):
        if p not in paths:
            fail(f"OpenAPI schema lacks {p}")

    # Raw HTTP, as any client would do it.
    r = httpx.post(f"{url}/v1/segment", files={"file": (args.image.name, args.image.read_bytes())}, timeout=60,
                   headers={"X-Medseg-Client": "docker-smoke"})
    if r.status_code != 202:
        fail(f"POST /v1/segment -> {r.status_code} {r.text[:300]}")
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 300
    while (status := httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json())["status"] not in ("done", "failed"):
        if time.monotonic() > deadline:
            fail(f"job {job_id} not done after 300 s: {status}")
        time.sleep(0.2)
    if status["status"] != "done":
        fail(f"job failed: {status['error']}")
    png = httpx.get(f"{url}/v1/jobs/{job_id}/mask", params={"format": "png"}, timeout=30)
    served = np.asarray(Image.open(io.BytesIO(png.content)))

    scan = read_scan(args.image)
    local = Predictor.from_bundle(bundle, device="cpu").predict_scan(scan)
    if served.shape != local.mask.shape:
        fail(f"mask shape {served.shape} != image shape {local.mask.shape}")
    if not set(np.unique(served).tolist()) <= set(bundle.labels):
        fail(f"mask holds values {np.unique(served).tolist()} outside the labels {sorted(bundle.labels)}")
    foreground = float((served > 0).mean())
    if not 0.0 < foreground < 1.0:  # an all-background or all-foreground mask would prove little below
        fail(f"mask is {'empty' if foreground == 0 else 'all foreground'}")
    # Same torch build and weights, but another process and thread count: allow rare ties to flip.
    agreement = float((served == local.mask).mean())
    print(f"docker smoke: mask {served.shape}, foreground {foreground:.3f}, "
          f"agreement with in-process Predictor {agreement:.5f}")
    if agreement < 0.999:
        fail(f"container mask agrees with the in-process Predictor on only {agreement:.4f} of pixels")

    with RemotePredictor(url, poll_interval=0.2) as remote:
        pred = remote.predict_scan(scan)
    if float((pred.mask == local.mask).mean()) < 0.999:
        fail("RemotePredictor's mask differs from the in-process Predictor's")

    bad = httpx.post(f"{url}/v1/segment", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nnot really")}, timeout=30,
                     headers={"X-Medseg-Client": "docker-smoke"})
    if not (400 <= bad.status_code < 500 and "error" in bad.json()):
        fail(f"corrupt upload -> {bad.status_code} {bad.text[:200]}")
    print("docker smoke: service checks passed")


if __name__ == "__main__":
    main()
