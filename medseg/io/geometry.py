"""Geometry: where an array's voxels sit in physical space, and what was done to the array since reading.

Array convention (used everywhere in medseg, documented here once):
    * ``Scan.array`` has spatial axes in **array order** ``(z, y, x)`` for volumes or ``(y, x)`` for 2D images,
      plus an optional trailing channel axis (RGB images): ``(y, x, C)``.
    * Tensors fed to networks are channel-first: ``(B, C, H, W)``.
    * ``Geometry.spacing / origin / direction`` are stored in **SimpleITK/ITK/DICOM order** ``(x, y[, z])``,
      exactly as SimpleITK reports them, so writing a mask back through SimpleITK is lossless. Use
      ``spacing_zyx`` for array-order arithmetic (areas, volumes, sigma in mm).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a scan's spatial grid (SimpleITK order, see module docstring)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    size: tuple[int, ...]  # spatial size in array order (z, y, x) / (y, x), as read from disk
    operations: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # crop/pad/resample, in order

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))

    @property
    def voxel_volume_mm3(self) -> float:
        """Area (2D, mm²) or volume (3D, mm³) of one pixel/voxel."""
        return float(np.prod(self.spacing))

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Geometry:
        """Unit spacing, zero origin, identity direction for a spatial ``shape`` in array order."""
        n = len(shape)
        return cls(
            spacing=(1.0,) * n,
            origin=(0.0,) * n,
            direction=tuple(np.eye(n).ravel().tolist()),
            size=tuple(int(s) for s in shape),
        )

    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        """Geometry of a ``SimpleITK.Image`` (spatial part only)."""
        return cls(
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
            size=tuple(int(s) for s in reversed(image.GetSize())),
        )

    def apply_to_sitk(self, image: Any) -> Any:
        """Stamp this geometry onto a ``SimpleITK.Image`` of the same spatial size; returns the image."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def with_operation(self, op: str, **params: Any) -> Geometry:
        """A copy with one more recorded operation (e.g. ``pad`` with its widths)."""
        return replace(self, operations=(*self.operations, {"op": op, **params}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "size": list(self.size),
            "operations": [dict(o) for o in self.operations],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(
            spacing=tuple(d["spacing"]),
            origin=tuple(d["origin"]),
            direction=tuple(d["direction"]),
            size=tuple(d["size"]),
            operations=tuple(d.get("operations", ())),
        )

    def same_grid(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when both describe the same voxel grid in physical space."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


@dataclass
class Scan:
    """An image array with its geometry.

    ``array``: ``(y, x)``, ``(y, x, C)`` or ``(z, y, x)`` (see module docstring).
    ``source``: what was read (a file name without directories, never patient data) — for messages.
    ``meta``: format-specific extras (e.g. ``dicom_files`` for DICOM SEG references, ``modality``).
    """

    array: np.ndarray
    geometry: Geometry
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # meta may hold DICOM headers (patient data): keep it out of logs, tracebacks and test output.
        return (
            f"Scan(source={self.source!r}, shape={tuple(self.array.shape)}, dtype={self.array.dtype}, "
            f"spacing={self.geometry.spacing}, meta_keys={sorted(self.meta)})"
        )

    @property
    def spatial_ndim(self) -> int:
        return self.geometry.ndim

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[: self.spatial_ndim])

    @property
    def channels(self) -> int:
        return int(self.array.shape[self.spatial_ndim]) if self.array.ndim > self.spatial_ndim else 1

    @property
    def is_volume(self) -> bool:
        return self.spatial_ndim == 3

    def channels_first(self) -> np.ndarray:
        """``(C, *spatial)`` view of the array (C = 1 for single-channel scans)."""
        if self.array.ndim == self.spatial_ndim:
            return self.array[None]
        return np.moveaxis(self.array, -1, 0)
