"""What the viewer draws: one plane of a scan with its mask, windowed and at its physical aspect ratio.

Display only (8-bit RGB for eyes, never for a model). Blending is ``medseg.io.render_overlay``; this module adds
the viewer's concerns: planes, window/level presets, hidden labels, the uncertainty layer, ground-truth outlines
and resizing so a voxel of 1 x 1 x 3 mm looks three times taller in coronal and sagittal views.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import numpy as np
from matplotlib import colormaps
from PIL import Image
from skimage.segmentation import find_boundaries

from medseg.bundle import is_hex_colour
from medseg.io import Scan, render_overlay
from medseg.io.overlay import DISPLAY_PERCENTILES, label_colors, pick_slice

# (width, level) in HU, the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Soft tissue": (400.0, 40.0),
    "Lung": (1500.0, -600.0),
    "Bone": (2500.0, 480.0),
    "Brain": (80.0, 40.0),
    "Liver": (150.0, 90.0),
}
AUTO_WINDOW = "Auto (0.5–99.5 %)"
FILE_WINDOW = "From file"
MANUAL_WINDOW = "Manual"
TRUTH_OUTLINE_RGB = (255, 255, 255)
TRUTH_RIM_RGB = (0, 0, 0)
UNCERTAINTY_CMAP = "magma"
DISPLAY_LONG_SIDE = 560  # px: fits a laptop screen with the controls; small scans are enlarged (nearest neighbour)


class Plane(StrEnum):
    axial = "Axial"
    coronal = "Coronal"
    sagittal = "Sagittal"


def is_ct(scan: Scan) -> bool:
    return str(scan.meta.get("modality", "")).upper() == "CT"


def window_options(scan: Scan) -> list[str]:
    """Choices for the window/level selector; CT presets only make sense in Hounsfield units."""
    options = [AUTO_WINDOW]
    if scan.meta.get("window"):
        options.append(FILE_WINDOW)
    if is_ct(scan):
        options += list(WINDOW_PRESETS)
    return [*options, MANUAL_WINDOW]


def default_window_option(scan: Scan) -> str:
    if scan.meta.get("window"):
        return FILE_WINDOW
    return "Soft tissue" if is_ct(scan) else AUTO_WINDOW


def window_label(option: str, scan: Scan) -> str:
    """``Lung (W 1500 / L -600)``: the numbers a radiologist checks, next to the preset's name."""
    window = window_for(option, scan)
    return f"{option} (W {window[0]:g} / L {window[1]:g})" if window else option


def volume_window(scan: Scan) -> tuple[float, float]:
    """(width, level) spanning the whole scan's 0.5-99.5 percentiles, so "Auto" keeps one brightness scale on
    every slice of a volume (per-slice percentiles would make the same tissue change brightness between slices)."""
    # Every other slice, every fourth row and column: the percentiles of ~3 % of the voxels, in well under a second.
    sample = scan.array[::2, ::4, ::4] if scan.is_volume else scan.array
    low, high = (float(v) for v in np.percentile(sample, DISPLAY_PERCENTILES))
    return max(high - low, 1e-6), (high + low) / 2


def window_for(option: str, scan: Scan, manual: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """(width, level) for a selector option; None means percentile scaling of the image shown."""
    if option == FILE_WINDOW:
        return tuple(scan.meta["window"])  # type: ignore[return-value]
    if option == MANUAL_WINDOW:
        return manual
    return WINDOW_PRESETS.get(option)


def has_intensity_window(scan: Scan) -> bool:
    """Every grey-value scan gets a window (8-bit MRI, X-ray and EM too); RGB photographs are shown as stored."""
    return scan.channels == 1


def slice_count(scan: Scan, plane: Plane) -> int:
    if not scan.is_volume:
        return 1
    z, y, x = scan.spatial_shape
    return {Plane.axial: z, Plane.coronal: y, Plane.sagittal: x}[plane]


def best_slice(mask: np.ndarray, plane: Plane) -> int:
    """The slice of ``(z, y, x)`` ``mask`` with the most foreground in ``plane`` (the middle one if empty)."""
    axis = {Plane.axial: 0, Plane.coronal: 1, Plane.sagittal: 2}[plane]
    return pick_slice(np.moveaxis(mask, axis, 0))


def take_plane(volume: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    """``(z, y, x[, ...])`` -> the 2D slice shown for ``plane``; coronal and sagittal put superior (high z) on top."""
    if plane == Plane.axial:
        return volume[index]
    cut = volume[:, index] if plane == Plane.coronal else volume[:, :, index]
    return cut[::-1]


def pixel_spacing(scan: Scan, plane: Plane) -> tuple[float, float]:
    """(row, column) spacing in mm of the slice ``take_plane`` returns."""
    if not scan.is_volume:
        sy, sx = scan.geometry.spacing_zyx
        return sy, sx
    sz, sy, sx = scan.geometry.spacing_zyx
    return {Plane.axial: (sy, sx), Plane.coronal: (sz, sx), Plane.sagittal: (sz, sy)}[plane]


def display_size(shape: tuple[int, int], spacing: tuple[float, float], long_side: int = DISPLAY_LONG_SIDE) -> tuple[int, int]:
    """(height, width) in screen pixels with the slice's physical aspect ratio and a long side of ``long_side``."""
    height_mm, width_mm = shape[0] * spacing[0], shape[1] * spacing[1]
    scale = long_side / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def _blend(rgb: np.ndarray, where: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """``rgb`` with ``colour`` (one RGB, or an image of them) blended in where ``where`` is true."""
    out = rgb.astype(np.float32)
    c = colour[where] if colour.ndim == 3 else colour
    a = alpha[where][:, None] if isinstance(alpha, np.ndarray) else alpha
    out[where] = (1 - a) * out[where] + a * c
    return out.round().astype(np.uint8)


def compose(
    image: np.ndarray,
    mask: np.ndarray | None,
    colors: Mapping[int, str],
    *,
    alpha: float,
    window: tuple[float, float] | None,
    visible: set[int] | None = None,
    uncertainty: np.ndarray | None = None,
    truth_outline: np.ndarray | None = None,
) -> np.ndarray:
    """One 2D view ``(y, x, 3)`` uint8: ``image`` ``(y, x[, C])`` windowed, the visible labels of ``mask`` blended
    in their colours, then (optionally) the uncertainty heat map and ground-truth outlines on top."""
    shown = np.zeros(image.shape[:2], np.uint8) if mask is None else mask
    if visible is not None and mask is not None:
        shown = np.where(np.isin(mask, sorted(visible)), mask, 0)
    rgb = render_overlay(image, shown, dict(colors), alpha, window=window)
    if uncertainty is not None:
        heat = (colormaps[UNCERTAINTY_CMAP](np.clip(uncertainty, 0, 1))[..., :3] * 255).astype(np.float32)
        strength = np.clip(uncertainty, 0, 1).astype(np.float32) * 0.85
        rgb = _blend(rgb, uncertainty > 0.02, heat, strength)
    if truth_outline is not None:
        # A white line with a dark rim just outside it: visible on bright tissue (bone, contrast) and on dark.
        rim = find_boundaries(truth_outline, mode="outer") & (truth_outline == 0)
        rgb = _blend(rgb, rim, np.asarray(TRUTH_RIM_RGB, np.float32), 1.0)
        edges = find_boundaries(truth_outline, mode="inner") & (truth_outline > 0)
        rgb = _blend(rgb, edges, np.asarray(TRUTH_OUTLINE_RGB, np.float32), 1.0)
    return rgb


# ITK directions are LPS: +x points to the patient's left, +y posterior, +z superior.
_TOWARDS = ("L", "P", "S")
_AWAY = ("R", "A", "I")


def _towards(vector: np.ndarray) -> str:
    k = int(np.argmax(np.abs(vector)))
    return _TOWARDS[k] if vector[k] > 0 else _AWAY[k]


def orientation_labels(scan: Scan, plane: Plane) -> dict[str, str]:
    """Which way the patient faces on each edge of the slice ``take_plane`` shows: ``{"top": "A", "bottom": "P",
    "left": "R", "right": "L"}`` for a standard axial CT (radiological view). Empty for 2D images."""
    if not scan.is_volume or len(scan.geometry.direction) != 9:
        return {}
    axes = np.asarray(scan.geometry.direction, dtype=float).reshape(3, 3)  # column j: index axis j (x, y, z)
    x, y, z = axes[:, 0], axes[:, 1], axes[:, 2]
    columns, rows_down = {Plane.axial: (x, y), Plane.coronal: (x, -z), Plane.sagittal: (y, -z)}[plane]
    return {"right": _towards(columns), "left": _towards(-columns), "bottom": _towards(rows_down),
            "top": _towards(-rows_down)}


def draw_orientation(rgb: np.ndarray, labels: Mapping[str, str]) -> np.ndarray:
    """``rgb`` (screen size) with the orientation letters at the middle of each edge, white on a dark outline."""
    if not labels:
        return rgb
    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    h, w = rgb.shape[:2]
    spots = {"top": (w / 2, 4, "mt"), "bottom": (w / 2, h - 4, "mb"), "left": (5, h / 2, "lm"),
             "right": (w - 5, h / 2, "rm")}
    for edge, text in labels.items():
        x, y, anchor = spots[edge]
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(image)


def to_screen(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a composed view to ``(height, width)``: nearest neighbour when enlarging, area-averaging when shrinking."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    enlarge = size[0] >= rgb.shape[0] and size[1] >= rgb.shape[1]
    resample = Image.Resampling.NEAREST if enlarge else Image.Resampling.BOX
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample))


def legend_colors(labels: Mapping[int, Mapping[str, str]]) -> dict[int, str]:
    """Label index -> "#rrggbb" for every foreground label (bundle colours, else medseg's defaults).

    Bundles are checked when they load, but labels may also come from a remote service: a colour that is not
    ``#rrggbb``/``#rgb`` is replaced by the default rather than breaking (or styling) the page."""
    given = {i: v.get("color") for i, v in labels.items() if i > 0 and is_hex_colour(v.get("color"))}
    # A bundle may give background-black or white to a label; keep them, they are the model's choice.
    rgb = label_colors([i for i in labels if i > 0], given)  # type: ignore[arg-type]
    return {i: "#{:02x}{:02x}{:02x}".format(*c) for i, c in rgb.items()}
