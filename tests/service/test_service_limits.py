"""Memory and compute bounds of the service (issue 15, finding 2): a small upload must not exhaust the server.

* the voxel cap is a setting, sized from the model and memory by default, and a header over it is refused
  with 413 before anything is decoded (PNG, NIfTI and DICOM headers; the files here could not be decoded);
* the decoded bytes of queued and running jobs count against a budget: 429 with Retry-After when it is taken;
* a job past its compute time limit fails with a clear error and the worker goes on with the next job.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from test_service_api import nuclei_image, submit, wait_done

from medseg.inference import Predictor
from medseg.io import MAX_VOXELS
from medseg.service.budget import default_voxel_cap, machine_memory_bytes, prediction_bytes_per_voxel
from medseg.service.jobs import JobQueue, JobStatus
from medseg.service.settings import ServiceSettings


def _png_header_only(width: int, height: int) -> bytes:
    """A real PNG of ``width`` x ``height`` cut after 1 kB: its header is valid, its pixels cannot be decoded."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()[:1024]


def _nifti_header_only(shape_xyz: tuple[int, int, int]) -> bytes:
    """A NIfTI-1 header announcing ``shape_xyz`` uint8 voxels, with no voxel data after it."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *shape_xyz, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)  # datatype uint8, bitpix 8
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352)  # vox_offset
    header[344:348] = b"n+1\x00"
    return bytes(header)


def test_voxel_cap_is_a_setting_and_headers_over_it_get_413_before_decoding(predictor: Predictor, start_service,
                                                                          datasets_dir: Path,
                                                                          tmp_path: Path) -> None:
    url = start_service(predictor, ServiceSettings(max_voxels=100_000, work_dir=tmp_path))
    assert httpx.get(f"{url}/health").json()["max_voxels"] == 100_000
    files = sorted((datasets_dir / "dicom_ct_series" / "dicom").iterdir())[:2]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.writestr(f"s/{f.name}", f.read_bytes()[:-1000])  # pixel data cut short: not decodable either
    for name, data in (("bomb.png", _png_header_only(9400, 9400)), ("small.png", _png_header_only(400, 400)),
                       ("bomb.nii", _nifti_header_only((500, 500, 500))), ("series.zip", buf.getvalue())):
        r = submit(url, name, data)
        assert r.status_code == 413, (name, r.status_code, r.text)
        assert "above the cap of 100,000" in r.json()["error"]
    ok = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(ok, format="PNG")
    job = submit(url, "ok.png", ok.getvalue())
    assert job.status_code == 202 and wait_done(url, job.json()["job_id"])["status"] == "done"


def test_default_voxel_cap_follows_the_model_and_the_memory(predictor: Predictor, service: str) -> None:
    per_voxel = prediction_bytes_per_voxel(predictor.cfg.data.num_classes, predictor.cfg.data.input_channels)
    assert per_voxel == 4 * 2 * 2 + 4 * 3 + 4 + 1 + 4 * 3  # probabilities and their sum, input, outputs, scan
    gib = 1024**3
    assert default_voxel_cap(predictor, 8 * gib) == 2 * gib // per_voxel  # a quarter of memory per scan
    assert default_voxel_cap(predictor, 10**15) == MAX_VOXELS
    health = httpx.get(f"{service}/health").json()
    expected = min(default_voxel_cap(predictor, machine_memory_bytes()), health["memory_budget_bytes"] // 4)
    assert health["max_voxels"] == expected and health["memory_budget_bytes"] == machine_memory_bytes() // 4


def test_queued_decoded_bytes_count_against_a_budget(gated_predictor, datasets_dir: Path, start_service,
                                                    tmp_path: Path) -> None:
    gated, gate = gated_predictor
    image = nuclei_image(datasets_dir, 2)  # RGB, 256 x 320: 245,760 samples, 983,040 bytes reserved
    one = 256 * 320 * 3 * 4
    url = start_service(gated, ServiceSettings(max_queued=16, memory_budget_bytes=int(2.5 * one), work_dir=tmp_path))
    first = submit(url, "a.png", image.read_bytes())
    second = submit(url, "a.png", image.read_bytes())
    assert [first.status_code, second.status_code] == [202, 202]
    assert httpx.get(f"{url}/health").json()["memory_used_bytes"] == 2 * one
    # Refused from the header: this copy could not even be decoded (cut short), yet the answer is 429, not 422.
    refused = submit(url, "a.png", image.read_bytes()[:2000])
    assert refused.status_code == 429 and "memory budget" in refused.json()["error"], refused.text
    assert int(refused.headers["retry-after"]) >= 1
    gate.set()
    for r in (first, second):
        assert wait_done(url, r.json()["job_id"])["status"] == "done"
    assert httpx.get(f"{url}/health").json()["memory_used_bytes"] == 0  # released when the jobs ended
    assert submit(url, "a.png", image.read_bytes()).status_code == 202


class SlowFirstScan:
    """The real predictor, but its first scan takes minutes: the model reports progress and keeps going."""

    def __init__(self, inner: Predictor):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict_scan(self, scan, *, tta=None, progress=None):
        self.calls += 1
        if self.calls == 1:
            for i in range(6000):
                time.sleep(0.05)
                progress(i / 6000)
        return self.inner.predict_scan(scan, tta=tta, progress=progress)


def test_a_job_past_its_time_limit_fails_and_the_worker_moves_on(predictor: Predictor, datasets_dir: Path,
                                                                 start_service, tmp_path: Path) -> None:
    url = start_service(SlowFirstScan(predictor), ServiceSettings(job_timeout_s=1.0, work_dir=tmp_path))
    data = nuclei_image(datasets_dir, 0).read_bytes()
    slow = submit(url, "a.png", data).json()["job_id"]
    status = wait_done(url, slow)  # bounded by the limit, not the 5 minutes the scan would take
    assert status["status"] == "failed"
    assert status["error"] == ("the job ran past the service's compute time limit of 1 s (job_timeout_s) "
                               "and was stopped")
    assert wait_done(url, submit(url, "a.png", data).json()["job_id"])["status"] == "done"
    assert httpx.get(f"{url}/health").json()["job_timeout_s"] == 1.0


def test_the_time_limit_stops_the_network_between_tiles(predictor: Predictor, datasets_dir: Path,
                                                        tmp_path: Path) -> None:
    """The members' forward pre-hook checks the deadline before every network call, so a job stops inside
    its first model pass (before any progress report) instead of after it."""
    from medseg.io import read_scan

    hooks_before = [len(m._forward_pre_hooks) for m in predictor.members]
    jobs = JobQueue(predictor, tmp_path, 4, 3600.0, 10, job_timeout_s=1e-9)
    jobs.start()
    try:
        job_id, folder = jobs.new_folder()
        job = jobs.submit(job_id, folder, read_scan(nuclei_image(datasets_dir, 0)), "0" * 64, None)
        deadline = time.monotonic() + 120
        while job.status in (JobStatus.queued, JobStatus.running):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert job.status == JobStatus.failed and "compute time limit" in (job.error or "")
        assert job.progress == 0.05  # stopped before the first pass reported progress
    finally:
        jobs.stop()
    assert [len(m._forward_pre_hooks) for m in predictor.members] == hooks_before  # the shared predictor as found
