"""Deterministic preprocessing shared by training and inference: scale, channels, intensity, label mapping.

Training and prediction must see identical inputs, so both go through ``prepare_scan`` (the scan on the model
grid in its own dtype, plus its intensity bounds) and ``model_input`` (channels and intensity applied to the whole
image or to any crop of it — the bounds belong to the whole image, so a crop is normalised exactly as the whole
image would be). Their parameters are the config's ``data`` section, which the bundle carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.config import DataConfig, Intensity
from medseg.errors import DatasetError
from medseg.io import Geometry, Scan
from medseg.transforms.resample import to_model_grid

# Percentiles of larger images come from a fixed strided subset of this many voxels (same in training and
# prediction): np.percentile over a 512x512x300 CT takes seconds and the 0.5/99.5 values move by a grey level.
PERCENTILE_SAMPLES = 4_000_000


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


def _channel_basis(image: np.ndarray, channels: int) -> np.ndarray:
    """What the intensity bounds are computed on: the image as the network will see its channels, without
    materialising a grey image repeated to 3 channels (the repeat does not change any statistic)."""
    if image.shape[0] == 1:
        return image
    if image.shape[0] >= 3 and channels == 1:
        return image[:3].astype(np.float32).mean(axis=0, keepdims=True)
    return image[:3] if image.shape[0] == 4 else image


def intensity_bounds(image: np.ndarray, data: DataConfig) -> tuple[float, float] | None:
    """``(low, high)`` mapped to 0 and 1 for a whole image ``(C, *spatial)`` (any dtype); None for ``none``.
    Percentiles are over the whole scan, not per slice, so neighbouring 2.5D slices stay comparable."""
    mode = data.intensity
    if mode == Intensity.none:
        return None
    if mode == Intensity.ct_window:
        width, level = data.ct_window
        return float(level - width / 2), float(level + width / 2)
    if mode == Intensity.fixed:
        assert data.intensity_range is not None  # the config validator requires it
        return float(data.intensity_range[0]), float(data.intensity_range[1])
    basis = _channel_basis(image, data.channels)
    if mode == Intensity.minmax:
        return float(basis.min()), float(basis.max())
    flat = basis.reshape(-1)
    if flat.size > PERCENTILE_SAMPLES:
        flat = flat[:: -(-flat.size // PERCENTILE_SAMPLES)]
    lo, hi = np.percentile(flat, (0.5, 99.5))
    return float(lo), float(hi)


def apply_intensity(image: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """``(low, high)`` -> [0, 1], clipped, float32; a constant image (high <= low) becomes zeros."""
    out = image.astype(np.float32, copy=True) if image.dtype != np.float32 else image.copy()
    if bounds is None:
        return out
    lo, hi = bounds
    if hi <= lo:
        out[...] = 0.0
        return out
    out -= lo
    out *= 1.0 / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def model_input(raw: np.ndarray, data: DataConfig, bounds: tuple[float, float] | None, source: str = "") -> np.ndarray:
    """Raw image (or crop) ``(C_src, *spatial)`` in its own dtype -> network input ``(channels, *spatial)``
    float32 in [0, 1]: channels converted, then intensities mapped with the whole image's ``bounds``."""
    if raw.shape[0] >= 3 and data.channels == 1:
        raw = raw[:3].astype(np.float32).mean(axis=0, keepdims=True)
    normed = apply_intensity(raw if raw.shape[0] != 4 else raw[:3], bounds)
    return to_channels(normed, data.channels, source)


def normalize_intensity(image: np.ndarray, mode: Intensity, ct_window: tuple[float, float] = (400.0, 40.0),
                        intensity_range: tuple[float, float] | None = None) -> np.ndarray:
    """Whole image ``(C, *spatial)`` -> float32 in about [0, 1] (``intensity_bounds`` + ``apply_intensity``)."""
    data = DataConfig.model_construct(intensity=mode, ct_window=ct_window, intensity_range=intensity_range,
                                      channels=image.shape[0])
    return apply_intensity(image, intensity_bounds(image, data))


@dataclass
class PreparedScan:
    """A scan on the model grid, still in its own dtype (what a training cache holds)."""

    image: np.ndarray  # (C_src, *model grid)
    bounds: tuple[float, float] | None  # the whole image's intensity bounds
    geometry: Geometry  # the source geometry with the operations that led to the model grid
    label: np.ndarray | None = None  # (*model grid) class indices
    instances: np.ndarray | None = None

    def model_input(self, data: DataConfig, source: str = "") -> np.ndarray:
        return model_input(self.image, data, self.bounds, source)


def prepare_scan(scan: Scan, data: DataConfig, label: np.ndarray | None = None,
                 instances: np.ndarray | None = None) -> PreparedScan:
    """Scan (+ class map/instances on its grid) -> the model grid (`medseg.transforms.resample`) and bounds."""
    try:
        image, label, instances, geometry = to_model_grid(scan.channels_first(), scan.geometry, data, label=label,
                                                           instances=instances)
    except ValueError as e:
        raise DatasetError(f"{scan.source}: {e}") from None
    return PreparedScan(image, intensity_bounds(image, data), geometry, label, instances)


def prepare_image(scan: Scan, data_cfg: DataConfig) -> np.ndarray:
    """Scan -> ``(channels, *model grid)`` float32 in about [0, 1] (the whole network input of a scan)."""
    return prepare_scan(scan, data_cfg).model_input(data_cfg, scan.source)


def map_labels(mask: Scan, label_map: dict[int, int], image_shape: tuple[int, ...], source: str) -> np.ndarray:
    """Raw mask values -> class indices (uint8, or uint16 beyond 255 classes; spatial shape). Unknown values and
    shape mismatches raise."""
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
    dtype = np.uint8 if max(label_map.values()) < 256 else np.uint16
    lut_vals = np.array([label_map[k] for k in lut_keys], dtype=dtype)
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
