"""The one prediction writer, shared by ``medseg predict``, the inference service and the web app: masks (PNG for
2D images, NIfTI for volumes and DICOM, with the scan's geometry), an overlay PNG, and probabilities, uncertainty
maps and a DICOM SEG on request.

Mask values (one convention for all three faces; README "Prediction outputs"):

* ``MaskValues.indices`` (default): class indices 0..K-1, the keys of the bundle's ``labels`` — one meaning
  whatever the dataset's label map, the same numbers as the evaluation, the service API and the DICOM SEG's
  segments. (A 0/1 PNG looks black in a picture viewer: the overlay PNG is the file for eyes.)
* ``MaskValues.raw``: the dataset's own label values, ``data.label_map`` read backwards (class 1 -> 255 for
  0/255 masks), so a predicted mask can serve as a training mask. Where several raw values map to one class,
  the first one in the label map is written.

Every mask file says where it came from and that it is for research use only: PNG text chunks (``Disclaimer``,
``Software``, ``Source``, ``Description``), the NIfTI ``descrip`` field. No patient data and no input file names go
into a file; its bytes depend only on the scan's grid, the mask, the option and the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import medseg
from medseg.bundle import RESEARCH_NOTICE
from medseg.inference.predictor import Prediction
from medseg.io import Scan, write_mask, write_overlay
from medseg.io.formats import full_suffix
from medseg.io.volume import WRITABLE_VOLUME_SUFFIXES, write_volume
from medseg.io.writers import atomic_path

_VOLUME_FORMATS = ("nifti", "dicom", "nrrd", "metaimage")


class MaskValues(StrEnum):
    """What the numbers in a written mask mean (see the module docstring)."""

    indices = "indices"  # class indices 0..K-1 (the default)
    raw = "raw"  # the dataset's label values (e.g. 0/255), like the training masks


@dataclass(frozen=True)
class ModelStamp:
    """The model named inside every mask file (no patient data)."""

    name: str
    weights_hash: str


def mask_values(mask: np.ndarray, label_map: dict[int, int], values: MaskValues | str = MaskValues.indices) -> np.ndarray:
    """Class indices ``mask`` as the values ``values`` asks for: unchanged for ``indices``; for ``raw`` each
    class becomes the first raw value that maps to it (a class no raw value maps to keeps its index)."""
    if MaskValues(values) == MaskValues.indices or not label_map:
        return mask
    inverse: dict[int, int] = {}
    for raw, cls in label_map.items():
        inverse.setdefault(cls, raw)
    lut = np.arange(max(int(mask.max(initial=0)) + 1, max(inverse) + 1), dtype=np.int64)
    for cls, raw in inverse.items():
        lut[cls] = raw
    out = lut[mask]
    return out.astype(np.uint8 if out.max(initial=0) < 256 else np.uint16 if out.max() < 65536 else np.uint32)


def mask_suffix(scan: Scan) -> str:
    """``.nii.gz`` for volumes and volume-format inputs (DICOM, NIfTI, NRRD, MHA: keeps the geometry), ``.png``
    for 2D pictures."""
    return ".nii.gz" if scan.is_volume or scan.meta.get("format") in _VOLUME_FORMATS else ".png"


def png_info(model: ModelStamp, description: str) -> PngInfo:
    """PNG text chunks of every file medseg writes for a person: the research-use notice and the model."""
    info = PngInfo()
    info.add_itxt("Disclaimer", RESEARCH_NOTICE)  # a PNG-spec keyword, shown by exiftool and most viewers
    info.add_itxt("Description", description)
    info.add_itxt("Software", f"medseg {medseg.__version__}")
    info.add_itxt("Source", f"model {model.name} weights {model.weights_hash}")
    return info


def write_mask_file(
    mask: np.ndarray,
    scan: Scan,
    path: str | Path,
    *,
    label_map: dict[int, int],
    model: ModelStamp,
    values: MaskValues | str = MaskValues.indices,
) -> Path:
    """Write class indices ``mask`` on ``scan``'s grid to ``path`` (``.png`` 2D, or ``.nii.gz``/``.nii``/``.nrrd``
    /``.mha``) in the ``values`` convention, stamped with the notice and ``model``; atomic. Returns the path."""
    path = Path(path)
    values = MaskValues(values)
    data = mask_values(mask, label_map, values)
    what = "label values" if values == MaskValues.raw else "class indices"
    write_mask(data, scan, path, pnginfo=png_info(model, f"segmentation mask ({what})"), notes=RESEARCH_NOTICE)
    return path


def write_uncertainty(uncertainty: np.ndarray, like: Scan, path: str | Path) -> Path:
    """Write an uncertainty map ``(*spatial)`` in [0, 1] on ``like``'s grid; the suffix picks the format:

    ``.nii.gz``/``.nii``/``.nrrd``/``.mha``: float32 with the scan's geometry; ``.npz``: arrays ``uncertainty``
    (float32) and ``geometry`` (JSON), no pickle; ``.png``: 8-bit, 0..1 scaled to 0..255 (2D only, for viewing).
    """
    path = Path(path)
    u = np.asarray(uncertainty, dtype=np.float32)
    if tuple(u.shape) != tuple(like.geometry.size):
        raise ValueError(f"uncertainty shape {u.shape} does not match {like.source or 'the scan'}'s grid {like.geometry.size}")
    suffix = full_suffix(path)
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez_compressed(f, uncertainty=u, geometry=np.array(json.dumps(like.geometry.to_dict())))
        elif suffix == ".png":
            if u.ndim != 2:
                raise ValueError(f"{path.name}: PNG holds 2D maps; write a volume's uncertainty as .nii.gz")
            Image.fromarray(np.round(np.clip(u, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
        elif suffix in WRITABLE_VOLUME_SUFFIXES:
            write_volume(u, like.geometry, tmp)
        else:
            raise ValueError(f"{path.name}: uncertainty is written as .nii.gz, .npz or .png")
    return path


def write_prediction_outputs(
    scan: Scan,
    pred: Prediction,
    labels: dict[int, dict[str, str]],
    out_dir: Path,
    name: str,
    *,
    label_map: dict[int, int],
    model: ModelStamp,
    values: MaskValues | str = MaskValues.indices,
    probabilities: bool = False,
    uncertainty: bool = False,
    dicom_seg: bool = False,
    anonymize: bool = False,
) -> dict[str, Path]:
    """Write ``<name>_mask.{png|nii.gz}`` (`write_mask_file`, in the ``values`` convention) and
    ``<name>_overlay.png``; on request ``<name>_probs.{npz|nii.gz}``, ``<name>_uncertainty.{png + npz | nii.gz}``
    and, for DICOM input, ``<name>_seg.dcm`` (DICOM SEG, de-identified with ``anonymize``). Returns kind -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    volume_like = mask_suffix(scan) == ".nii.gz"
    written["mask"] = write_mask_file(pred.mask, scan, out_dir / f"{name}_mask{mask_suffix(scan)}",
                                      label_map=label_map, model=model, values=values)
    colors = {i: v["color"] for i, v in labels.items()}
    written["overlay"] = write_overlay(scan, pred.mask, colors, out_dir / f"{name}_overlay.png")
    if probabilities:
        from medseg.io import write_probabilities

        written["probabilities"] = write_probabilities(pred.probs, scan, out_dir / f"{name}_probs")
    if uncertainty:
        if volume_like:
            written["uncertainty"] = write_uncertainty(pred.uncertainty, scan, out_dir / f"{name}_uncertainty.nii.gz")
        else:  # a picture to look at, and the exact values
            written["uncertainty_png"] = write_uncertainty(pred.uncertainty, scan, out_dir / f"{name}_uncertainty.png")
            written["uncertainty"] = write_uncertainty(pred.uncertainty, scan, out_dir / f"{name}_uncertainty.npz")
    if dicom_seg and scan.meta.get("dicom_datasets"):
        from medseg.inference.dicom_seg import write_dicom_seg

        written["dicom_seg"] = write_dicom_seg(
            scan, pred.mask, labels, out_dir / f"{name}_seg.dcm", anonymize=anonymize,
            model_name=model.name, model_version=model.weights_hash,
        )
    return written
