"""medseg.io.dicomweb against a real Orthanc (tests/pacs/conftest.py): search with filters and only the asked
attributes, bounded retrieval, and the full round trip query -> retrieve -> segment -> STOW -> query the SEG back
-> read it with highdicom."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from orthanc_server import AUTH_HEADER, PASSWORD, PATIENT_ID, Pacs

from medseg.inference import Predictor
from medseg.inference.dicom_seg import write_dicom_seg
from medseg.io import read_scan
from medseg.io.dicomweb import (
    SERIES_FIELDS,
    STUDY_FIELDS,
    DicomWebError,
    Endpoint,
    SeriesRefusedError,
    find_segs,
    load_endpoints,
    retrieve_series,
    search_series,
    search_studies,
    store_seg,
)


def test_study_search_filters_and_returns_only_asked_attributes(pacs: Pacs) -> None:
    everything = search_studies(pacs.endpoint)
    assert {s["StudyInstanceUID"] for s in everything} >= {pacs.ct.study_uid, pacs.followup.study_uid}
    assert all(set(s) == set(STUDY_FIELDS) for s in everything)
    by_date = search_studies(pacs.endpoint, start=date(2023, 1, 1), end=date(2023, 12, 31))
    assert [s["StudyInstanceUID"] for s in by_date] == [pacs.followup.study_uid]
    assert by_date[0]["StudyDescription"] == "Follow-up chest" and by_date[0]["StudyDate"] == "20230301"
    by_text = search_studies(pacs.endpoint, description="domen C")  # 'contains'
    assert [s["StudyInstanceUID"] for s in by_text] == [pacs.ct.study_uid]
    assert search_studies(pacs.endpoint, modality="MR") == []
    assert len(search_studies(pacs.endpoint, modality="ct")) >= 2
    # Orthanc answers with more than asked (PatientBirthDate, ...); a narrower field list is all that comes back.
    narrow = search_studies(pacs.endpoint, start=date(2023, 1, 1), fields=("StudyInstanceUID", "StudyDate"))
    assert narrow == [{"StudyInstanceUID": pacs.followup.study_uid, "StudyDate": "20230301"}]


def test_series_search(pacs: Pacs) -> None:
    series = search_series(pacs.endpoint, pacs.ct.study_uid)
    assert len(series) == 1 and set(series[0]) == set(SERIES_FIELDS)
    assert series[0]["SeriesInstanceUID"] == pacs.ct.series_uid
    assert series[0]["Modality"] == "CT" and int(series[0]["NumberOfSeriesRelatedInstances"]) == 20
    assert search_series(pacs.endpoint, pacs.ct.study_uid, modality="MR") == []
    with pytest.raises(DicomWebError, match="not a valid DICOM UID"):
        search_series(pacs.endpoint, "../../patients")


def test_retrieved_series_reads_like_the_original_files(pacs: Pacs, datasets_dir: Path, tmp_path: Path) -> None:
    got = retrieve_series(pacs.endpoint, pacs.ct.study_uid, pacs.ct.series_uid, tmp_path / "ct")
    assert len(got.files) == 20 and all(f.name.endswith(".dcm") for f in got.files)
    scan, original = read_scan(tmp_path / "ct"), read_scan(datasets_dir / "dicom_ct_series" / "dicom")
    np.testing.assert_array_equal(scan.array, original.array)
    np.testing.assert_allclose(scan.geometry.origin, original.geometry.origin)
    assert scan.meta["series_uid"] == pacs.ct.series_uid


def test_retrieval_is_bounded(pacs: Pacs, tmp_path: Path) -> None:
    with pytest.raises(SeriesRefusedError, match="more than 5 instances"):
        retrieve_series(pacs.endpoint, pacs.ct.study_uid, pacs.ct.series_uid, tmp_path / "a", max_instances=5)
    with pytest.raises(SeriesRefusedError, match="MB of pixels"):
        retrieve_series(pacs.endpoint, pacs.ct.study_uid, pacs.ct.series_uid, tmp_path / "b", max_bytes=1_000_000)
    assert not list((tmp_path).rglob("*.dcm"))  # refused before anything was written


def test_wrong_credentials_and_unknown_endpoint_are_clear_and_secret_free(pacs: Pacs, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = Endpoint(name="wrong", url=pacs.endpoint.url, auth_header="Basic bm9ib2R5Om5vdGhpbmc=")
    with pytest.raises(DicomWebError, match="HTTP 401.*auth header") as err:
        search_studies(wrong)
    assert "bm9ib2R5" not in str(err.value) and "bm9ib2R5" not in repr(wrong)
    search_studies(pacs.endpoint)
    retrieve_series(pacs.endpoint, pacs.followup.study_uid, pacs.followup.series_uid, tmp_path / "f")
    logged = caplog.text
    assert AUTH_HEADER.split()[1] not in logged and PASSWORD not in logged and PATIENT_ID not in logged


def test_endpoints_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "endpoints.yaml"
    config.write_text("endpoints:\n  - name: main\n    url: https://pacs.example.org/dicom-web/\n"
                      "    auth_header_env: PACS_AUTH\n")
    monkeypatch.setenv("MEDSEG_DICOMWEB_ENDPOINTS", str(config))
    monkeypatch.setenv("PACS_AUTH", "Bearer abc")
    endpoints = load_endpoints()
    assert endpoints["main"].url == "https://pacs.example.org/dicom-web"
    assert endpoints["main"].headers() == {"Authorization": "Bearer abc"}
    config.write_text("endpoints:\n  - name: main\n    url: file:///etc/passwd\n    auth_header: Bearer s3cret\n")
    with pytest.raises(Exception, match="endpoints.yaml: invalid DICOMweb endpoints: endpoints.0.url") as err:
        load_endpoints()
    assert "s3cret" not in str(err.value)


def test_round_trip_segment_store_and_read_back(pacs: Pacs, pacs_predictor: Predictor, tmp_path: Path) -> None:
    study = pacs.followup
    [series] = search_series(pacs.endpoint, study.study_uid, modality="CT")
    retrieve_series(pacs.endpoint, study.study_uid, series["SeriesInstanceUID"], tmp_path / "in")
    scan = read_scan(tmp_path / "in")
    mask = pacs_predictor.predict_scan(scan).mask
    assert mask.shape == (3, 128, 128) and mask.any()
    seg_path = write_dicom_seg(scan, mask, pacs_predictor.labels, tmp_path / "seg.dcm", model_name="tiny",
                               uid_key="job-1")
    sop_uid = store_seg(pacs.endpoint, seg_path)
    seg_series_uid = pydicom.dcmread(seg_path, stop_before_pixels=True).SeriesInstanceUID

    def this_seg() -> list[dict]:  # other tests may have stored SEGs of the same series too
        return [s for s in find_segs(pacs.endpoint, study.study_uid, study.series_uid)
                if s["SeriesInstanceUID"] == seg_series_uid]

    [found] = this_seg()
    assert found["Modality"] == "SEG" and int(found["NumberOfSeriesRelatedInstances"]) == 1
    retrieve_series_of_seg = tmp_path / "seg-back"
    # A SEG is not an image to segment: retrieval refuses it by SOP class.
    with pytest.raises(SeriesRefusedError, match="Segmentation Storage"):
        retrieve_series(pacs.endpoint, study.study_uid, found["SeriesInstanceUID"], retrieve_series_of_seg)
    # Read back over WADO-RS, as a viewer would.
    client = DICOMwebClient(pacs.endpoint.url, headers=pacs.endpoint.headers())
    client.retrieve_instance(study.study_uid, found["SeriesInstanceUID"], sop_uid).save_as(tmp_path / "back.dcm")
    seg = hd.seg.segread(tmp_path / "back.dcm")
    assert seg.SOPInstanceUID == sop_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    referenced = [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(study.sop_uids)
    for z, sop in enumerate(scan.meta["dicom_datasets"]):
        if (mask[z] == 1).any():
            frame = seg.get_pixels_by_source_instance([sop.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
            np.testing.assert_array_equal(frame, mask[z] == 1)

    # Stored again (a retried job, same uid_key): the PACS still holds one SEG for the series.
    again = write_dicom_seg(scan, np.zeros_like(mask) + mask, pacs_predictor.labels, tmp_path / "again.dcm",
                            model_name="tiny", uid_key="job-1")
    assert store_seg(pacs.endpoint, again) == sop_uid
    [found] = this_seg()
    assert int(found["NumberOfSeriesRelatedInstances"]) == 1
