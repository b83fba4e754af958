"""Files offered for download, as bytes: the mask (NIfTI on the input's grid, or PNG), the overlay PNG and a DICOM
SEG for DICOM inputs. Writing is ``medseg.io`` / ``medseg.inference``; this module adds what downloads need:

* names without patient data: ``segmentation_<first 12 hex of the input's SHA-256>.nii.gz``;
* the research-use notice in the file's own metadata where the format has a place for it (PNG text chunks,
  the NIfTI ``descrip`` field; the DICOM SEG writer puts it in the SEG's description).
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import medseg
from medseg.bundle import RESEARCH_NOTICE
from medseg.inference.outputs import raw_label_values
from medseg.io import Scan, write_mask

NIFTI_DESCRIP_BYTES = 80  # the NIfTI-1 header's descrip field


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


def file_name(kind: str, provenance: Provenance, suffix: str) -> str:
    """``segmentation_3f2a…`` style names: the content hash only, never the uploaded file's name."""
    return f"{kind}_{provenance.short_hash}{suffix}"


def mask_suffix(scan: Scan) -> str:
    """Volumes and DICOM/NIfTI inputs get NIfTI (keeps the geometry); 2D pictures get PNG, like ``medseg predict``."""
    if scan.is_volume or scan.meta.get("format") in ("nifti", "dicom", "nrrd", "metaimage"):
        return ".nii.gz"
    return ".png"


def _png_info(provenance: Provenance, description: str) -> PngInfo:
    info = PngInfo()
    info.add_itxt("Disclaimer", RESEARCH_NOTICE)  # a PNG-spec keyword, shown by exiftool and most viewers
    info.add_itxt("Description", description)
    info.add_itxt("Software", f"medseg {medseg.__version__}")
    info.add_itxt(
        "Source",
        f"model {provenance.model_name} version {provenance.model_version} weights {provenance.weights_hash}",
    )
    info.add_itxt("Comment", f"input sha256 {provenance.input_sha256}")
    return info


def _restamp_png(path: Path, info: PngInfo) -> bytes:
    """Re-save a PNG written by medseg.io with text chunks, keeping its pixels and pixel size (pHYs)."""
    with Image.open(path) as im:
        im.load()
        kwargs = {"dpi": im.info["dpi"]} if "dpi" in im.info else {}
        out = path.with_name("stamped.png")
        im.save(out, format="PNG", pnginfo=info, **kwargs)
    return out.read_bytes()


def mask_bytes(scan: Scan, mask: np.ndarray, label_map: dict[int, int], provenance: Provenance) -> tuple[str, bytes]:
    """``(file name, bytes)`` of the mask on ``scan``'s grid, in the training masks' values (e.g. 255 for class 1)
    as ``medseg predict`` writes them."""
    values = raw_label_values(mask, label_map) if label_map else mask
    suffix = mask_suffix(scan)
    name = file_name("segmentation", provenance, suffix)
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = write_mask(values, scan, Path(tmp) / name)
        if suffix == ".png":
            return name, _restamp_png(path, _png_info(provenance, "segmentation mask (label values)"))
        # medseg.io writes the geometry exactly; SimpleITK maps ITK_FileNotes to the NIfTI descrip field.
        image = sitk.ReadImage(str(path))
        notice = RESEARCH_NOTICE.encode()[:NIFTI_DESCRIP_BYTES].decode(errors="ignore")
        image.SetMetaData("ITK_FileNotes", notice)
        sitk.WriteImage(image, str(path), useCompression=True)
        return name, path.read_bytes()


def overlay_png_bytes(rgb: np.ndarray, provenance: Provenance, view: str) -> tuple[str, bytes]:
    """``(file name, PNG bytes)`` of a rendered view (what the viewer shows), with provenance text chunks."""
    name = file_name("overlay", provenance, f"_{view}.png")
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = Path(tmp) / "overlay.png"
        Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG", pnginfo=_png_info(provenance, f"overlay, {view}"))
        return name, path.read_bytes()


def _dicom_seg_writer():
    try:
        return importlib.import_module("medseg.inference.dicom_seg").write_dicom_seg
    except (ImportError, AttributeError):
        return None


def dicom_seg_available(scan: Scan) -> bool:
    """A DICOM SEG references its source images: offered for DICOM inputs when the writer is installed."""
    return scan.meta.get("format") == "dicom" and _dicom_seg_writer() is not None


def dicom_seg_bytes(
    scan: Scan, mask: np.ndarray, labels: dict[int, dict[str, str]], provenance: Provenance
) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a DICOM SEG for a DICOM ``scan`` (``medseg.inference.dicom_seg``)."""
    write_dicom_seg = _dicom_seg_writer()
    if write_dicom_seg is None:
        raise RuntimeError("DICOM SEG export is not available in this installation")
    name = file_name("segmentation", provenance, ".dcm")
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = Path(tmp) / name
        written = write_dicom_seg(
            scan, mask, labels, path, anonymize=False,
            model_name=provenance.model_name, model_version=provenance.model_version,
        )
        return name, Path(written or path).read_bytes()
