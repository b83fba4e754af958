"""DICOM SEG from the real CT series (JPEG 2000, empty Study/Series/SOP Instance UIDs), read back by highdicom;
de-identification with consistent UID remapping."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medseg.inference.deidentify import deidentify_file, ensure_uids
from medseg.inference.dicom_seg import DicomSegError, write_dicom_seg
from medseg.inference.outputs import ModelStamp, write_prediction_outputs
from medseg.inference.predictor import Prediction
from medseg.io import Geometry, Scan, read_scan

LABELS = {0: {"name": "background", "color": "#000000"}, 1: {"name": "bone", "color": "#ff0000"},
          3: {"name": "box", "color": "#00ff00"}}  # non-consecutive label index: segment numbers must be 1, 2
TINY = ModelStamp("tiny", "0123abcd")


@pytest.fixture(scope="module")
def ct(ct_dicom_dir: Path) -> Scan:
    return read_scan(ct_dicom_dir)


def _mask(scan: Scan) -> np.ndarray:
    mask = (scan.array > 300).astype(np.uint8)  # bone-ish
    mask[:4] = 0
    mask[8:11, 200:240, 150:200] = 3
    return mask


def _frames(seg: hd.seg.Segmentation, sop_uid: str, segment: int) -> np.ndarray:
    return seg.get_pixels_by_source_instance([sop_uid], segment_numbers=[segment])[0, ..., 0]


def test_seg_reads_back_with_frames_references_and_pixels(ct: Scan, tmp_path: Path) -> None:
    assert ct.meta["dicom_datasets"][0].SOPInstanceUID == ""  # the shared series really lacks UIDs
    mask = _mask(ct)
    path = write_dicom_seg(ct, mask, LABELS, tmp_path / "seg.dcm", model_name="tiny", model_version="abc123")
    seg = hd.seg.segread(path)
    # BINARY SEG, empty frames omitted: one frame per (slice, segment) with voxels.
    expected = sum(int((mask[z] == label).any()) for label in (1, 3) for z in range(mask.shape[0]))
    assert int(seg.NumberOfFrames) == expected
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["bone", "box"]
    sources = ensure_uids(ct.meta["dicom_datasets"])
    source_uids = [ds.SOPInstanceUID for ds in sources]
    # The empty SOP Instance UIDs came from the file meta; Study/Series were derived and are valid.
    assert source_uids == [pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                           for f in ct.meta["dicom_files"]]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.StudyInstanceUID.startswith("2.25.")
    referenced = [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(source_uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    for z in (5, 9):  # frames land on the right source images
        np.testing.assert_array_equal(_frames(seg, source_uids[z], 1), mask[z] == 1)
        np.testing.assert_array_equal(_frames(seg, source_uids[z], 2), mask[z] == 3)
    assert "Research use only" in seg.SeriesDescription and "Research use only" in seg.ContentDescription
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "tiny"
    # Deterministic: the same input, mask and model give the same UIDs.
    again = hd.seg.segread(write_dicom_seg(ct, mask, LABELS, tmp_path / "again.dcm", model_name="tiny",
                                           model_version="abc123"))
    assert again.SOPInstanceUID == seg.SOPInstanceUID and again.StudyInstanceUID == seg.StudyInstanceUID


def test_anonymize_removes_identifiers_and_keeps_references_consistent(ct_dicom_dir: Path, tmp_path: Path) -> None:
    # A copy of the series with identifiers filled in (the shared files have them empty).
    named = tmp_path / "named"
    named.mkdir()
    for f in sorted(ct_dicom_dir.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-778899", "19610203"
        ds.InstitutionName, ds.AccessionNumber = "St Elsewhere Hospital", "ACC-5566"
        ds.save_as(named / f.name)
    scan = read_scan(named)
    mask = _mask(scan)
    path = write_dicom_seg(scan, mask, LABELS, tmp_path / "anon.dcm", anonymize=True, salt="site-secret")
    raw = path.read_bytes()
    for secret in (b"Doe^Jane", b"PID-778899", b"19610203", b"St Elsewhere", b"ACC-5566", b"PETCT2", b"Basel"):
        assert secret not in raw, secret
    originals = ensure_uids(scan.meta["dicom_datasets"])
    for uid in {originals[0].StudyInstanceUID, originals[0].SeriesInstanceUID, originals[0].SOPInstanceUID,
                originals[0].FrameOfReferenceUID}:
        assert uid.encode() not in raw
    seg = hd.seg.segread(path)
    assert seg.PatientIdentityRemoved == "YES" and str(seg.PatientName) == "ANONYMOUS"
    assert seg.PatientBirthDate == ""
    # The source files de-identified with the same salt carry exactly the UIDs the SEG references.
    anon_dir = tmp_path / "anon_series"
    anon = [pydicom.dcmread(deidentify_file(f, anon_dir / f.name, salt="site-secret"))
            for f in scan.meta["dicom_files"]]
    assert all(str(ds.PatientName) == "ANONYMOUS" and "InstitutionName" not in ds for ds in anon)
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in anon}
    assert seg.StudyInstanceUID == anon[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == anon[0].FrameOfReferenceUID
    assert anon[0].file_meta.MediaStorageSOPInstanceUID == anon[0].SOPInstanceUID
    # The de-identified copies still decode (pixel data copied untouched) and read as the same volume.
    np.testing.assert_array_equal(read_scan(anon_dir).array, scan.array)


def test_prediction_outputs_write_seg_only_for_dicom(ct: Scan, tmp_path: Path) -> None:
    mask = _mask(ct)
    probs = np.stack([1.0 - mask.clip(0, 1), mask.clip(0, 1)]).astype(np.float32)
    pred = Prediction(probs, mask, np.zeros(mask.shape, np.float32), ct.geometry)
    written = write_prediction_outputs(ct, pred, LABELS, tmp_path, "ct", label_map={0: 0, 1: 1}, model=TINY,
                                       dicom_seg=True)
    assert written["dicom_seg"].name == "ct_seg.dcm" and written["mask"].name == "ct_mask.nii.gz"
    assert int(hd.seg.segread(written["dicom_seg"]).NumberOfFrames) > 0
    png = Scan(np.zeros((8, 9), np.uint8), Geometry.identity((8, 9)), "x.png")
    flat = Prediction(np.zeros((2, 8, 9), np.float32), np.zeros((8, 9), np.uint8), np.zeros((8, 9), np.float32),
                      png.geometry)
    assert "dicom_seg" not in write_prediction_outputs(png, flat, LABELS, tmp_path, "png", label_map={0: 0, 1: 1},
                                                 model=TINY, dicom_seg=True)
    with pytest.raises(DicomSegError, match="x.png: DICOM SEG needs a DICOM input"):
        write_dicom_seg(png, flat.mask, LABELS, tmp_path / "no.dcm")


def test_single_file_copy_keeps_pixel_data(ct_dicom_dir: Path, tmp_path: Path) -> None:
    src = sorted(ct_dicom_dir.iterdir())[0]
    shutil.copy(src, tmp_path / src.name)
    out = deidentify_file(tmp_path / src.name, tmp_path / "out" / "a.dcm")
    assert pydicom.dcmread(out).PixelData == pydicom.dcmread(src).PixelData
