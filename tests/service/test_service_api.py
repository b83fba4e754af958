"""The inference service over HTTP (httpx against a live uvicorn on 127.0.0.1): jobs, results, limits, errors."""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.inference import Predictor
from medseg.io import read_mask, read_scan
from medseg.service.settings import ServiceSettings

TIMEOUT = 120.0  # seconds a test waits for one job at most (CPU, shared machine)
CLIENT = {"X-Medseg-Client": "tests"}  # the service refuses POSTs without it (cross-site form posts)


def nuclei_image(datasets_dir: Path, index: int = 0) -> Path:
    return sorted((datasets_dir / "dsb2018_nuclei" / "images").iterdir())[index]


def submit(url: str, name: str, data: bytes, **form: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", files={"file": (name, data)}, data=form, timeout=60, headers=CLIENT)


def wait_done(url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        assert 0.0 <= status["progress"] <= 1.0
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished after {TIMEOUT} s")


def read_nifti(data: bytes, tmp_path: Path, name: str = "x.nii.gz") -> sitk.Image:
    path = tmp_path / name
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


# ---------------------------------------------------------------------------------------------- results


def test_upload_job_mask_equals_in_process_predictor(service: str, predictor: Predictor, datasets_dir: Path,
                                                     tmp_path: Path) -> None:
    src = nuclei_image(datasets_dir, 2)  # an RGB image
    r = submit(service, src.name, src.read_bytes())
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    assert wait_done(service, job_id) == {"job_id": job_id, "status": "done", "progress": 1.0, "error": None}

    scan = read_scan(src)
    expected = predictor.predict_scan(scan)
    assert 0 < expected.mask.mean() < 1  # the comparison below means something only for a non-trivial mask

    nifti = httpx.get(f"{service}/v1/jobs/{job_id}/mask", params={"format": "nifti"})
    assert nifti.status_code == 200 and nifti.headers["content-type"] == "application/gzip"
    image = read_nifti(nifti.content, tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected.mask)
    assert image.GetSpacing() == scan.geometry.spacing

    png = httpx.get(f"{service}/v1/jobs/{job_id}/mask", params={"format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    (tmp_path / "m.png").write_bytes(png.content)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png").array, expected.mask)

    unc = httpx.get(f"{service}/v1/jobs/{job_id}/uncertainty", params={"format": "npz"})
    with np.load(io.BytesIO(unc.content), allow_pickle=False) as z:
        np.testing.assert_allclose(z["uncertainty"], expected.uncertainty, atol=1e-6)
        assert json.loads(str(z["geometry"]))["size"] == list(scan.geometry.size)
    unc_nii = httpx.get(f"{service}/v1/jobs/{job_id}/uncertainty")
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_nifti(unc_nii.content, tmp_path, "u.nii.gz")),
                               expected.uncertainty, atol=1e-6)

    report = httpx.get(f"{service}/v1/jobs/{job_id}/report").json()
    nucleus = report["measurements"]["1"]
    assert nucleus["name"] == "nucleus" and nucleus["voxels"] == int((expected.mask == 1).sum())
    assert nucleus["area_mm2"] == pytest.approx(nucleus["voxels"] * float(np.prod(scan.geometry.spacing)))
    assert report["weights_hash"] == predictor.weights_hash and report["tta"] == "none"
    assert len(report["upload_sha256"]) == 64


def test_volume_keeps_geometry_and_png_is_refused(service: str, predictor: Predictor, datasets_dir: Path,
                                                  tmp_path: Path) -> None:
    src = sorted((datasets_dir / "msd_hippocampus" / "images").iterdir())[0]
    job_id = submit(service, "scan.nii.gz", src.read_bytes()).json()["job_id"]
    assert wait_done(service, job_id)["status"] == "done"
    scan = read_scan(src)
    image = read_nifti(httpx.get(f"{service}/v1/jobs/{job_id}/mask").content, tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), predictor.predict_scan(scan).mask)
    np.testing.assert_allclose(image.GetSpacing(), scan.geometry.spacing)
    np.testing.assert_allclose(image.GetOrigin(), scan.geometry.origin)
    np.testing.assert_allclose(image.GetDirection(), scan.geometry.direction)
    png = httpx.get(f"{service}/v1/jobs/{job_id}/mask", params={"format": "png"})
    assert png.status_code == 400 and "2D" in png.json()["error"]
    seg = httpx.get(f"{service}/v1/jobs/{job_id}/mask", params={"format": "dicom-seg"})
    assert seg.status_code == 400 and "DICOM" in seg.json()["error"]
    assert "volume_ml" in httpx.get(f"{service}/v1/jobs/{job_id}/report").json()["measurements"]["1"]


def test_dicom_series_zip_is_one_upload(service: str, datasets_dir: Path, tmp_path: Path) -> None:
    # Two adjacent slices of the CT series: a real series volume, small enough to predict on a CPU in seconds.
    files = sorted((datasets_dir / "dicom_ct_series" / "dicom").iterdir())[9:11]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f"series/{f.name}")
    # No suffix in the name: the service recognises the zip by its content.
    job_id = submit(service, "Doe^Jane", buf.getvalue()).json()["job_id"]
    assert wait_done(service, job_id)["status"] == "done"
    scan = read_scan(files)
    assert scan.is_volume and scan.spatial_shape[0] == 2
    image = read_nifti(httpx.get(f"{service}/v1/jobs/{job_id}/mask").content, tmp_path)
    assert sitk.GetArrayFromImage(image).shape == scan.spatial_shape
    np.testing.assert_allclose(image.GetOrigin(), scan.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), scan.geometry.spacing, atol=1e-6)
    seg = httpx.get(f"{service}/v1/jobs/{job_id}/mask", params={"format": "dicom-seg"})
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    (tmp_path / "seg.dcm").write_bytes(seg.content)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert ds.Modality == "SEG"
    referenced = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert len(referenced) == 2 and all(referenced)  # one reference per source slice
    assert ds.SegmentSequence[0].SegmentLabel == "nucleus"


def test_per_request_tta_applies_to_that_job_only(service: str, datasets_dir: Path) -> None:
    data = nuclei_image(datasets_dir, 0).read_bytes()
    flips = submit(service, "a.png", data, tta="flips").json()["job_id"]
    plain = submit(service, "a.png", data).json()["job_id"]
    for job_id in (flips, plain):
        assert wait_done(service, job_id)["status"] == "done"
    assert httpx.get(f"{service}/v1/jobs/{flips}/report").json()["tta"] == "flips"
    assert httpx.get(f"{service}/v1/jobs/{plain}/report").json()["tta"] == "none"
    bad = submit(service, "a.png", data, tta="sideways")
    assert bad.status_code == 422 and "tta" in bad.json()["error"]


class RecordingPredictor:
    """The real predictor; records each call's TTA and checks nobody changed the shared config for it."""

    def __init__(self, inner: Predictor):
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_scan(self, scan, *, tta=None, progress=None):
        self.calls.append((tta, self.inner.cfg.inference.tta))
        return self.inner.predict_scan(scan, tta=tta, progress=progress)


def test_the_job_tta_goes_to_the_call_not_into_the_config(predictor: Predictor, datasets_dir: Path, start_service,
                                                          tmp_path: Path) -> None:
    recording = RecordingPredictor(predictor)
    url = start_service(recording, ServiceSettings(work_dir=tmp_path))
    data = nuclei_image(datasets_dir, 0).read_bytes()
    for form in ({"tta": "multicrop"}, {}):
        assert wait_done(url, submit(url, "a.png", data, **form).json()["job_id"])["status"] == "done"
    assert recording.calls == [("multicrop", "none"), (None, "none")]


# ----------------------------------------------------------------------------------------- bad requests


def test_corrupt_upload_gets_json_error_naming_the_problem(service: str, datasets_dir: Path) -> None:
    truncated = nuclei_image(datasets_dir, 0).read_bytes()[:300]
    r = submit(service, "Doe_John_1970-01-01.png", truncated)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error.startswith("upload.png:") and "Doe" not in error

    r = submit(service, "notes.txt", b"name: someone\n" * 20)
    assert r.status_code == 415 and "unrecognised file type" in r.json()["error"]

    r = submit(service, "empty.nii.gz", b"")
    assert r.status_code == 422 and "empty" in r.json()["error"]

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "no scans in here")
    r = submit(service, "study.zip", buf.getvalue())
    assert r.status_code in (415, 422) and r.json()["error"].startswith("upload.zip")

    r = httpx.post(f"{service}/v1/segment", data={"tta": "none"}, headers=CLIENT)
    assert r.status_code == 422 and "file" in r.json()["error"]


def test_oversize_upload_gets_413_json(service: str) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(5 * 1024 * 1024)
    r = submit(service, "big.png", big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    # Chunked transfer (no Content-Length): counted while it streams.
    boundary = "medsegboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(6):
            yield bytes(1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(f"{service}/v1/segment", content=body(), timeout=60,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}", **CLIENT})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert httpx.get(f"{service}/health").status_code == 200  # and the server carries on


def test_unknown_and_unfinished_jobs(gated_predictor, datasets_dir: Path, start_service, tmp_path: Path) -> None:
    gated, gate = gated_predictor
    url = start_service(gated, ServiceSettings(max_queued=2, work_dir=tmp_path))
    r = httpx.get(f"{url}/v1/jobs/0123456789abcdef")
    assert r.status_code == 404 and "no job" in r.json()["error"]
    job_id = submit(url, "a.png", nuclei_image(datasets_dir, 0).read_bytes()).json()["job_id"]
    r = httpx.get(f"{url}/v1/jobs/{job_id}/mask")
    assert r.status_code == 409 and "poll" in r.json()["error"]
    gate.set()
    assert wait_done(url, job_id)["status"] == "done"


def test_job_failure_is_reported_and_worker_survives(failing_once_predictor, datasets_dir: Path, start_service,
                                                     tmp_path: Path) -> None:
    url = start_service(failing_once_predictor, ServiceSettings(work_dir=tmp_path))
    data = nuclei_image(datasets_dir, 0).read_bytes()
    first = submit(url, "a.png", data).json()["job_id"]
    status = wait_done(url, first)
    assert status["status"] == "failed" and "out of memory" in status["error"]
    r = httpx.get(f"{url}/v1/jobs/{first}/mask")
    assert r.status_code == 409 and "failed" in r.json()["error"]
    second = submit(url, "a.png", data).json()["job_id"]
    assert wait_done(url, second)["status"] == "done"


# ---------------------------------------------------------------------------------------- queue and TTL


def test_full_queue_answers_429_with_retry_after(gated_predictor, datasets_dir: Path, start_service,
                                                 tmp_path: Path) -> None:
    gated, gate = gated_predictor
    url = start_service(gated, ServiceSettings(max_queued=2, work_dir=tmp_path))
    data = nuclei_image(datasets_dir, 0).read_bytes()
    running = submit(url, "a.png", data).json()["job_id"]
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(f"{url}/v1/jobs/{running}").json()["status"] != "running":  # the worker holds it at the gate
        assert time.monotonic() < deadline
        time.sleep(0.02)
    queued = [submit(url, "a.png", data) for _ in range(2)]
    assert [r.status_code for r in queued] == [202, 202]
    refused = submit(url, "a.png", data)
    assert refused.status_code == 429 and "queue is full" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1
    health = httpx.get(f"{url}/health").json()
    assert health["jobs"]["queued"] == 2 and health["jobs"]["running"] == 1
    gate.set()
    for job_id in [running, *(r.json()["job_id"] for r in queued)]:
        assert wait_done(url, job_id)["status"] == "done"
    assert submit(url, "a.png", data).status_code == 202  # room again


def test_finished_jobs_and_their_files_expire(predictor: Predictor, datasets_dir: Path, start_service,
                                              tmp_path: Path) -> None:
    url = start_service(predictor, ServiceSettings(job_ttl_s=0.5, work_dir=tmp_path))
    job_id = submit(url, "a.png", nuclei_image(datasets_dir, 0).read_bytes()).json()["job_id"]
    assert wait_done(url, job_id)["status"] == "done"
    assert (tmp_path / job_id / "mask_indices.nii.gz").is_file()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/jobs/{job_id}").status_code != 404:
        assert time.monotonic() < deadline, "job not purged after its TTL"
        time.sleep(0.2)
    assert not (tmp_path / job_id).exists()
    from medseg.service.jobs import LOCK_FILE

    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # no stray uploads either


# ------------------------------------------------------------------------------------------ metadata


def test_models_health_and_openapi(service: str, predictor: Predictor) -> None:
    models = httpx.get(f"{service}/v1/models").json()["models"]
    assert len(models) == 1
    m = models[0]
    assert m["name"] == predictor.name and m["weights_hash"] == predictor.weights_hash
    assert m["labels"]["1"]["name"] == "nucleus" and m["device"] == "cpu" and m["num_classes"] == 2
    assert m["config"]["data"]["root"] is None  # server paths are not published
    health = httpx.get(f"{service}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    schema = httpx.get(f"{service}/openapi.json").json()
    for path in ("/v1/segment", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/mask", "/v1/jobs/{job_id}/report",
                 "/v1/jobs/{job_id}/uncertainty", "/v1/models", "/health"):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert "429" in schema["paths"]["/v1/segment"]["post"]["responses"]
    from openapi_spec_validator import validate

    validate(schema)


def test_logs_carry_the_upload_hash_not_its_name(service: str, datasets_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    data = nuclei_image(datasets_dir, 0).read_bytes()
    import hashlib

    with caplog.at_level(logging.INFO, logger="medseg.service"):
        job_id = submit(service, "Mustermann_Erika_1964.png", data).json()["job_id"]
        wait_done(service, job_id)
        submit(service, "Mustermann_Erika_1964.png", data[:100])
    text = caplog.text
    assert hashlib.sha256(data).hexdigest() in text
    assert "Mustermann" not in text


def test_settings_come_from_environment_then_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSEG_SERVICE_MAX_QUEUED", "3")
    monkeypatch.setenv("MEDSEG_SERVICE_JOB_TTL_S", "12.5")
    monkeypatch.setenv("MEDSEG_SERVICE_WORK_DIR", str(tmp_path))
    s = ServiceSettings.from_env(device="cpu", max_upload_bytes=None)
    assert (s.max_queued, s.job_ttl_s, s.work_dir, s.device) == (3, 12.5, tmp_path, "cpu")
    assert s.max_upload_bytes == ServiceSettings().max_upload_bytes
    assert ServiceSettings.from_env(max_queued=7).max_queued == 7


# ------------------------------------------------------------------------------- hostile headers (issue 15)


def _mha_pointing_at(target: str) -> bytes:
    return ("ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
            f"ElementDataFile: {target}\n").encode()


def test_upload_header_cannot_read_or_probe_server_files(service: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(1, 17)))
    answers = []
    for name, data in (("scan.mha", _mha_pointing_at(str(secret))), ("scan.mha", _mha_pointing_at("/no/such/file")),
                       ("scan.nrrd", f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 4 4\nencoding: raw\n"
                                     f"data file: {secret}\n\n".encode())):
        r = submit(service, name, data)
        assert r.status_code == 415, r.text  # refused up front: no job reads the file
        assert "inside the file" in r.json()["error"] and str(tmp_path) not in r.json()["error"]
        answers.append((r.status_code, r.json()["error"].split(":", 1)[1]))
    assert answers[0] == answers[1]  # an existing and a missing server file look the same


def test_detached_header_upload_is_refused_with_a_reason(service: str) -> None:
    header = b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\nElementDataFile = scan.raw\n"
    r = submit(service, "scan.mhd", header)
    assert r.status_code == 415 and "detached header" in r.json()["error"]


# ---------------------------------------------------------------------------- client errors (issue 15)


def test_degenerate_shape_is_refused_up_front_in_one_line(service: str) -> None:
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((1, 60000), np.uint8)).save(buf, format="PNG")
    r = submit(service, "strip.png", buf.getvalue())
    assert r.status_code == 422, r.text  # was 202, then a job error quoting ITK's build paths and heap address
    error = r.json()["error"]
    assert error.startswith("upload.png: 1 x 60,000 pixels") and "32,767" in error
    assert "\n" not in error and "/" not in error and "0x" not in error


def test_job_errors_reach_the_client_without_paths_or_addresses(predictor: Predictor, datasets_dir: Path,
                                                                start_service, tmp_path: Path) -> None:
    class ItkFailure:
        def __init__(self, inner: Predictor):
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def predict_scan(self, scan, *, tta=None, progress=None):
            raise RuntimeError(
                "Exception thrown in SimpleITK ImageFileWriter_Execute: /tmp/SimpleITK-build/ITK/Modules/IO/NIFTI/"
                "src/itkNiftiImageIO.cxx:1440:\nITK ERROR: NiftiImageIO(0x55a417fd0c30): Dimension(0) = 60000 is "
                "greater than maximum possible dimension 32767 in /srv/medseg/jobs/x/mask.nii.gz"
            )

    url = start_service(ItkFailure(predictor), ServiceSettings(work_dir=tmp_path))
    job_id = submit(url, "a.png", nuclei_image(datasets_dir, 0).read_bytes()).json()["job_id"]
    status = wait_done(url, job_id)
    assert status["status"] == "failed"
    assert status["error"] == ("RuntimeError: Dimension(0) = 60000 is greater than maximum possible dimension 32767 "
                               "in mask.nii.gz")


# ---------------------------------------------------------------------------- job files (issue 15)


def test_stale_job_folders_are_purged_at_start_and_job_files_are_private(predictor: Predictor, datasets_dir: Path,
                                                                         start_service, tmp_path: Path) -> None:
    stale = tmp_path / ("ab" * 16)  # a job folder left by a process that crashed
    stale.mkdir()
    (stale / "mask_seg.dcm").write_bytes(b"patient data")
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    url = start_service(predictor, ServiceSettings(work_dir=tmp_path))
    assert not stale.exists() and unrelated.exists()
    job_id = submit(url, "a.png", nuclei_image(datasets_dir, 0).read_bytes()).json()["job_id"]
    assert wait_done(url, job_id)["status"] == "done"
    folder = tmp_path / job_id
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700" and oct(folder.stat().st_mode & 0o777) == "0o700"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert modes and set(modes.values()) == {"0o600"}, modes
    from medseg.errors import MedsegError
    from medseg.service.app import create_app

    with pytest.raises(MedsegError, match="in use by another medseg service process"):
        create_app(predictor, ServiceSettings(work_dir=tmp_path))  # its start-up purge would delete live jobs


def _named_series_zip(datasets_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((datasets_dir / "dicom_ct_series" / "dicom").iterdir())[9:11]:
            ds = pydicom.dcmread(f)
            ds.PatientName, ds.PatientID = "Doe^Jane", "PID-4711"
            out = io.BytesIO()
            ds.save_as(out)
            zf.writestr(f"series/{f.name}", out.getvalue())
    return buf.getvalue()


def test_dicom_seg_can_be_anonymized(service: str, datasets_dir: Path, tmp_path: Path) -> None:
    data = _named_series_zip(datasets_dir)
    segs = {}
    for anonymize in ("false", "true"):
        job_id = submit(service, "series.zip", data, anonymize=anonymize).json()["job_id"]
        assert wait_done(service, job_id)["status"] == "done"
        (tmp_path / f"{anonymize}.dcm").write_bytes(
            httpx.get(f"{service}/v1/jobs/{job_id}/mask", params={"format": "dicom-seg"}).content)
        segs[anonymize] = pydicom.dcmread(tmp_path / f"{anonymize}.dcm")
        assert httpx.get(f"{service}/v1/jobs/{job_id}/report").json()["dicom_seg_anonymized"] == (anonymize == "true")
    assert str(segs["false"].PatientName) == "Doe^Jane" and segs["false"].PatientID == "PID-4711"
    anonymous = segs["true"]
    assert str(anonymous.PatientName) != "Doe^Jane" and anonymous.PatientID != "PID-4711"
    assert anonymous.StudyInstanceUID != segs["false"].StudyInstanceUID  # hashed UIDs


def test_dicom_series_with_a_gap_is_refused_unless_allowed(service: str, datasets_dir: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in [sorted((datasets_dir / "dicom_ct_series" / "dicom").iterdir())[i] for i in (9, 10, 11, 13)]:
            zf.write(f, f"series/{f.name}")
    r = submit(service, "series.zip", buf.getvalue())
    assert r.status_code == 422 and "missing slices" in r.json()["error"] and "allow_missing_slices" in r.json()["error"]
    allowed = submit(service, "series.zip", buf.getvalue(), allow_missing_slices="true")
    assert allowed.status_code == 202 and wait_done(service, allowed.json()["job_id"])["status"] == "done"


# ----------------------------------------------------------------------------------- callers (issue 15)


def test_posts_without_the_client_header_and_foreign_hosts_are_refused(service: str, datasets_dir: Path) -> None:
    data = nuclei_image(datasets_dir, 0).read_bytes()
    # What a web page elsewhere can send without a CORS preflight: a form post, no custom header.
    r = httpx.post(f"{service}/v1/segment", files={"file": ("a.png", data)}, timeout=60)
    assert r.status_code == 403 and "X-Medseg-Client" in r.json()["error"]
    # A DNS-rebinding page makes the browser send the attacker's host name.
    r = httpx.post(f"{service}/v1/segment", files={"file": ("a.png", data)}, timeout=60,
                   headers={**CLIENT, "Host": "evil.example"})
    assert r.status_code == 400
    assert httpx.get(f"{service}/health", headers={"Host": "evil.example"}).status_code == 400
    assert submit(service, "a.png", data).status_code == 202  # the same upload from a client


def test_api_token_guards_every_v1_request(predictor: Predictor, datasets_dir: Path, start_service,
                                           tmp_path: Path) -> None:
    from medseg.service.client import RemotePredictor

    url = start_service(predictor, ServiceSettings(api_token="s3cret-token", work_dir=tmp_path))
    data = nuclei_image(datasets_dir, 0).read_bytes()
    r = submit(url, "a.png", data)
    assert r.status_code == 401 and "API token" in r.json()["error"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # health checks need no token
    with RemotePredictor(url, token="s3cret-token", poll_interval=0.05) as remote:
        pred = remote.predict_scan(read_scan(nuclei_image(datasets_dir, 0)))
    assert pred.mask.shape == read_scan(nuclei_image(datasets_dir, 0)).spatial_shape


def _half_sent_upload(url: str, first: bytes, drip: bytes = b"", pause_s: float = 0.0, chunks: int = 0) -> bytes:
    """POST headers promising 100 kB, ``first``, then ``chunks`` x ``drip`` ``pause_s`` apart; the answer's bytes
    (read until the server closes the connection)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Medseg-Client: tests\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n" + first)
        try:
            for _ in range(chunks):
                time.sleep(pause_s)
                sock.sendall(drip)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: read what it said
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


MULTIPART_START = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"


def test_half_sent_upload_times_out_with_408(predictor: Predictor, start_service, tmp_path: Path) -> None:
    url = start_service(predictor, ServiceSettings(read_timeout_s=1.0, upload_timeout_s=3.0, work_dir=tmp_path))
    started = time.monotonic()
    answer = _half_sent_upload(url, MULTIPART_START + b"\x89PNG")  # then silence
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"read_timeout_s" in answer and time.monotonic() - started < 25
    # A slow drip that never pauses long enough for the read timeout still ends at the upload timeout.
    answer = _half_sent_upload(url, MULTIPART_START, b"x", pause_s=0.5, chunks=12)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # A body the app answers early (not multipart at all): answered, and the connection closed, not held open.
    answer = _half_sent_upload(url, b"not multipart")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    # Half-sent headers (no request for the app yet), and a connection that sends nothing: closed by the server.
    import socket
    from urllib.parse import urlsplit

    for sent in (b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
        with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=30) as sock:
            sock.sendall(sent)
            assert sock.recv(1024) == b""  # closed after read_timeout_s, not held open
    assert httpx.get(f"{url}/health").status_code == 200
