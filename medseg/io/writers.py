"""Write masks, overlays, probabilities and scans so they line up with their source in any viewer.

The output format follows the path's suffix: PNG/TIFF for 2D, NIfTI (.nii/.nii.gz), NRRD or MHA for 2D or 3D
(the source's spacing/origin/direction are written exactly, via SimpleITK). DICOM inputs are written as
NIfTI (or NRRD/MHA); DICOM SEG is a separate job. Every write is atomic: the data goes to a temporary file
in the target folder, then ``os.replace`` puts it in place, so a reader never sees a half-written file.
`atomic_path` is medseg's one way to write a file atomically (configs, plans, splits, metrics, plots too).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medseg.io.formats import RASTER_FORMATS, ScanFormat, detect_format, full_suffix
from medseg.io.geometry import Scan
from medseg.io.overlay import ColorSpec, render_overlay
from medseg.io.raster import write_raster
from medseg.io.volume import WRITABLE_VOLUME_SUFFIXES, write_volume

_MASK_RASTER_FORMATS = frozenset({ScanFormat.png, ScanFormat.tiff})  # lossless only: no JPEG masks


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (after a power cut the old name must not come back); best effort on
    file systems that cannot fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers pick the same format; a unique name, so
    processes writing the same file at once, such as DDP ranks, never share one); on success it replaces ``path``,
    on error it is removed. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name rather than mkstemp: mkstemp's 0600 mode would stick to the final file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{full_suffix(path)}")
    try:
        yield tmp
        # Flush the bytes to disk before the rename: after a power cut a renamed-but-unwritten file would be
        # the complete-looking empty file that the temp-and-rename was meant to prevent.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically (`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _labels_as_integers(mask: np.ndarray) -> np.ndarray:
    """Validate a label map and store it in the smallest unsigned type that holds its labels."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.mod(mask, 1) == 0):
            raise ValueError("mask holds non-integer values; pass class indices (argmax), not probabilities")
    elif not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
    low = mask.min() if mask.size else 0
    high = mask.max() if mask.size else 0
    if low < 0:
        raise ValueError(f"mask holds negative labels (min {low})")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return mask.astype(dtype)
    raise ValueError(f"label values up to {high} do not fit in 32 bits")


def _check_grid(array_spatial_shape: tuple[int, ...], like: Scan, what: str) -> None:
    if tuple(array_spatial_shape) != tuple(like.geometry.size):
        raise ValueError(
            f"{what} shape {tuple(array_spatial_shape)} does not match {like.source or 'the scan'}'s grid "
            f"{like.geometry.size}; undo any crop/pad/resample first"
        )


def write_mask(mask: np.ndarray, like: Scan, path: str | Path, *, scale_for_viewing: bool = False,
               pnginfo: Any = None, notes: str | None = None) -> Path:
    """Write a label map on ``like``'s grid; returns the path written.

    ``mask``: ``(y, x)`` or ``(z, y, x)`` integer labels (bool allowed), the shape of ``like.geometry.size``.
    The suffix picks the format: ``.png``/``.tif`` (2D only) or ``.nii.gz``/``.nii``/``.nrrd``/``.mha``
    (2D or 3D, carrying ``like.geometry`` exactly, so the mask overlays the source in any viewer).

    Label values are written as given (class 1 is stored as 1, which looks black in an image viewer), in uint8
    when they fit, else uint16. ``scale_for_viewing=True`` (PNG/TIFF only) spreads labels over 0..255 (e.g.
    1 -> 255) for human eyes; such a file no longer holds class indices. ``pnginfo`` (PNG text chunks) and
    ``notes`` (a volume header note) stamp the file as it is written.
    """
    path = Path(path)
    labels = _labels_as_integers(mask)
    _check_grid(labels.shape, like, "mask")
    fmt = detect_format(path)
    if fmt in RASTER_FORMATS:
        if fmt not in _MASK_RASTER_FORMATS:
            raise ValueError(f"{path.name}: masks need a lossless format (.png, .tif, .nii.gz), not {fmt}")
        if labels.ndim != 2:
            raise ValueError(f"{path.name}: PNG/TIFF hold 2D masks; write a {labels.ndim}D mask as .nii.gz")
        if scale_for_viewing:
            top = int(labels.max())
            if top > 255:
                raise ValueError(f"scale_for_viewing needs labels <= 255, got {top}")
            labels = (labels.astype(np.uint16) * (255 // max(top, 1))).astype(np.uint8)
        if labels.dtype == np.uint32:
            raise ValueError(f"{path.name}: PNG/TIFF masks hold labels up to 65535; use .nii.gz")
        with atomic_path(path) as tmp:
            write_raster(labels, tmp, spacing=like.geometry.spacing, pnginfo=pnginfo)
        return path
    if scale_for_viewing:
        raise ValueError("scale_for_viewing applies to PNG/TIFF only; volumes keep class indices")
    _require_volume_suffix(path)
    with atomic_path(path) as tmp:
        write_volume(labels, like.geometry, tmp, notes=notes)
    return path


def write_overlay(
    image: Scan | np.ndarray,
    mask: np.ndarray,
    colors: Mapping[int, ColorSpec] | None,
    path: str | Path,
    alpha: float = 0.5,
    *,
    slice_index: int | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write an RGB PNG of ``mask`` blended over ``image`` (see ``overlay.render_overlay``); returns the path.

    ``image``: Scan or array ``(y, x)``, ``(y, x, C)``, ``(z, y, x)``; ``mask`` has its spatial shape.
    ``colors``: label -> "#rrggbb" / (r, g, b), None for defaults. For volumes the slice with the most
    foreground is drawn unless ``slice_index`` is given. ``window`` = (width, level) for CT, else percentiles.
    """
    path = Path(path)
    if detect_format(path) != ScanFormat.png:
        raise ValueError(f"{path.name}: overlays are written as .png")
    rgb = render_overlay(image, mask, colors, alpha, slice_index=slice_index, window=window)
    with atomic_path(path) as tmp:
        # A preview, rewritten with every prediction: fast zlib (level 1 took 4 ms for 512² here, the default 20 ms).
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)
    return path


def write_probabilities(probs: np.ndarray, like: Scan, path: str | Path) -> Path:
    """Write per-class probabilities ``(C, *spatial)`` on ``like``'s grid as float32; returns the path written.

    ``.npz`` (any dimensionality; arrays ``probabilities`` and ``geometry`` (JSON), no pickle) or a vector
    NIfTI/NRRD/MHA with C components per voxel (viewers show them as channels). Read back with
    ``read_probabilities``. A path without one of these suffixes gets ``.nii.gz`` (volumes) or ``.npz`` (2D).
    """
    path = Path(path)
    if full_suffix(path) not in (".npz", *WRITABLE_VOLUME_SUFFIXES):
        # No recognised suffix (e.g. "case_probs"): NIfTI for volumes, .npz for 2D.
        path = path.with_name(path.name + (".nii.gz" if like.is_volume else ".npz"))
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != like.geometry.ndim + 1:
        raise ValueError(
            f"probabilities must be (C, *spatial) for a {like.geometry.ndim}D scan, got {probs.shape}"
        )
    _check_grid(probs.shape[1:], like, "probabilities")
    if full_suffix(path) == ".npz":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, probabilities=probs, geometry=np.array(json.dumps(like.geometry.to_dict()))
            )
        return path
    _require_volume_suffix(path)
    with atomic_path(path) as tmp:
        write_volume(np.moveaxis(probs, 0, -1), like.geometry, tmp, is_vector=True)
    return path


def write_scan(scan: Scan, path: str | Path) -> Path:
    """Write a scan's image with its geometry (e.g. a DICOM series as NIfTI for download); returns the path.

    PNG/TIFF take 2D uint8/uint16 grey or uint8 RGB; NIfTI/NRRD/MHA take anything ``read_scan`` returns.
    """
    path = Path(path)
    fmt = detect_format(path)
    array = scan.array
    if fmt in RASTER_FORMATS:
        if fmt not in _MASK_RASTER_FORMATS or scan.is_volume:
            raise ValueError(f"{path.name}: write 2D scans as .png/.tif and volumes as .nii.gz")
        with atomic_path(path) as tmp:
            write_raster(array, tmp, spacing=scan.geometry.spacing)
        return path
    _require_volume_suffix(path)
    with atomic_path(path) as tmp:
        write_volume(array, scan.geometry, tmp, is_vector=scan.channels > 1 or array.ndim > scan.spatial_ndim)
    return path


def _require_volume_suffix(path: Path) -> None:
    if full_suffix(path) not in WRITABLE_VOLUME_SUFFIXES:
        allowed = ", ".join(WRITABLE_VOLUME_SUFFIXES)
        raise ValueError(f"{path.name}: unsupported output type; use .png/.tif (2D) or {allowed}")
