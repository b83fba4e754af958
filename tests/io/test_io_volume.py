"""NIfTI / NRRD / MetaImage reading and geometry round trips (MSD hippocampus, 3D NIfTI in RAS)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import ScanReadError, UnsupportedFormatError
from medseg.io import ScanReadWarning, read_mask, read_scan, write_mask


def _nifti_header(path: Path) -> dict[str, np.ndarray | str]:
    """The header fields a viewer places voxels with (sform rows and transform codes)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    out: dict[str, np.ndarray | str] = {
        f"srow_{a}": np.array(reader.GetMetaData(f"srow_{a}").split(), dtype=float) for a in "xyz"
    }
    out["sform_code"] = reader.GetMetaData("sform_code")
    out["qform_code"] = reader.GetMetaData("qform_code")
    return out


def test_hippocampus_mask_round_trip_keeps_geometry(
    hippo_image: Path, hippo_mask: Path, tmp_path: Path
) -> None:
    image = read_scan(hippo_image)
    assert image.array.shape == image.geometry.size and image.is_volume
    # RAS on disk -> LPS in ITK: the direction carries the flip, the array is untouched.
    np.testing.assert_allclose(image.geometry.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    mask = read_mask(hippo_mask)
    assert set(np.unique(mask.array)) == {0, 1, 2} and mask.array.dtype == np.uint8

    out = write_mask(mask.array, image, tmp_path / "pred.nii.gz")
    back = read_scan(out)
    assert back.geometry.same_grid(image.geometry, atol=1e-6)
    assert back.geometry.size == image.geometry.size
    np.testing.assert_array_equal(back.array, mask.array)
    # Viewer-equivalent: the affine a viewer uses (sform) is the source's.
    written, source = _nifti_header(out), _nifti_header(hippo_image)
    for key in ("srow_x", "srow_y", "srow_z"):
        np.testing.assert_allclose(written[key], source[key], atol=1e-5)
    assert written["sform_code"] != "0"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_mask_round_trip_in_other_volume_formats(hippo_image: Path, suffix: str, tmp_path: Path) -> None:
    image = read_scan(hippo_image)
    labels = (image.array > np.percentile(image.array, 90)).astype(np.uint8) * 2
    back = read_scan(write_mask(labels, image, tmp_path / f"m{suffix}"))
    assert back.geometry.same_grid(image.geometry, atol=1e-6)
    np.testing.assert_array_equal(back.array, labels)


def test_2d_nifti_is_read_as_2d(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.arange(12, dtype=np.float32).reshape(3, 4))
    image.SetSpacing((0.5, 0.7))
    sitk.WriteImage(image, str(tmp_path / "slice.nii.gz"))
    scan = read_scan(tmp_path / "slice.nii.gz")
    assert scan.array.shape == (3, 4) and not scan.is_volume
    assert scan.geometry.spacing == pytest.approx((0.5, 0.7))


def test_4d_nifti_is_unsupported_and_names_file_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False), str(path))
    with pytest.raises(UnsupportedFormatError, match=r"fmri\.nii\.gz: 4D image of shape \(3, 4, 5, 6\)"):
        read_scan(path)


def test_4d_nifti_with_single_timepoint_is_read_as_3d(tmp_path: Path) -> None:
    path = tmp_path / "one_frame.nii.gz"
    data = np.random.default_rng(0).random((1, 4, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=False), str(path))
    scan = read_scan(path)
    assert scan.array.shape == (4, 5, 6)
    np.testing.assert_array_equal(scan.array, data[0])


def test_vector_volume_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "field.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True), str(path))
    with pytest.raises(UnsupportedFormatError, match=r"field\.nii\.gz: vector volume \(3 components"):
        read_scan(path)


@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_nifti_is_a_scan_read_error(hippo_image: Path, tmp_path: Path, compressed: bool) -> None:
    # SimpleITK alone would return the volume with zeros where data is missing.
    source = read_scan(hippo_image)
    full = tmp_path / ("full.nii.gz" if compressed else "full.nii")
    sitk.WriteImage(sitk.GetImageFromArray(source.array), str(full))
    cut = tmp_path / ("cut.nii.gz" if compressed else "cut.nii")
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ScanReadError, match=r"cut\.nii(\.gz)?: truncated NIfTI file"):
        read_scan(cut)


def test_garbage_file_with_volume_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ScanReadError, match=r"^scan\.nii\.gz: not a readable nifti file") as exc:
        read_scan(path)
    assert str(tmp_path) not in str(exc.value)  # base names only, never directories


def test_voxel_cap_stops_before_decoding(hippo_image: Path) -> None:
    with pytest.raises(
        ScanReadError, match=r"hippocampus_001\.nii\.gz: header announces 62,475 samples .* cap of 1,000"
    ):
        read_scan(hippo_image, max_voxels=1000)


def test_non_finite_voxels_are_filled_with_a_warning(tmp_path: Path) -> None:
    # MetaImage keeps NaN as stored (ITK's NIfTI reader already turns NaN into 0 by itself).
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5) + 10
    data[0, 0, :2] = np.nan
    data[2, 3, 4] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "nan.mha"))
    with pytest.warns(ScanReadWarning, match=r"nan\.mha: 3 non-finite voxels"):
        scan = read_scan(tmp_path / "nan.mha")
    assert np.isfinite(scan.array).all()
    assert scan.array[0, 0, 0] == pytest.approx(12.0)  # the minimum finite value
    assert scan.meta["nonfinite_voxels_filled"] == 3

    sitk.WriteImage(
        sitk.GetImageFromArray(np.full((2, 2, 2), np.nan, np.float32)), str(tmp_path / "allnan.mha")
    )
    with pytest.raises(ScanReadError, match=r"allnan\.mha: every voxel is NaN"):
        read_scan(tmp_path / "allnan.mha")


def _mha_with_header_edit(tmp_path: Path, name: str, old: str, new: str) -> Path:
    src = tmp_path / "src.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 3, 4), np.float32)), str(src))
    data = src.read_bytes()
    assert old.encode() in data
    out = tmp_path / name
    out.write_bytes(data.replace(old.encode(), new.encode(), 1))
    return out


def test_zero_spacing_in_header_is_a_clear_error(tmp_path: Path) -> None:
    path = _mha_with_header_edit(tmp_path, "flat.mha", "ElementSpacing = 1 1 1", "ElementSpacing = 0 1 1")
    with pytest.raises(ScanReadError, match=r"^flat\.mha: .*spacing"):
        read_scan(path)


def test_zero_pixdim_in_nifti_is_fixed_up_by_simpleitk(tmp_path: Path) -> None:
    # Documented fix-up: ITK's NIfTI reader treats pixdim 0 as 1 mm; the result is never a zero spacing.
    path = tmp_path / "p.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 3, 4), np.float32)), str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, 80, 0.0)  # pixdim[1]
    path.write_bytes(bytes(raw))
    assert all(s > 0 for s in read_scan(path).geometry.spacing)


def test_metaimage_data_file_must_sit_beside_the_header(tmp_path: Path) -> None:
    path = _mha_with_header_edit(
        tmp_path, "leak.mhd", "ElementDataFile = LOCAL", "ElementDataFile = /etc/hostname"
    )
    with pytest.raises(
        UnsupportedFormatError, match=r"leak\.mhd: header points its voxel data at 'hostname'"
    ):
        read_scan(path)
    # A normal .mhd + .raw pair is fine.
    pair = tmp_path / "pair.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)), str(pair))
    assert read_scan(pair).array.sum() == sum(range(24))


def test_unknown_file_type(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4")
    with pytest.raises(UnsupportedFormatError, match=r"report\.pdf: unsupported file type '\.pdf'"):
        read_scan(path)
