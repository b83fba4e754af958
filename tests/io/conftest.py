"""Fixtures for scan I/O tests: paths into the shared datasets and small DICOM-series builders."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid


@pytest.fixture(scope="session")
def ct_dicom_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "dicom_ct_series" / "dicom"


@pytest.fixture(scope="session")
def ct_nifti(datasets_dir: Path) -> Path:
    return datasets_dir / "dicom_ct_series" / "images" / "ct.nii.gz"


@pytest.fixture(scope="session")
def hippo_image(datasets_dir: Path) -> Path:
    return datasets_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="session")
def hippo_mask(datasets_dir: Path) -> Path:
    return datasets_dir / "msd_hippocampus" / "masks" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="session")
def dsb_gray(datasets_dir: Path) -> Path:
    return datasets_dir / "dsb2018_nuclei" / "images" / "000_00071198d059.png"


@pytest.fixture(scope="session")
def dsb_gray_mask(datasets_dir: Path) -> Path:
    return datasets_dir / "dsb2018_nuclei" / "masks" / "000_00071198d059.png"


@pytest.fixture(scope="session")
def dsb_rgb(datasets_dir: Path) -> Path:
    return datasets_dir / "dsb2018_nuclei" / "images" / "002_00ae65c1c663.png"


@pytest.fixture
def ct_copy(ct_dicom_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the CT series folder."""
    dest = tmp_path / "ct"
    shutil.copytree(ct_dicom_dir, dest)
    return dest


@pytest.fixture
def rewrite_series(ct_dicom_dir: Path) -> Callable[..., list[Path]]:
    """Copy the CT series into ``dest`` as a new series: fresh Series/SOP Instance UIDs, edits applied per file.

    ``edit(index, dataset)`` may change any header field (index follows the sorted file names).
    """

    def make(
        dest: Path, *, description: str = "copy", edit: Callable[[int, pydicom.Dataset], None] | None = None
    ):
        dest.mkdir(parents=True, exist_ok=True)
        series_uid = generate_uid()
        written = []
        for i, src in enumerate(sorted(ct_dicom_dir.glob("*.dcm"))):
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesDescription = description
            if edit is not None:
                edit(i, ds)
            out = dest / f"copy_{src.name}"
            ds.save_as(out)
            written.append(out)
        return written

    return make


@pytest.fixture
def uncompressed_series(ct_dicom_dir: Path) -> Callable[..., list[Path]]:
    """The CT series re-encoded uncompressed (Explicit VR Little Endian) with its real headers:
    ``make(dest, stored=..., slope=..., intercept=..., repeat=1)``. ``stored``: ``"int16"`` (signed, HU - intercept)
    or ``"uint16"`` (12-bit unsigned, the common CT export); ``repeat`` stacks the series several times along
    the normal (a longer volume with the same spacing)."""
    import numpy as np
    import SimpleITK as sitk

    def make(dest: Path, *, stored: str = "uint16", slope: float = 1.0, intercept: float = -1024.0,
             repeat: int = 1) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        sources = sorted(ct_dicom_dir.glob("*.dcm"))
        hu = sitk.GetArrayFromImage(sitk.ReadImage([str(p) for p in sources]))  # (z, y, x) HU, ascending z
        series_uid = generate_uid()
        spacing = 2.0
        written = []
        for r in range(repeat):
            for i, src in enumerate(sources):
                ds = pydicom.dcmread(src)
                values = np.round((hu[i].astype(np.float64) - intercept) / slope)
                if stored == "uint16":
                    pixels, bits, rep = np.clip(values, 0, 4095).astype(np.uint16), 12, 0
                else:
                    pixels, bits, rep = np.clip(values, -32768, 32767).astype(np.int16), 16, 1
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, rep
                ds.PixelData = pixels.tobytes()
                ds["PixelData"].VR = "OW"
                ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
                k = r * len(sources) + i
                position = [float(v) for v in ds.ImagePositionPatient]
                ds.ImagePositionPatient = [position[0], position[1], position[2] + r * len(sources) * spacing]
                ds.SeriesInstanceUID = series_uid
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = k + 1
                out = dest / f"slice_{k:04d}.dcm"
                ds.save_as(out, enforce_file_format=True)
                written.append(out)
        return written

    return make
