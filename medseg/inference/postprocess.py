"""Post-processing of label masks (per label, connected components via scipy.ndimage) and measurements.

Masks are class indices ``(y, x)`` or ``(z, y, x)``; label 0 is background. Components are face-connected
(4-connectivity in 2D, 6 in 3D), the scipy default, so objects touching only at a corner count as two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.config import InferenceConfig
from medseg.io import Geometry


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labelled, sizes)``: component ids (0 = outside) and each id's voxel count (``sizes[0]`` unused)."""
    labelled, n = ndimage.label(binary)
    return labelled, np.bincount(labelled.ravel(), minlength=n + 1)


def remove_small_objects(binary: np.ndarray, min_size: int) -> np.ndarray:
    """``binary`` without connected components of fewer than ``min_size`` voxels (same shape, bool)."""
    binary = np.asarray(binary, dtype=bool)
    if min_size <= 1 or not binary.any():
        return binary
    labelled, sizes = _components(binary)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labelled]


def keep_largest_component(binary: np.ndarray) -> np.ndarray:
    """Only the largest connected component of ``binary`` (ties: the lowest component id, i.e. the first
    found in array order). All-false input stays all-false."""
    binary = np.asarray(binary, dtype=bool)
    if not binary.any():
        return binary
    labelled, sizes = _components(binary)
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def fill_holes(binary: np.ndarray) -> np.ndarray:
    """``binary`` with enclosed background regions filled (in 3D: enclosed in 3D, not per slice)."""
    return ndimage.binary_fill_holes(np.asarray(binary, dtype=bool))


def postprocess_mask(mask: np.ndarray, cfg: InferenceConfig, num_classes: int | None = None) -> np.ndarray:
    """Apply ``cfg.min_object_size``, ``cfg.keep_largest`` and ``cfg.fill_holes`` to each label > 0, in that
    order. Removed voxels become background; holes are filled only where the mask is background, so one label
    never overwrites another. Returns a new mask of the same shape and dtype (the input if nothing is on)."""
    if not (cfg.min_object_size > 1 or cfg.keep_largest or cfg.fill_holes):
        return mask
    out = mask.copy()
    labels = range(1, num_classes) if num_classes is not None else (int(v) for v in np.unique(mask) if v > 0)
    for label in labels:
        binary = out == label
        if not binary.any():
            continue
        kept = remove_small_objects(binary, cfg.min_object_size)
        if cfg.keep_largest:
            kept = keep_largest_component(kept)
        out[binary & ~kept] = 0
        if cfg.fill_holes:
            out[fill_holes(kept) & (out == 0)] = label
    return out


def _label_name(value: Any) -> str:
    return str(value.get("name", "")) if isinstance(value, Mapping) else str(value)


def measure(mask: np.ndarray, geometry: Geometry, labels: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
    """Per-label size of a mask on ``geometry``'s grid, for every label > 0 in ``labels``.

    ``labels``: index -> name, or index -> ``{"name", "color"}`` (a bundle's label table). Returns
    ``{index: {"name", "voxels", "components", "area_mm2"}}`` for 2D masks and ``volume_ml`` instead of
    ``area_mm2`` for 3D (1 mL = 1000 mm³), using the geometry's spacing (1 mm when the file had none, e.g. PNG).
    """
    if tuple(mask.shape) != tuple(geometry.size):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the geometry's grid {geometry.size}")
    unit = float(np.prod(geometry.spacing))  # mm² per pixel or mm³ per voxel
    counts = np.bincount(np.asarray(mask, dtype=np.int64).ravel(), minlength=max(labels, default=0) + 1)
    out: dict[int, dict[str, Any]] = {}
    for index in sorted(int(i) for i in labels):
        if index == 0:
            continue
        voxels = int(counts[index]) if index < counts.size else 0
        entry: dict[str, Any] = {
            "name": _label_name(labels[index]),
            "voxels": voxels,
            "components": int(ndimage.label(mask == index)[1]) if voxels else 0,
        }
        if geometry.ndim == 3:
            entry["volume_ml"] = voxels * unit / 1000.0
        else:
            entry["area_mm2"] = voxels * unit
        out[index] = entry
    return out
