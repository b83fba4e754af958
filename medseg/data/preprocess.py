"""Deterministic preprocessing shared by training and inference: channels, intensity, label mapping.

Training and prediction must see identical inputs, so both call ``prepare_image``; its parameters are
stored in the bundle's preprocessing.json.
"""

from __future__ import annotations

import numpy as np

from medseg.config import DataConfig, Intensity
from medseg.errors import DatasetError
from medseg.io import Scan


def to_channels(image: np.ndarray, channels: int, source: str = "") -> np.ndarray:
    """``(C, *spatial)`` -> ``(channels, *spatial)``: gray repeated to 3, RGB averaged to 1, alpha dropped."""
    c = image.shape[0]
    if c == channels:
        return image
    if c == 4:  # RGBA that slipped through: alpha carries no anatomy
        image, c = image[:3], 3
        if c == channels:
            return image
    if c == 1:
        return np.repeat(image, channels, axis=0)
    if c == 3 and channels == 1:
        return image.mean(axis=0, keepdims=True)
    raise DatasetError(f"{source}: image has {c} channels, the model expects {channels}")


def normalize_intensity(image: np.ndarray, mode: Intensity, ct_window: tuple[float, float] = (400.0, 40.0)) -> np.ndarray:
    """Scale intensities to about [0, 1] (float32). Percentiles are over the whole scan, not per slice,
    so neighbouring 2.5D slices stay comparable."""
    image = image.astype(np.float32, copy=False)
    if mode == Intensity.none:
        return image
    if mode == Intensity.ct_window:
        width, level = ct_window
        lo, hi = level - width / 2, level + width / 2
    elif mode == Intensity.minmax:
        lo, hi = float(image.min()), float(image.max())
    else:
        lo, hi = (float(v) for v in np.percentile(image, (0.5, 99.5)))
    if hi <= lo:  # constant image: map to zeros rather than dividing by zero
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def prepare_image(scan: Scan, data_cfg: DataConfig) -> np.ndarray:
    """Scan -> ``(channels, *spatial)`` float32 in about [0, 1]."""
    image = to_channels(scan.channels_first(), data_cfg.channels, scan.source)
    return normalize_intensity(image, data_cfg.intensity, data_cfg.ct_window)


def map_labels(mask: Scan, label_map: dict[int, int], image_shape: tuple[int, ...], source: str) -> np.ndarray:
    """Raw mask values -> class indices (int64, spatial shape). Unknown values and shape mismatches raise."""
    arr = mask.array
    if arr.ndim > mask.spatial_ndim:  # colour-saved mask: fine only if every channel is the same
        if not all(np.array_equal(arr[..., 0], arr[..., i]) for i in range(1, arr.shape[-1])):
            raise DatasetError(f"{source}: mask has {arr.shape[-1]} different channels; expected a label image")
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(image_shape):
        raise DatasetError(f"{source}: mask shape {tuple(arr.shape)} != image shape {tuple(image_shape)}")
    values = np.unique(arr)
    unknown = [v.item() for v in values if int(v) not in label_map or v != int(v)]
    if unknown:
        raise DatasetError(
            f"{source}: mask values {unknown[:10]} are not in the label map {sorted(label_map)} (set data.label_map)"
        )
    lut_keys = np.array(sorted(label_map), dtype=np.int64)
    lut_vals = np.array([label_map[k] for k in lut_keys], dtype=np.int64)
    return lut_vals[np.searchsorted(lut_keys, arr.astype(np.int64))]


def touching_borders(instances: np.ndarray) -> np.ndarray:
    """Boolean mask of object pixels that touch a *different* object (8-neighbourhood) in an instance map.

    Semantic masks made from instance maps fuse touching objects; clearing these pixels restores the thin
    background gaps that the U-Net paper's weight maps (and any model) need to learn to separate them.
    """
    from scipy import ndimage

    inst = instances.astype(np.int64)
    foreground = inst > 0
    larger_neighbour = ndimage.maximum_filter(inst, size=3) > inst
    smaller_neighbour = ndimage.minimum_filter(np.where(foreground, inst, inst.max() + 1), size=3) < inst
    return foreground & (larger_neighbour | smaller_neighbour)
