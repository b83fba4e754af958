"""A fine-tuned version served beside the bundle with a shared queue (real Redis on loopback): the queue is per model,
so a version's jobs wait for a worker of that version and never reach the bundle's worker (which could only fail
them); the bundle's jobs still go to the bundle's worker. Workers are in-process ``SharedWorker`` objects on two tiny
bundles with different weights."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from medseg.inference import Predictor
from medseg.io import read_scan
from medseg.service.guards import CLIENT_HEADER
from medseg.service.settings import ServiceSettings
from medseg.service.shared_jobs import SharedWorker

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/service"))  # the service tests' helpers (not a package)
from service_support import build_tiny_bundle, running_service, wait_finished  # noqa: E402

HEADERS = {CLIENT_HEADER: "tests"}
VERSION = "tiny-v2"
JOB_WAIT_S = 300.0  # the shared 2-core machine is slow; nothing asserts on time except "still queued"


def _png(datasets_dir: Path) -> bytes:
    image = np.asarray(Image.open(sorted((datasets_dir / "dsb2018_nuclei" / "images").iterdir())[0]).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(image[:64, :64]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_a_versions_jobs_wait_for_its_own_worker(redis_url: str, datasets_dir: Path, tmp_path: Path,
                                                 stack: ExitStack) -> None:
    base = build_tiny_bundle(tmp_path / "base", seed=0)
    version = build_tiny_bundle(tmp_path / "versions" / VERSION, seed=1)  # same model name, other weights
    settings = ServiceSettings(device="cpu", broker=redis_url, results_dir=tmp_path / "results",
                               finetune_dir=tmp_path / "versions", worker_timeout_s=4.0)
    base_predictor = Predictor.from_bundle(base, device="cpu")
    version_predictor = Predictor.from_bundle(version, device="cpu")
    assert base_predictor.weights_hash != version_predictor.weights_hash

    def start_worker(predictor: Predictor, worker_id: str) -> SharedWorker:
        worker = SharedWorker(predictor, settings, worker_id=worker_id)
        worker.start()
        stack.callback(worker.stop, 30)
        return worker

    url = stack.enter_context(running_service(base, settings))
    version_url = f"{url}/versions/{VERSION}"
    start_worker(base_predictor, "base-worker")
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    health = httpx.get(f"{version_url}/health", timeout=30)  # loads the version's app on first use
    assert health.status_code == 503 and health.json()["workers"] == 0  # the base worker does not count

    data = _png(datasets_dir)
    (tmp_path / "in.png").write_bytes(data)
    scan = read_scan(tmp_path / "in.png")
    version_job = httpx.post(f"{version_url}/v1/segment", files={"file": ("a.png", data)}, headers=HEADERS, timeout=60)
    assert version_job.status_code == 202, version_job.text
    version_job = version_job.json()["job_id"]
    base_job = httpx.post(f"{url}/v1/segment", files={"file": ("a.png", data)}, headers=HEADERS, timeout=60)
    assert base_job.status_code == 202, base_job.text
    base_job = base_job.json()["job_id"]

    # The base worker, idle and polling, does the base job submitted after the version's, and leaves that one be.
    assert wait_finished(url, base_job, JOB_WAIT_S)["status"] == "done"
    time.sleep(1.0)  # ten more polls of the base worker
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    record = store.hgetall(f"medseg:job:{version_job}")
    assert record["status"] == "queued" and record["attempts"] == "0" and "worker" not in record, record
    assert httpx.get(f"{version_url}/health", timeout=10).json()["queue_depth"] == 1
    assert httpx.get(f"{url}/health", timeout=10).json()["queue_depth"] == 0

    start_worker(version_predictor, "version-worker")
    assert wait_finished(version_url, version_job, JOB_WAIT_S)["status"] == "done"
    health = httpx.get(f"{version_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["workers"] == 1 and health.json()["queue_depth"] == 0
    assert store.hget(f"medseg:job:{version_job}", "worker") == "version-worker"
    assert store.hget(f"medseg:job:{base_job}", "worker") == "base-worker"

    def mask(api: str, job_id: str) -> np.ndarray:
        r = httpx.get(f"{api}/v1/jobs/{job_id}/mask", params={"format": "png"}, timeout=30)
        assert r.status_code == 200
        return np.asarray(Image.open(io.BytesIO(r.content)))

    expected_version = version_predictor.predict_scan(scan).mask
    expected_base = base_predictor.predict_scan(scan).mask
    assert not np.array_equal(expected_version, expected_base)  # else the comparison below would prove nothing
    np.testing.assert_array_equal(mask(version_url, version_job), expected_version)
    np.testing.assert_array_equal(mask(url, base_job), expected_base)
