"""Write a Prediction next to its scan's conventions: PNG masks for 2D images, NIfTI for volumes and DICOM,
with the scan's geometry; an overlay PNG; probabilities, uncertainty maps and a DICOM SEG on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.inference.predictor import Prediction
from medseg.io import Scan, write_mask, write_overlay
from medseg.io.formats import full_suffix
from medseg.io.volume import WRITABLE_VOLUME_SUFFIXES, write_volume
from medseg.io.writers import atomic_path

_VOLUME_FORMATS = ("nifti", "dicom", "nrrd", "metaimage")


def raw_label_values(mask: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Class indices -> the dataset's raw mask values (e.g. 1 -> 255) when the label map is invertible,
    so written masks follow the same convention as the training masks."""
    inverse: dict[int, int] = {}
    for raw, cls in label_map.items():
        inverse.setdefault(cls, raw)
    if len(inverse) != len(set(label_map.values())) or max(inverse.values(), default=0) > 65535:
        return mask
    lut = np.arange(max(int(mask.max()) + 1, max(inverse) + 1), dtype=np.int64)
    for cls, raw in inverse.items():
        lut[cls] = raw
    out = lut[mask]
    return out.astype(np.uint8 if out.max() < 256 else np.uint16)


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
    label_map: dict[int, int] | None = None,
    probabilities: bool = False,
    uncertainty: bool = False,
    dicom_seg: bool = False,
    anonymize: bool = False,
    model_name: str = "medseg",
    model_version: str = "",
) -> dict[str, Path]:
    """Write ``<name>_mask.{png|nii.gz}`` and ``<name>_overlay.png``; on request ``<name>_probs.{npz|nii.gz}``,
    ``<name>_uncertainty.{png + npz | nii.gz}`` and, for DICOM input, ``<name>_seg.dcm`` (DICOM SEG,
    de-identified with ``anonymize``). Returns kind -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    mask = raw_label_values(pred.mask, label_map) if label_map else pred.mask
    volume_like = scan.is_volume or scan.meta.get("format") in _VOLUME_FORMATS
    if volume_like:
        written["mask"] = write_mask(mask, scan, out_dir / f"{name}_mask.nii.gz")
    else:
        written["mask"] = write_mask(mask, scan, out_dir / f"{name}_mask.png")
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
            model_name=model_name, model_version=model_version,
        )
    return written
