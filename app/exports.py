"""Files offered for download, as bytes: the mask (NIfTI on the input's grid, or PNG), the overlay PNG and a DICOM
SEG for DICOM inputs. The mask is written by the one prediction writer (`medseg.inference.outputs.write_mask_file`,
byte for byte what ``medseg predict`` and the service write); this module adds what downloads need:

* names without patient data: ``segmentation_<first 12 hex of the input's SHA-256>.nii.gz``;
* the research-use notice in the overlay's PNG text chunks (the mask writer and the DICOM SEG writer put it in theirs).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.inference.dicom_seg import write_dicom_seg
from medseg.inference.outputs import MaskValues, ModelStamp, mask_suffix, png_info, write_mask_file
from medseg.io import Scan

__all__ = ["Provenance", "dicom_seg_available", "dicom_seg_bytes", "file_name", "mask_bytes", "mask_suffix",
           "overlay_png_bytes"]


@dataclass(frozen=True)
class Provenance:
    """What produced a file (written into PNG text chunks; no patient data)."""

    model_name: str
    model_version: str
    weights_hash: str
    input_sha256: str

    @property
    def short_hash(self) -> str:
        return self.input_sha256[:12]

    @property
    def model(self) -> ModelStamp:
        return ModelStamp(self.model_name, self.weights_hash)


def file_name(kind: str, provenance: Provenance, suffix: str) -> str:
    """``segmentation_3f2a…`` style names: the content hash only, never the uploaded file's name."""
    return f"{kind}_{provenance.short_hash}{suffix}"


def mask_bytes(scan: Scan, mask: np.ndarray, label_map: dict[int, int], provenance: Provenance,
               values: MaskValues | str = MaskValues.indices) -> tuple[str, bytes]:
    """``(file name, bytes)`` of the mask on ``scan``'s grid in the ``values`` convention (README "Prediction
    outputs": class indices by default, the training masks' values with ``raw``)."""
    name = file_name("segmentation", provenance, mask_suffix(scan))
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = write_mask_file(mask, scan, Path(tmp) / name, label_map=label_map, model=provenance.model,
                               values=values)
        return name, path.read_bytes()


def overlay_png_bytes(rgb: np.ndarray, provenance: Provenance, view: str) -> tuple[str, bytes]:
    """``(file name, PNG bytes)`` of a rendered view (what the viewer shows), with provenance text chunks."""
    name = file_name("overlay", provenance, f"_{view}.png")
    info = png_info(provenance.model, f"overlay, {view}")
    info.add_itxt("Comment", f"input sha256 {provenance.input_sha256}")
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = Path(tmp) / "overlay.png"
        Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG", pnginfo=info)
        return name, path.read_bytes()


def dicom_seg_available(scan: Scan) -> bool:
    """A DICOM SEG references its source images: offered for DICOM inputs."""
    return scan.meta.get("format") == "dicom"


def dicom_seg_bytes(
    scan: Scan, mask: np.ndarray, labels: dict[int, dict[str, str]], provenance: Provenance
) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a DICOM SEG for a DICOM ``scan`` (``medseg.inference.dicom_seg``)."""
    name = file_name("segmentation", provenance, ".dcm")
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = write_dicom_seg(scan, mask, labels, Path(tmp) / name, anonymize=False,
                               model_name=provenance.model_name, model_version=provenance.model_version)
        return name, path.read_bytes()
