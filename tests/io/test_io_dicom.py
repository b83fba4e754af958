"""DICOM series reading on the shared CT series (20 slices, JPEG 2000 lossless)."""

from __future__ import annotations

import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.errors import ScanReadError
from medseg.io import (
    MissingSlicesError,
    MultipleSeriesError,
    ScanReadWarning,
    is_dicom_folder,
    list_dicom_series,
    read_scan,
    write_mask,
)


@pytest.fixture(scope="module")
def ct_scan(ct_dicom_dir: Path):
    return read_scan(ct_dicom_dir)


def _zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, prefix + f.name)
    return zip_path


def test_ct_series_geometry_and_hounsfield_units(ct_scan) -> None:
    assert ct_scan.array.shape == (20, 512, 512)
    assert ct_scan.is_volume
    np.testing.assert_allclose(ct_scan.geometry.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    np.testing.assert_allclose(ct_scan.geometry.origin, (-249.51171875, -437.51171875, -804.5), atol=1e-4)
    np.testing.assert_allclose(ct_scan.geometry.direction, np.eye(3).ravel(), atol=1e-6)
    # Rescale intercept -1024 applied: values are HU, not raw stored values (which start at 0).
    assert ct_scan.array.dtype in (np.int16, np.float32)
    assert ct_scan.array.min() == -1024
    assert 1000 < ct_scan.array.max() < 4000
    air_fraction = np.mean(ct_scan.array < -900)
    assert air_fraction > 0.2  # the field of view around the abdomen is air
    soft_tissue = ct_scan.array[10, 200:300, 200:300]
    assert -200 < np.median(soft_tissue) < 200
    assert ct_scan.meta["modality"] == "CT"
    assert ct_scan.meta["format"] == "dicom"
    assert ct_scan.source == "dicom"


def test_ct_series_matches_reference_nifti(ct_scan, ct_nifti: Path) -> None:
    reference = read_scan(ct_nifti)
    assert reference.geometry.same_grid(ct_scan.geometry)
    np.testing.assert_array_equal(reference.array, ct_scan.array)


def test_dicom_meta_keeps_ordered_files_and_headers(ct_scan) -> None:
    files = ct_scan.meta["dicom_files"]
    datasets = ct_scan.meta["dicom_datasets"]
    assert len(files) == len(datasets) == 20
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and z[0] == pytest.approx(ct_scan.geometry.origin[2])  # stack order = array order
    assert files[0].name == "IM0020.dcm"  # the lowest slice (instance numbers run head to feet)
    assert all("PixelData" not in ds for ds in datasets)  # headers only
    assert ct_scan.meta["slice_positions_mm"] == pytest.approx(z)


def test_list_of_files_in_any_order_reads_the_same_volume(ct_scan, ct_dicom_dir: Path) -> None:
    files = sorted(ct_dicom_dir.glob("*.dcm"))
    random.Random(0).shuffle(files)
    scan = read_scan(files)
    np.testing.assert_array_equal(scan.array, ct_scan.array)
    assert scan.geometry.same_grid(ct_scan.geometry)


def test_zip_of_series_reads_like_the_folder_and_leaves_no_temp_files(
    ct_scan, ct_dicom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _zip_folder(ct_dicom_dir, tmp_path / "series.zip", prefix="exam/")
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    scan = read_scan(archive)
    np.testing.assert_array_equal(scan.array, ct_scan.array)
    assert scan.geometry.same_grid(ct_scan.geometry)
    assert scan.source == "series.zip" and scan.meta["archive"] == "series.zip"
    # Paths into the (deleted) extraction folder would dangle; member paths and headers stay meaningful.
    assert scan.meta["dicom_files"][0] == Path("exam/IM0020.dcm")
    assert len(scan.meta["dicom_datasets"]) == 20
    assert list(temp_root.iterdir()) == []


def test_single_dicom_file_is_a_2d_scan(ct_dicom_dir: Path) -> None:
    scan = read_scan(ct_dicom_dir / "IM0005.dcm")
    assert scan.array.shape == (512, 512) and not scan.is_volume
    np.testing.assert_allclose(scan.geometry.spacing, (0.9765625, 0.9765625))
    assert scan.array.min() == -1024


def test_missing_slice_is_an_error_unless_allowed(ct_copy: Path) -> None:
    """Issue 15: a series with a gap was segmented at an averaged spacing, the mask shifted, with exit 0."""
    (ct_copy / "IM0010.dcm").unlink()
    with pytest.raises(MissingSlicesError, match=r"^ct: missing slices: about 1 slice\(s\) absent \(gaps of 4\.00 mm"):
        read_scan(ct_copy)
    with pytest.warns(ScanReadWarning, match="missing slices") as record:
        scan = read_scan(ct_copy, allow_missing_slices=True)
    assert scan.array.shape[0] == 19
    assert "4.00 mm" in str(record[0].message)  # the gap is named, against the 2 mm spacing


def test_non_uniform_slice_spacing_warns(tmp_path: Path, rewrite_series) -> None:
    def shift_one_slice(i: int, ds: pydicom.Dataset) -> None:
        if i == 7:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.6]

    rewrite_series(tmp_path / "uneven", edit=shift_one_slice)
    with pytest.warns(ScanReadWarning, match="non-uniform slice spacing"):
        read_scan(tmp_path / "uneven")


def test_two_series_are_listed_and_chosen(tmp_path: Path, ct_dicom_dir: Path, rewrite_series) -> None:
    folder = tmp_path / "two"
    shutil.copytree(ct_dicom_dir, folder)

    def name_patient(i: int, ds: pydicom.Dataset) -> None:
        ds.PatientName = "DOE^JANE"
        ds.PatientID = "PID-12345"
        ds.RescaleIntercept = -1000  # distinguishable pixel values

    copies = rewrite_series(folder, description="second series", edit=name_patient)
    new_uid = pydicom.dcmread(copies[0], stop_before_pixels=True).SeriesInstanceUID

    infos = list_dicom_series(folder)
    assert sorted(i.uid for i in infos) == ["", new_uid]
    assert all(i.num_slices == 20 and i.size == (512, 512) and i.modality == "CT" for i in infos)
    for info in infos:
        assert "DOE" not in repr(info) + str(info) and "PID-12345" not in repr(info) + str(info)

    with pytest.raises(MultipleSeriesError, match="2 DICOM series found") as exc:
        read_scan(folder)
    assert new_uid in str(exc.value) and "second series" in str(exc.value)
    assert "DOE" not in str(exc.value)
    assert {i.uid for i in exc.value.series} == {"", new_uid}

    chosen = read_scan(folder, series_uid=new_uid)
    assert chosen.meta["series_uid"] == new_uid and chosen.array.shape == (20, 512, 512)
    assert chosen.array.min() == -1000
    assert "DOE" not in repr(chosen)
    original = read_scan(folder, series_uid="")
    assert original.array.min() == -1024
    with pytest.raises(ScanReadError, match="no DICOM series with SeriesInstanceUID '1.2.3'"):
        read_scan(folder, series_uid="1.2.3")


def test_truncated_slice_names_the_file(ct_copy: Path) -> None:
    victim = ct_copy / "IM0004.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ScanReadError, match=r"ct: IM0004\.dcm is truncated"):
        read_scan(ct_copy)


def test_unreadable_slice_is_an_error_unless_allowed(ct_copy: Path) -> None:
    """Issue 15: a series with one unreadable slice was segmented as 19 slices at an averaged spacing."""
    (ct_copy / "IM0010.dcm").write_bytes(b"garbage" * 20)
    with pytest.raises(MissingSlicesError, match=r"^ct: 1 \.dcm file\(s\) could not be parsed \(e\.g\. IM0010\.dcm\)"):
        read_scan(ct_copy)
    with pytest.warns(ScanReadWarning, match=r"1 \.dcm file\(s\) could not be parsed .*IM0010\.dcm"):
        scan = read_scan(ct_copy, allow_missing_slices=True)
    assert scan.array.shape == (19, 512, 512)


def test_empty_and_non_dicom_folders_give_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScanReadError, match="empty: folder is empty"):
        read_scan(empty)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a scan")
    (notes / "broken.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(ScanReadError, match=r"notes: no DICOM series or image file found .*broken\.dcm"):
        read_scan(notes)
    assert list_dicom_series(notes) == []
    assert not is_dicom_folder(notes)
    with pytest.raises(ScanReadError, match="missing: no such file or folder"):
        read_scan(tmp_path / "missing")


def test_dicom_mask_is_written_as_nifti_on_the_series_grid(ct_scan, tmp_path: Path) -> None:
    mask = (ct_scan.array > 300).astype(np.uint8)
    out = write_mask(mask, ct_scan, tmp_path / "bone.nii.gz")
    back = read_scan(out)
    assert back.geometry.same_grid(ct_scan.geometry)
    np.testing.assert_array_equal(back.array, mask)


@pytest.mark.parametrize("stored, slope, intercept", [("uint16", 1.0, -1024.0), ("int16", 1.0, 0.0),
                                                       ("int16", 0.5, -1000.0)])
def test_uncompressed_series_decoded_by_numpy_equals_gdcm(uncompressed_series, tmp_path: Path, monkeypatch,
                                                          stored, slope, intercept) -> None:
    """Uncompressed slices are decoded by the pydicom read that checks them (each file's pixels read once);
    the result must be what SimpleITK/GDCM gives: same values, dtype and geometry."""
    import SimpleITK as sitk

    from medseg.io import dicom

    files = uncompressed_series(tmp_path / "s", stored=stored, slope=slope, intercept=intercept, repeat=2)
    gdcm_calls = []
    real_reader = dicom.sitk.ImageSeriesReader
    monkeypatch.setattr(dicom.sitk, "ImageSeriesReader", lambda: gdcm_calls.append(1) or real_reader())
    scan = read_scan(tmp_path / "s")
    assert not gdcm_calls, "an uncompressed series went through GDCM"
    assert sorted(scan.meta["dicom_files"]) == sorted(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in scan.meta["dicom_files"]])  # stack order (ascending along the normal)
    if slope != 1.0:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    reference = reader.Execute()
    np.testing.assert_array_equal(scan.array, sitk.GetArrayFromImage(reference))
    assert scan.array.dtype == sitk.GetArrayFromImage(reference).dtype
    np.testing.assert_allclose(scan.geometry.spacing, reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(scan.geometry.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(scan.geometry.direction, reference.GetDirection(), atol=1e-6)
    assert scan.array.shape == (40, 512, 512) and scan.meta["modality"] == "CT"


def test_truncated_uncompressed_slice_is_named(uncompressed_series, tmp_path: Path) -> None:
    files = uncompressed_series(tmp_path / "s")
    data = files[7].read_bytes()
    files[7].write_bytes(data[: len(data) - 5000])
    with pytest.raises(ScanReadError, match=files[7].name):
        read_scan(tmp_path / "s")


@pytest.mark.parametrize(("header", "shown"), [
    ({"SeriesDate": "20221208", "SeriesTime": "140539.425000"}, "2022-12-08 14:05:39"),
    ({"SeriesDate": "20221208", "SeriesTime": "1405"}, "2022-12-08 14:05"),
    ({"SeriesDate": "20221208"}, "2022-12-08"),
    ({"SeriesDate": "2022.12.08", "SeriesTime": "14:05:39"}, "2022-12-08 14:05:39"),  # ACR-NEMA spellings
    ({"StudyDate": "20210301", "StudyTime": "081500"}, "2021-03-01 08:15:00"),  # no series date: the study's
    ({"SeriesDate": "20221208", "StudyDate": "20210301", "StudyTime": "081500"}, "2022-12-08"),  # never mixed
    ({"SeriesDate": "20221332", "SeriesTime": "250000", "StudyDate": "20210301"}, "2021-03-01"),  # invalid: skipped
    ({"SeriesDate": "yesterday"}, ""),
    ({}, ""),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the damaged values are the point
def test_series_date_and_time_are_formatted_for_the_series_picker(header: dict, shown: str) -> None:
    from medseg.io.dicom import series_datetime

    ds = pydicom.Dataset()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    assert series_datetime(ds) == shown


def test_listed_series_carry_their_acquisition_date(ct_dicom_dir: Path) -> None:
    [info] = list_dicom_series(ct_dicom_dir)
    assert info.acquired == "2022-12-08 14:05:39"  # SeriesDate 20221208, SeriesTime 140539.425 in the shared CT
