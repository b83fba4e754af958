"""The inference service's DICOMweb job source, through its HTTP API against the real Orthanc: a job names a
configured endpoint and a series, the service retrieves, segments and stores the SEG back itself."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pytest
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from orthanc_server import AUTH_HEADER, PATIENT_ID, PATIENT_NAME, Pacs

from medseg.io import read_scan
from medseg.io.dicomweb import retrieve_series, search_series

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # the service tests' helpers
from service_support import wait_finished  # noqa: E402

CLIENT = {"X-Medseg-Client": "tests"}


def _submit(service: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{service}/v1/segment/dicomweb", json=body, headers=CLIENT, timeout=120)


def _seg_series(pacs: Pacs, study_uid: str, seg_series_uid: str) -> list[dict[str, Any]]:
    return [s for s in search_series(pacs.endpoint, study_uid, modality="SEG")
            if s["SeriesInstanceUID"] == seg_series_uid]


def _stack_order(pacs: Pacs, tmp_path: Path) -> list[str]:
    """The follow-up series' SOP Instance UIDs in the scan's z order (what the mask's slices follow)."""
    retrieve_series(pacs.endpoint, pacs.followup.study_uid, pacs.followup.series_uid, tmp_path / "source")
    return [ds.SOPInstanceUID for ds in read_scan(tmp_path / "source").meta["dicom_datasets"]]


def test_job_from_pacs_segments_and_stores_the_seg_back(pacs: Pacs, pacs_service: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert httpx.get(f"{pacs_service}/v1/dicomweb/endpoints").json() == {"endpoints": ["test-pacs"]}
    study = pacs.followup
    submitted = _submit(pacs_service, endpoint="test-pacs", study_uid=study.study_uid, series_uid=study.series_uid,
                        store_back=True)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    status = wait_finished(pacs_service, job_id)
    assert status["status"] == "done", status
    source = status["pacs"]
    assert source["stored"] and source["store_error"] is None and source["series_uid"] == study.series_uid

    # The SEG in the PACS is the job's SEG, references the source series, and its frames are the job's mask.
    [stored] = _seg_series(pacs, study.study_uid, source["seg_series_uid"])
    assert int(stored["NumberOfSeriesRelatedInstances"]) == 1
    client = DICOMwebClient(pacs.endpoint.url, headers=pacs.endpoint.headers())
    client.retrieve_instance(study.study_uid, source["seg_series_uid"], source["seg_sop_uid"]).save_as(
        tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    (tmp_path / "mask.nii.gz").write_bytes(httpx.get(f"{pacs_service}/v1/jobs/{job_id}/mask").content)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz")))
    assert mask.shape == (3, 128, 128) and mask.any()
    per_slice = [seg.get_pixels_by_source_instance([sop], segment_numbers=[1], assert_missing_frames_are_empty=True,
                                                   ignore_spatial_locations=True)[0, ..., 0]
                 for sop in _stack_order(pacs, tmp_path)]
    np.testing.assert_array_equal(np.stack(per_slice), mask == 1)

    # Stored again on request (a clinician's confirmation, or a retry): still one SEG instance for this job.
    again = httpx.post(f"{pacs_service}/v1/jobs/{job_id}/store", headers=CLIENT, timeout=60)
    assert again.status_code == 200 and again.json()["pacs"]["seg_sop_uid"] == source["seg_sop_uid"]
    [stored] = _seg_series(pacs, study.study_uid, source["seg_series_uid"])
    assert int(stored["NumberOfSeriesRelatedInstances"]) == 1

    logged = caplog.text
    assert AUTH_HEADER.split()[1] not in logged and PATIENT_ID not in logged and PATIENT_NAME not in logged


def test_without_store_back_nothing_is_stored(pacs: Pacs, pacs_service: str) -> None:
    study = pacs.followup
    before = {s["SeriesInstanceUID"] for s in search_series(pacs.endpoint, study.study_uid, modality="SEG")}
    job_id = _submit(pacs_service, endpoint="test-pacs", study_uid=study.study_uid,
                     series_uid=study.series_uid).json()["job_id"]
    status = wait_finished(pacs_service, job_id)
    assert status["status"] == "done" and not status["pacs"]["stored"]
    after = {s["SeriesInstanceUID"] for s in search_series(pacs.endpoint, study.study_uid, modality="SEG")}
    assert after == before
    seg = httpx.get(f"{pacs_service}/v1/jobs/{job_id}/mask", params={"format": "dicom-seg"})
    assert seg.status_code == 200  # the SEG is there to fetch; storing it is the client's decision


def test_clients_name_endpoints_never_urls(pacs: Pacs, pacs_service: str) -> None:
    study = pacs.followup
    for name in ("elsewhere", pacs.endpoint.url, "http://169.254.169.254/latest"):
        answer = _submit(pacs_service, endpoint=name, study_uid=study.study_uid, series_uid=study.series_uid)
        assert answer.status_code == 404 and "configured: test-pacs" in answer.json()["error"]
    bad_uid = _submit(pacs_service, endpoint="test-pacs", study_uid="1.2/../../x", series_uid=study.series_uid)
    assert bad_uid.status_code == 422 and "not a valid DICOM UID" in bad_uid.json()["error"]
    extra = _submit(pacs_service, endpoint="test-pacs", study_uid=study.study_uid, series_uid=study.series_uid,
                    url="http://elsewhere/dicom-web")
    assert extra.status_code == 422  # unknown fields are refused, not ignored


def test_non_image_series_and_missing_series_are_refused(pacs: Pacs, pacs_service: str) -> None:
    study = pacs.followup
    seg_series = search_series(pacs.endpoint, study.study_uid, modality="SEG")
    assert seg_series, "an earlier test stored a SEG"
    refused = _submit(pacs_service, endpoint="test-pacs", study_uid=study.study_uid,
                      series_uid=seg_series[0]["SeriesInstanceUID"])
    assert refused.status_code == 422 and "not images" in refused.json()["error"]
    missing = _submit(pacs_service, endpoint="test-pacs", study_uid=study.study_uid, series_uid="1.2.3.4.5")
    assert missing.status_code == 502 and "not found" in missing.json()["error"]
