"""The model grid: cases brought to the planned scale (and volumes turned so 2.5D slices run along the planned
axis) before training and prediction, and predictions brought back to the source grid.

``to_model_grid`` applies, in order, and records each step in ``Geometry.operations``:

1. ``resample`` (``data.resample``): ``spacing`` — to ``data.target_spacing`` (mm, array order), i.e. each axis scaled
   by ``spacing / target_spacing``; ``size`` — each image scaled by ``target_size / sqrt(H * W)`` (volumes:
   the geometric mean over all axes), aspect kept; ``none`` — nothing. Images are resampled linearly with
   anti-aliasing when shrinking (MONAI ``Resize``) and cast back to their own dtype (rounded and clipped for
   integers), so a cache holds them at their source size per voxel. Label maps are resampled per class on
   one-hot maps (linear) followed by argmax, nnU-Net's order-1 segmentation resampling: nearest-neighbour would
   shift thin structures by up to half a voxel of the coarser grid.
2. ``transpose`` (volumes, ``data.slice_axis`` != 0): the slice axis becomes array axis 0.

``from_model_grid`` undoes the operations on class probabilities ``(K, *model_grid)`` (linear interpolation, then
the caller takes argmax: resampling before argmax keeps masks smooth and exact on the source grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import DataConfig, Resample
from medseg.io.geometry import Geometry

MAX_SCALE = 16.0  # a case rescaled by more than this (either way) is refused: a wrong spacing, not a plan


def model_grid_shape(shape: Sequence[int], spacing_zyx: Sequence[float], data: DataConfig) -> tuple[int, ...]:
    """Spatial shape (array order) of a case on the model grid, before the slice-axis transpose."""
    shape = tuple(int(s) for s in shape)
    if data.resample == Resample.none:
        return shape
    if data.resample == Resample.spacing:
        target = tuple(data.target_spacing or ())
        if len(target) != len(shape):
            raise ValueError(f"data.target_spacing has {len(target)} values for a {len(shape)}D case")
        factors = [float(s) / float(t) for s, t in zip(spacing_zyx, target, strict=True)]
    else:
        side = math.prod(shape) ** (1.0 / len(shape))
        factors = [float(data.target_size) / side] * len(shape)
    if any(f > MAX_SCALE or f < 1 / MAX_SCALE for f in factors):
        raise ValueError(f"rescaling by {max(factors, key=lambda f: abs(math.log(f))):.3g} (shape {shape}, spacing "
                         f"{tuple(round(s, 4) for s in spacing_zyx)}): check the file's spacing or the plan")
    return tuple(max(1, int(round(s * f))) for s, f in zip(shape, factors, strict=True))


def _interpolate(x: torch.Tensor, size: tuple[int, ...], antialias: bool) -> torch.Tensor:
    """``(C, *spatial)`` float -> ``(C, *size)``, linear (bi-/trilinear), anti-aliased when shrinking."""
    ndim = x.ndim - 1
    if tuple(x.shape[1:]) == tuple(size):
        return x
    shrinking = any(t < s for t, s in zip(size, x.shape[1:], strict=True))
    if ndim == 2:
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                             antialias=antialias and shrinking)[0]
    if antialias and shrinking:
        # torch has no anti-aliased trilinear mode: MONAI's Resize smooths with a Gaussian first (skimage-style).
        from monai.transforms import Resize

        return torch.as_tensor(Resize(size, mode="trilinear", anti_aliasing=True)(x))
    return F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]


def resize_image(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``(C, *spatial)`` image -> ``(C, *size)`` in the same dtype (integers rounded and clipped)."""
    if tuple(array.shape[1:]) == tuple(size):
        return array
    out = _interpolate(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), size, antialias=True).numpy()
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(array.dtype)
    if array.dtype == np.bool_:
        return out >= 0.5
    return out.astype(array.dtype, copy=False)


def resize_labels(label: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Class-index map ``(*spatial)`` -> ``(*size)``: per class, the one-hot map resampled linearly; argmax.
    Memory: two arrays of the output size plus one class at a time."""
    if tuple(label.shape) == tuple(size):
        return label
    best = np.full(size, -1.0, dtype=np.float32)
    out = np.zeros(size, dtype=label.dtype)
    for k in np.unique(label):
        onehot = torch.from_numpy((label == k).astype(np.float32))[None]
        p = _interpolate(onehot, size, antialias=False)[0].numpy()
        better = p > best
        out[better] = k
        best[better] = p[better]
    return out


def resize_nearest(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Instance maps and other ids: nearest (pixel centres, ``nearest-exact``)."""
    if tuple(array.shape) == tuple(size):
        return array
    x = torch.from_numpy(array.astype(np.float32))[None, None]
    return F.interpolate(x, size=size, mode="nearest-exact")[0, 0].numpy().astype(array.dtype)


def to_model_grid(
    image: np.ndarray, geometry: Geometry, data: DataConfig, *, label: np.ndarray | None = None,
    instances: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, Geometry]:
    """Image ``(C, *spatial)`` (+ label/instances ``(*spatial)``) on the source grid -> the model grid, and the
    geometry with the operations recorded (``resample``, ``transpose``)."""
    spatial = tuple(image.shape[1:])
    size = model_grid_shape(spatial, geometry.spacing_zyx, data)
    if size != spatial:
        image = resize_image(image, size)
        label = resize_labels(label, size) if label is not None else None
        instances = resize_nearest(instances, size) if instances is not None else None
        new_spacing = tuple(s * o / n for s, o, n in zip(geometry.spacing_zyx, spatial, size, strict=True))
        geometry = geometry.with_operation("resample", from_shape=list(spatial), to_shape=list(size),
                                           spacing_zyx=[float(s) for s in new_spacing])
    axis = data.slice_axis if image.ndim == 4 else 0
    if axis:
        image = np.moveaxis(image, 1 + axis, 1)
        label = np.moveaxis(label, axis, 0) if label is not None else None
        instances = np.moveaxis(instances, axis, 0) if instances is not None else None
        geometry = geometry.with_operation("transpose", slice_axis=int(axis))
    return image, label, instances, geometry


def model_grid_spacing(geometry: Geometry) -> tuple[float, ...]:
    """Spacing (array order, model-grid axes) after the recorded operations."""
    spacing = list(geometry.spacing_zyx)
    for op in geometry.operations:
        if op["op"] == "resample":
            spacing = list(op["spacing_zyx"])
        elif op["op"] == "transpose":
            a = op["slice_axis"]
            spacing = [spacing[a]] + [s for i, s in enumerate(spacing) if i != a]
    return tuple(spacing)


def from_model_grid(probs: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Probabilities ``(K, *model grid)`` -> ``(K, *source grid)`` by undoing ``geometry.operations`` in reverse
    (class by class, so memory is the output plus one class)."""
    for op in reversed(geometry.operations):
        kind = op["op"]
        if kind == "transpose":
            probs = np.moveaxis(probs, 1, 1 + int(op["slice_axis"]))
        elif kind == "resample":
            size = tuple(int(s) for s in op["from_shape"])
            out = np.empty((probs.shape[0], *size), dtype=np.float32)
            for k in range(probs.shape[0]):
                x = torch.from_numpy(np.ascontiguousarray(probs[k], dtype=np.float32))[None]
                out[k] = _interpolate(x, size, antialias=False)[0].numpy()
            probs = out
        else:
            raise ValueError(f"cannot undo operation {kind!r}")
    return np.ascontiguousarray(probs)
