"""Colour overlays of a label map on an image, for people to look at (app, reports, ``write_overlay``).

Display only: intensities are windowed to 8 bits here and nowhere else; never feed these arrays to a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from PIL import ImageColor
from scipy.ndimage import binary_erosion

from medseg.io.geometry import Scan

# Distinct, colour-blind-friendlier first choices (Trubetskoy's list); label k > 0 gets DEFAULT_COLORS[(k-1) % n].
DEFAULT_COLORS: tuple[str, ...] = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
    "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075",
)  # fmt: skip

ColorSpec = str | tuple[int, int, int]
DISPLAY_PERCENTILES = (0.5, 99.5)


def default_color(label: int) -> str:
    """``#rrggbb`` for ``label`` when the config names none: black for background, then ``DEFAULT_COLORS`` in
    turn (the one palette: overlays, bundles' labels.json and the app's legend)."""
    return "#000000" if label <= 0 else DEFAULT_COLORS[(label - 1) % len(DEFAULT_COLORS)]


def label_colors(
    labels: Iterable[int], colors: Mapping[int, ColorSpec] | None = None
) -> dict[int, tuple[int, int, int]]:
    """RGB (0-255) for each label > 0: from ``colors`` ("#rrggbb", a colour name, or an (r, g, b) tuple),
    else from ``DEFAULT_COLORS``."""
    colors = colors or {}
    out = {}
    for label in labels:
        label = int(label)
        if label <= 0:
            continue
        spec = colors.get(label, default_color(label))
        rgb = ImageColor.getrgb(spec) if isinstance(spec, str) else tuple(int(c) for c in spec)
        out[label] = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    return out


def pick_slice(mask: np.ndarray) -> int:
    """Index along z of the slice of a ``(z, y, x)`` mask with the most foreground (the middle one if empty)."""
    counts = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    return int(np.argmax(counts)) if counts.any() else mask.shape[0] // 2


def to_display_rgb(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """``(y, x)`` or ``(y, x, C)`` -> ``(y, x, 3)`` uint8 for display.

    RGB uint8 is kept as is (stain colours matter); gray images and other types are scaled from ``window`` =
    (width, level) (e.g. CT (400, 40)) or from the 0.5-99.5 percentiles, so dim fluorescence stays visible.
    """
    if image.ndim == 3:
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
    if image.dtype != np.uint8 or window is not None or image.ndim == 2:
        values = image.astype(np.float32)
        if window is not None:
            width, level = window
            low, high = level - width / 2, level + width / 2
        else:
            low, high = (float(v) for v in np.percentile(values, DISPLAY_PERCENTILES))
        high = max(high, low + 1e-6)
        image = (np.clip((values - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image)


def render_overlay(
    image: Scan | np.ndarray,
    mask: np.ndarray,
    colors: Mapping[int, ColorSpec] | None = None,
    alpha: float = 0.35,
    *,
    slice_index: int | None = None,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Blend a label map onto an image: returns ``(y, x, 3)`` uint8.

    ``image``: a Scan or an array ``(y, x)``, ``(y, x, C)`` or ``(z, y, x)``; ``mask``: integer labels with the
    image's spatial shape (0 = background, left uncoloured). For volumes one slice is shown: ``slice_index``,
    or by default the slice with the most foreground.
    """
    array = image.array if isinstance(image, Scan) else np.asarray(image)
    volume = image.is_volume if isinstance(image, Scan) else (array.ndim == 3 and mask.ndim == 3)
    spatial = array.shape[: mask.ndim]
    if tuple(spatial) != tuple(mask.shape):
        raise ValueError(f"mask shape {mask.shape} does not match the image's spatial shape {array.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if volume:
        index = pick_slice(mask) if slice_index is None else int(slice_index)
        if not 0 <= index < mask.shape[0]:
            raise ValueError(f"slice_index {index} outside 0..{mask.shape[0] - 1}")
        array, mask = array[index], mask[index]
    rgb = to_display_rgb(array, window).astype(np.float32)
    for label, color in label_colors(np.unique(mask), colors).items():
        where = mask == label
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(color, dtype=np.float32)
        # A solid outline keeps the object's extent readable while the translucent fill shows what's beneath.
        rgb[where & ~binary_erosion(where)] = color
    return rgb.round().astype(np.uint8)
