"""Write a Prediction next to its scan's conventions: PNG masks for 2D images, NIfTI for volumes and DICOM,
with the scan's geometry; an overlay PNG for 2D; probabilities/uncertainty on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.inference.predictor import Prediction
from medseg.io import Scan, write_mask, write_overlay


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


def write_prediction_outputs(
    scan: Scan,
    pred: Prediction,
    labels: dict[int, dict[str, str]],
    out_dir: Path,
    name: str,
    label_map: dict[int, int] | None = None,
    probabilities: bool = False,
) -> dict[str, Path]:
    """Write ``<name>_mask.{png|nii.gz}`` (+ ``<name>_overlay.png`` for 2D, probabilities if asked)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    mask = raw_label_values(pred.mask, label_map) if label_map else pred.mask
    if scan.is_volume or scan.meta.get("format") in ("nifti", "dicom", "nrrd", "metaimage"):
        written["mask"] = write_mask(mask, scan, out_dir / f"{name}_mask.nii.gz")
    else:
        written["mask"] = write_mask(mask, scan, out_dir / f"{name}_mask.png")
    colors = {i: v["color"] for i, v in labels.items()}
    written["overlay"] = write_overlay(scan, pred.mask, colors, out_dir / f"{name}_overlay.png")
    if probabilities:
        from medseg.io import write_probabilities

        written["probabilities"] = write_probabilities(pred.probs, scan, out_dir / f"{name}_probs")
    return written
