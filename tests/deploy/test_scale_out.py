"""Scale-out serving on real servers on loopback: Redis (the broker), 2 API replicas (`medseg serve --broker`) and
2 GPU-style workers (`medseg worker`), each its own process, sharing one results folder.

* 40 jobs submitted across both replicas are all answered by either replica, their masks equal the in-process
  Predictor's, and both workers took jobs.
* A worker SIGKILLed mid-job (a PACS job: the series retrieved from a real Orthanc, the SEG stored back): its job
  comes back through the broker and completes on the other worker (attempt 2), and Orthanc holds exactly one SEG
  for it.
* With no worker alive, the shared queue fills: 429 with Retry-After, /health 503 with queue depth and 0 workers;
  a worker that starts then drains it.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import redis
import torch
from PIL import Image

from medseg.inference import Predictor
from medseg.io import read_scan

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/pacs"))  # the Orthanc fixture of the PACS tests (not a package)
sys.path.insert(0, str(REPO / "tests/service"))  # the service tests' helpers (not a package)
from service_support import wait_finished  # noqa: E402

CLIENT = {"X-Medseg-Client": "tests"}
WORKER_TIMEOUT_S = 4.0  # a worker silent this long is dead (short, so the test sees the requeue quickly)
JOB_WAIT_S = 600.0  # the shared 2-core machine is slow; nothing here asserts on time


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bundle(out: Path) -> Path:
    """An untrained UNet with the offline ImageNet Lite0 encoder: deterministic, non-trivial masks."""
    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.engine.train import preprocessing_record
    from medseg.models import build_model

    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml",
                      ["inference.tile_size=[128, 128]", "data.patch_size=[64, 64]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    return save_bundle(out, cfg, {"model": model.state_dict()}, preprocessing_record(cfg), "# scale-out test\n")


@dataclass
class Cluster:
    bundle: Path
    results: Path
    broker: str
    logs: Path
    endpoints: Path | None = None  # the DICOMweb endpoints file API replicas and workers read
    apis: list[str] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MEDSEG_SERVICE_WORKER_TIMEOUT_S": str(WORKER_TIMEOUT_S),
               "MEDSEG_SERVICE_BROKER": self.broker, "MEDSEG_SERVICE_RESULTS_DIR": str(self.results),
               "MEDSEG_SERVICE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
        if self.endpoints is not None:
            env["MEDSEG_DICOMWEB_ENDPOINTS"] = str(self.endpoints)
        return env

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - the process writes it until killed
        proc = subprocess.Popen([sys.executable, "-m", "medseg.cli", *args], env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        log.close()  # the child holds its own copy
        self.procs.append(proc)
        return proc

    def start_worker(self) -> subprocess.Popen:
        proc = self._start(["worker", str(self.bundle)], f"worker{len(self.workers)}")
        self.workers.append(proc)
        return proc

    def start_api(self, max_queued: int = 64) -> str:
        port = _free_port()
        self._start(["serve", str(self.bundle), "--port", str(port), "--max-queued", str(max_queued)],
                    f"api{len(self.apis)}")
        url = f"http://127.0.0.1:{port}"
        self.apis.append(url)
        return url

    def wait_ready(self, url: str, workers: int, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/health", timeout=10).json()
                if health.get("workers", -1) >= workers:
                    return health
            except (httpx.TransportError, ValueError):
                pass
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"a process exited early:\n{self.log_tail()}")
            time.sleep(0.5)
        raise AssertionError(f"{url} not ready with {workers} worker(s):\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.iterdir()))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(30)


@pytest.fixture(scope="module")
def pacs(datasets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Orthanc with the shared CT series (tests/pacs/orthanc_server.py)."""
    from orthanc_server import running_orthanc

    with running_orthanc(datasets_dir, tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(redis_url: str, pacs: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from orthanc_server import write_endpoints_yaml

    root = tmp_path_factory.mktemp("scale-out")
    (root / "logs").mkdir()
    c = Cluster(build_bundle(root / "bundle"), root / "results", redis_url, root / "logs",
                endpoints=write_endpoints_yaml(root / "endpoints.yaml", pacs))
    try:
        c.start_worker()
        c.start_worker()
        c.start_api()
        c.start_api()
        for url in c.apis:
            c.wait_ready(url, workers=2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def predictor(cluster: Cluster) -> Predictor:
    return Predictor.from_bundle(cluster.bundle, device="cpu")


def crops(datasets_dir: Path, n: int, size: int = 64) -> list[bytes]:
    """``n`` distinct PNG crops of DSB2018 nuclei images (real data)."""
    files = sorted((datasets_dir / "dsb2018_nuclei" / "images").iterdir())
    out = []
    for i in range(n):
        img = np.asarray(Image.open(files[i % len(files)]).convert("RGB"))
        y = (i * 37) % max(1, img.shape[0] - size)
        x = (i * 53) % max(1, img.shape[1] - size)
        buf = io.BytesIO()
        Image.fromarray(img[y : y + size, x : x + size]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def submit(url: str, name: str, data: bytes, **form: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", files={"file": (name, data)}, data=form, timeout=60, headers=CLIENT)


def done_lines(cluster: Cluster, worker: int) -> list[str]:
    return [line for line in (cluster.logs / f"worker{worker}.log").read_text().splitlines()
            if " done in " in line]


def test_forty_jobs_across_two_replicas_match_the_in_process_predictor(cluster: Cluster, predictor: Predictor,
                                                                      datasets_dir: Path, tmp_path: Path) -> None:
    images = crops(datasets_dir, 40)
    jobs = []
    for i, data in enumerate(images):
        r = submit(cluster.apis[i % 2], f"crop{i}.png", data)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job_id"])
    assert len(set(jobs)) == 40
    for i, job_id in enumerate(jobs):
        other = cluster.apis[(i + 1) % 2]  # the replica that did not take the upload
        assert wait_finished(other, job_id, JOB_WAIT_S)["status"] == "done"
    nontrivial = 0
    for i, job_id in enumerate(jobs):
        (tmp_path / "crop.png").write_bytes(images[i])
        expected = predictor.predict_scan(read_scan(tmp_path / "crop.png")).mask
        nontrivial += int(0 < expected.mean() < 1)
        for url in cluster.apis:  # either replica serves the result files
            r = httpx.get(f"{url}/v1/jobs/{job_id}/mask", params={"format": "png"}, timeout=30)
            assert r.status_code == 200
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)
    assert nontrivial >= 20  # the comparison means something only for non-trivial masks
    assert done_lines(cluster, 0) and done_lines(cluster, 1), "both workers should have taken jobs"
    health = [httpx.get(f"{url}/health", timeout=10).json() for url in cluster.apis]
    assert health[0]["jobs"] == health[1]["jobs"] and health[0]["jobs"]["done"] >= 40
    assert all(h["workers"] == 2 and h["queue_depth"] == 0 and h["shared_queue"] for h in health)


def test_worker_killed_mid_job_its_job_completes_on_the_other_one_seg_in_the_pacs(cluster: Cluster, pacs: Any,
                                                                                  datasets_dir: Path) -> None:
    from medseg.io.dicomweb import find_segs

    store = redis.Redis.from_url(cluster.broker, decode_responses=True)
    api = cluster.apis[0]
    study = pacs.ct  # 20 slices of 512 x 512: long enough to be caught running
    r = httpx.post(f"{api}/v1/segment/dicomweb", json={"endpoint": "test-pacs", "study_uid": study.study_uid,
                                                       "series_uid": study.series_uid, "store_back": True},
                   headers=CLIENT, timeout=120)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        record = store.hgetall(f"medseg:job:{job_id}")
        if record.get("status") == "running" and float(record.get("progress", 0)) > 0.05:
            break
        assert record.get("status") in ("queued", "running"), record
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not record.get("pacs_stored_sop_uid")  # killed before its SEG reached the PACS
    victim_id = record["worker"]
    victim_pid = int(victim_id.rsplit("-", 2)[1])
    victim = next(p for p in cluster.workers if p.pid == victim_pid)
    os.kill(victim_pid, signal.SIGKILL)
    victim.wait(30)

    status = wait_finished(cluster.apis[1], job_id, JOB_WAIT_S)  # the other replica answers too
    assert status["status"] == "done", status
    assert status["pacs"]["stored"] and status["pacs"]["store_error"] is None, status
    record = store.hgetall(f"medseg:job:{job_id}")
    assert record["attempts"] == "2" and record["worker"] != victim_id
    survivor = 1 - cluster.workers.index(victim)
    assert any(job_id in line for line in done_lines(cluster, survivor))
    assert not any(job_id in line for line in done_lines(cluster, cluster.workers.index(victim)))

    # Exactly one SEG for this series in Orthanc: one series, one instance, the job's.
    segs = find_segs(pacs.endpoint, study.study_uid, source_series_uid=study.series_uid)
    assert [s["SeriesInstanceUID"] for s in segs] == [status["pacs"]["seg_series_uid"]]
    assert int(segs[0]["NumberOfSeriesRelatedInstances"]) == 1
    seg = httpx.get(f"{cluster.apis[1]}/v1/jobs/{job_id}/mask", params={"format": "dicom-seg"}, timeout=30)
    assert seg.status_code == 200
    assert pydicom.dcmread(io.BytesIO(seg.content)).SOPInstanceUID == status["pacs"]["seg_sop_uid"]
    # Stored again on request through the other replica: still one SEG, and the record says so on both.
    again = httpx.post(f"{cluster.apis[1]}/v1/jobs/{job_id}/store", headers=CLIENT, timeout=120)
    assert again.status_code == 200 and again.json()["pacs"]["seg_sop_uid"] == status["pacs"]["seg_sop_uid"]
    assert httpx.get(f"{api}/v1/jobs/{job_id}", timeout=30).json()["pacs"]["stored"]
    segs = find_segs(pacs.endpoint, study.study_uid, source_series_uid=study.series_uid)
    assert len(segs) == 1 and int(segs[0]["NumberOfSeriesRelatedInstances"]) == 1

    # The survivor still takes new jobs; /health counts one live worker once the victim's heartbeat is stale.
    assert wait_finished(api, submit(api, "a.png", crops(datasets_dir, 1)[0]).json()["job_id"], JOB_WAIT_S)["status"] == "done"
    assert cluster.wait_ready(api, workers=1)["workers"] == 1


def test_full_shared_queue_gets_429_then_a_new_worker_drains_it(redis_url: str, datasets_dir: Path,
                                                                tmp_path: Path) -> None:
    """Its own Redis database, so the cluster's workers do not see these jobs."""
    broker = redis_url.rsplit("/", 1)[0] + "/1"
    (tmp_path / "logs").mkdir()
    c = Cluster(build_bundle(tmp_path / "bundle"), tmp_path / "results", broker, tmp_path / "logs")
    try:
        api = c.start_api(max_queued=2)
        deadline = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(f"{api}/health", timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, c.log_tail()
                time.sleep(0.5)
        assert health.status_code == 503 and health.json()["workers"] == 0  # no worker: degraded
        images = crops(datasets_dir, 3)
        first = [submit(api, "a.png", images[i]) for i in range(2)]
        assert [r.status_code for r in first] == [202, 202]
        refused = submit(api, "a.png", images[2])
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "full" in refused.json()["error"]
        assert httpx.get(f"{api}/health", timeout=10).json()["queue_depth"] == 2
        c.start_worker()
        for r in first:
            assert wait_finished(api, r.json()["job_id"], JOB_WAIT_S)["status"] == "done"
        assert submit(api, "a.png", images[2]).status_code == 202
        health = httpx.get(f"{api}/health", timeout=10)
        assert health.status_code == 200 and health.json()["workers"] == 1
    finally:
        c.stop()
