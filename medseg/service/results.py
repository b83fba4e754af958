"""The files a finished job serves: mask (NIfTI always, PNG for 2D, DICOM SEG for DICOM input), uncertainty
(NIfTI; .npz made on request) and the measurement report — all on the input scan's grid.

Masks are written by the one prediction writer (`medseg.inference.outputs.write_mask_file`), in both value
conventions: class indices (default, 0 = background, 1.. as in ``GET /v1/models`` labels) and the dataset's raw
label values (``?values=raw``), byte for byte what ``medseg predict`` and the app write.
"""

from __future__ import annotations

import io
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError, ScanReadError
from medseg.inference.outputs import MaskValues, ModelStamp, write_mask_file, write_uncertainty
from medseg.inference.postprocess import measure
from medseg.io import Geometry, Scan

# NIfTI-1 stores each dimension as a 16-bit integer: a scan with a longer side cannot get its mask file.
MAX_SIDE = 32767

MASK_DICOM_SEG = "mask_seg.dcm"
UNCERTAINTY_NIFTI = "uncertainty.nii.gz"
REPORT = "report.json"


def check_result_shape(name: str, shape: tuple[int, ...]) -> None:
    """Refuse, from the header, a scan whose mask could not be written (``ScanReadError``, one line)."""
    if any(side > MAX_SIDE for side in shape):
        raise ScanReadError(
            f"{name}: {' x '.join(f'{s:,}' for s in shape)} pixels; a side longer than {MAX_SIDE:,} cannot be "
            "written as a NIfTI mask (crop or downsample the image)"
        )


class MaskFormat(StrEnum):
    nifti = "nifti"
    png = "png"
    dicom_seg = "dicom-seg"


def mask_file(values: MaskValues | str, fmt: MaskFormat) -> str:
    """The job folder's file name for a mask in ``values`` and ``fmt`` (NIfTI or PNG)."""
    return f"mask_{MaskValues(values)}{'.png' if fmt == MaskFormat.png else '.nii.gz'}"


class UncertaintyFormat(StrEnum):
    nifti = "nifti"
    npz = "npz"


def write_results(
    folder: Path,
    scan: Scan,
    mask: np.ndarray,
    uncertainty: np.ndarray,
    labels: dict[int, dict[str, str]],
    info: dict[str, Any],
    *,
    label_map: dict[int, int],
    anonymize: bool = False,
    salt: str = "",
    uid_key: str | None = None,
) -> dict[str, Path]:
    """Write a job's result files into ``folder``; ``info`` (model, hashes, options) goes into the report.
    Masks are written in both value conventions (``label_map``: raw value -> class).

    ``anonymize``: the DICOM SEG is de-identified (``medseg.inference.deidentify``; UIDs hashed with ``salt``).
    ``uid_key``: the SEG's UIDs derive from it (a job id), see ``write_dicom_seg``. Every file is made ``0600`` (the folder is ``0700``): a mask of a DICOM input carries patient data."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    model = ModelStamp(str(info.get("model", "medseg")), str(info.get("weights_hash", "")))
    formats = [MaskFormat.nifti] if scan.is_volume else [MaskFormat.nifti, MaskFormat.png]
    written = {
        f"mask_{values}_{fmt}": write_mask_file(mask, scan, folder / mask_file(values, fmt), label_map=label_map,
                                                model=model, values=values)
        for values in MaskValues for fmt in formats
    }
    dicom_seg_error = None
    if scan.meta.get("format") == "dicom":
        from medseg.inference.dicom_seg import write_dicom_seg

        try:
            written["mask_dicom_seg"] = write_dicom_seg(
                scan, mask, labels, folder / MASK_DICOM_SEG, anonymize=anonymize, salt=salt,
                model_name=model.name, model_version=model.weights_hash, uid_key=uid_key,
            )
        except MedsegError as e:  # headers highdicom cannot use: the NIfTI mask is still worth having
            dicom_seg_error = str(e)
    written["uncertainty_nifti"] = write_uncertainty(uncertainty, scan, folder / UNCERTAINTY_NIFTI)
    report = {
        **info,
        "shape": list(mask.shape),
        "spacing": list(scan.geometry.spacing),
        "measurements": measure(mask, scan.geometry, labels),
    }
    if scan.meta.get("format") == "dicom":
        report["dicom_seg_anonymized"] = anonymize
    if dicom_seg_error is not None:
        report["dicom_seg_error"] = dicom_seg_error
    (folder / REPORT).write_text(json.dumps(report, indent=1))
    written["report"] = folder / REPORT
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o600)
    return written


def uncertainty_npz(folder: Path) -> bytes:
    """``.npz`` with arrays ``uncertainty`` (spatial, float32) and ``geometry`` (JSON), no pickle."""
    image = sitk.ReadImage(str(folder / UNCERTAINTY_NIFTI))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, uncertainty=array, geometry=json.dumps(Geometry.from_sitk(image).to_dict()))
    return buf.getvalue()
