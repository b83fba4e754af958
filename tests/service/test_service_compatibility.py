"""Issue 16: the service and the CLI refuse a scan unlike the model's training data unless told to run anyway, and
record it. The bundle carries the fingerprint of real nuclei images; the scan is a real CT."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from service_support import build_tiny_bundle, running_service
from test_service_api import CLIENT, nuclei_image, submit, wait_done
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data.datalist import discover_cases
from medseg.io import Geometry, read_scan, write_scan
from medseg.planning.fingerprint import compute_fingerprint
from medseg.service.settings import ServiceSettings


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path) -> Path:
    """Four 128 x 128 slices of the real CT (a whole 512 x 512 x 20 CT takes minutes on a shared CPU)."""
    scan = read_scan(datasets_dir / "dicom_ct_series" / "images" / "ct.nii.gz")
    scan.array = scan.array[8:12, 192:320, 192:320]
    scan.geometry = Geometry.identity(scan.array.shape)
    return write_scan(scan, tmp_path_factory.mktemp("ct") / "ct.nii.gz")


@pytest.fixture(scope="module")
def fingerprinted_bundle(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path) -> Path:
    bundle = build_tiny_bundle(tmp_path_factory.mktemp("fp-bundle") / "bundle")
    record = json.loads((bundle / "preprocessing.json").read_text())
    cases = discover_cases(datasets_dir / "dsb2018_nuclei")
    record["training_fingerprint"] = compute_fingerprint(cases, max_cases=4).summary()
    (bundle / "preprocessing.json").write_text(json.dumps(record))
    return bundle


def test_service_refuses_a_ct_for_a_nuclei_model_unless_run_anyway(fingerprinted_bundle: Path, small_ct: Path,
                                                                   datasets_dir: Path,
                                                                   tmp_path: Path) -> None:
    ct = small_ct.read_bytes()
    settings = ServiceSettings(work_dir=tmp_path / "work", device="cpu")
    with running_service(fingerprinted_bundle, settings) as url:
        refused = submit(url, "ct.nii.gz", ct)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert "does not fit this model" in error and "3D volume" in error and "run_anyway" in error
        accepted = submit(url, "ct.nii.gz", ct, run_anyway="true")
        assert accepted.status_code == 202
        job = accepted.json()["job_id"]
        assert wait_done(url, job)["status"] == "done"
        report = httpx.get(f"{url}/v1/jobs/{job}/report", timeout=30, headers=CLIENT).json()
        assert report["run_anyway"] is True and any("3D volume" in p for p in report["compatibility_problems"])
        # A scan that fits is queued without the flag, and its report says nothing was overridden.
        fits = submit(url, "a.png", nuclei_image(datasets_dir, 1).read_bytes())
        assert fits.status_code == 202
        job = fits.json()["job_id"]
        wait_done(url, job)
        report = httpx.get(f"{url}/v1/jobs/{job}/report", timeout=30, headers=CLIENT).json()
        assert report["run_anyway"] is False and report["compatibility_problems"] == []


def test_cli_predict_refuses_unless_run_anyway_and_records_it(fingerprinted_bundle: Path, small_ct: Path,
                                                              datasets_dir: Path,
                                                              tmp_path: Path) -> None:
    ct = small_ct
    out = tmp_path / "pred"
    refused = CliRunner().invoke(app, ["predict", str(fingerprinted_bundle), str(ct), "--out", str(out),
                                       "--device", "cpu"])
    assert refused.exit_code == 1
    assert "does not fit this model" in refused.output and "--run-anyway" in refused.output
    assert not list(out.glob("*_mask.nii.gz"))
    anyway = CliRunner().invoke(app, ["predict", str(fingerprinted_bundle), str(ct), "--out", str(out),
                                      "--device", "cpu", "--run-anyway"])
    assert anyway.exit_code == 0, anyway.output
    assert (out / "ct_mask.nii.gz").is_file()
    record = json.loads((out / "ct_compatibility.json").read_text())
    assert record["run_anyway"] is True and any("3D volume" in p for p in record["problems"])
