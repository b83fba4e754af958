"""RemotePredictor against a live service: same interface and same masks as the in-process Predictor."""

from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medseg.inference import Prediction, Predictor
from medseg.io import Geometry, Scan, read_scan
from medseg.service.client import RemoteInferenceError, RemotePredictor, encode_scan
from medseg.service.settings import ServiceSettings


def test_remote_predictor_matches_in_process(service: str, predictor: Predictor, datasets_dir: Path) -> None:
    with RemotePredictor(service, poll_interval=0.05) as remote:
        assert remote.name == predictor.name and remote.weights_hash == predictor.weights_hash
        assert remote.labels == predictor.labels and str(remote.device) == "cpu"
        assert remote.cfg.data.label_map == predictor.cfg.data.label_map and remote.model_card == "# model card"
        for src in (sorted((datasets_dir / "dsb2018_nuclei" / "images").iterdir())[2],  # RGB PNG
                    sorted((datasets_dir / "msd_hippocampus" / "images").iterdir())[1]):  # 3D NIfTI
            scan = read_scan(src)
            seen: list[float] = []
            got = remote.predict_scan(scan, progress=seen.append)
            want = predictor.predict_scan(scan)
            assert isinstance(got, Prediction) and got.geometry == scan.geometry
            np.testing.assert_array_equal(got.mask, want.mask)
            # With a progress callback the service predicts slice by slice (issue 16), in-process batched: float noise.
            np.testing.assert_allclose(got.uncertainty, want.uncertainty, atol=5e-5)
            # probs: one-hot of the mask (the service does not send probabilities)
            assert got.probs.shape == want.probs.shape and got.probs.dtype == np.float32
            np.testing.assert_array_equal(got.probs.argmax(0), got.mask)
            assert set(np.unique(got.probs)) <= {0.0, 1.0} and np.all(got.probs.sum(0) == 1)
            assert seen and seen[-1] == 1.0


def test_float_and_uint16_scans_travel_losslessly(service: str, predictor: Predictor) -> None:
    rng = np.random.default_rng(0)
    geometry = Geometry((0.5, 0.7), (10.0, -3.0), (1.0, 0.0, 0.0, 1.0), (80, 96))
    for array in (rng.normal(100, 30, (80, 96)).astype(np.float32), rng.integers(0, 4000, (80, 96)).astype(np.uint16)):
        scan = Scan(array, geometry, "synthetic")
        name, data = encode_scan(scan)
        assert name.endswith(".nii.gz" if array.dtype == np.float32 else ".png")
        with RemotePredictor(service, poll_interval=0.05) as remote:
            got = remote.predict_scan(scan)
        np.testing.assert_array_equal(got.mask, predictor.predict_scan(scan).mask)


def test_predict_file_sends_a_dicom_zip_as_is(service: str, predictor: Predictor, datasets_dir: Path,
                                             tmp_path: Path) -> None:
    files = sorted((datasets_dir / "dicom_ct_series" / "dicom").iterdir())[:2]
    archive = tmp_path / "Patient_Name_Study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    with RemotePredictor(service, poll_interval=0.05) as remote:
        got = remote.predict_file(archive)
    scan = read_scan(files)
    assert got.geometry.same_grid(scan.geometry)
    np.testing.assert_array_equal(got.mask, predictor.predict_scan(scan).mask)


def test_errors_are_medseg_errors(service: str, closed_port_url: str) -> None:
    with RemotePredictor(service) as remote:
        with pytest.raises(RemoteInferenceError, match=r"refused it \(422\).*upload.png"):
            remote.submit("scan.png", b"\x89PNG\r\n\x1a\n broken")
        with pytest.raises(RemoteInferenceError, match="404"):
            remote.wait("0" * 32)
    with pytest.raises(RemoteInferenceError, match="ConnectError"):
        RemotePredictor(closed_port_url, timeout=5)


def wait_running(remote: RemotePredictor, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while remote._get_json(f"/v1/jobs/{job_id}")["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_full_queue_is_waited_out(gated_predictor, datasets_dir: Path, start_service, tmp_path: Path) -> None:
    """With the queue full, submit() follows Retry-After and gets in once the worker moves on."""
    gated, gate = gated_predictor
    url = start_service(gated, ServiceSettings(max_queued=1, work_dir=tmp_path))
    data = sorted((datasets_dir / "dsb2018_nuclei" / "images").iterdir())[0].read_bytes()
    with RemotePredictor(url, poll_interval=0.05, wait_timeout=120) as remote:
        wait_running(remote, remote.submit("a.png", data))
        remote.submit("a.png", data)  # fills the queue
        threading.Timer(1.0, gate.set).start()
        third = remote.submit("a.png", data)  # 429 first, then accepted after the gate opens
        assert remote.wait(third)["status"] == "done"
    with RemotePredictor(url, wait_timeout=0) as impatient:
        gate.clear()
        wait_running(impatient, impatient.submit("a.png", data))
        impatient.submit("a.png", data)
        with pytest.raises(RemoteInferenceError, match="429"):
            impatient.submit("a.png", data)
        gate.set()
