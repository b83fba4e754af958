"""Colour overlays of a label map on an image, for people to look at (app, reports, ``write_overlay``).

Display only: intensities are windowed to 8 bits here and nowhere else; never feed these arrays to a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from PIL import ImageColor

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
    rgb = to_display_rgb(array, window)
    if mask.dtype == bool:
        mask = mask.view(np.uint8)
    # Every label at once (a loop over labels cost ~10 ms per 512² image): ``index`` numbers the labels present
    # (``slots``); each slot has a palette row (0: background, left as it is; then one row per distinct colour).
    if mask.dtype.kind == "u" and mask.dtype.itemsize <= 2:  # label values are their own slots
        labels = np.flatnonzero(np.bincount(mask.ravel()))
        index, slots = mask, labels
    else:
        labels, inverse = np.unique(mask, return_inverse=True)
        index, slots = inverse.reshape(mask.shape), np.arange(len(labels))
    row_of_slot = np.zeros(int(slots.max()) + 1 if slots.size else 1, np.int32)
    palette: dict[tuple[int, int, int], int] = {}
    for slot, color in zip(slots[labels > 0], label_colors(labels, colors).values(), strict=True):
        row_of_slot[slot] = palette.setdefault(color, len(palette) + 1)
    rows = row_of_slot[index]  # (H, W) palette row of each pixel
    # A solid outline keeps the object's extent readable while the translucent fill shows what's beneath: a labelled
    # pixel whose 4-neighbour (or the image edge) has another label — binary erosion of each label's own mask.
    padded = np.pad(index.astype(np.int32), 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    edge = (rows > 0) & ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
                         | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    # One lookup per channel: palette row r maps a display value v to round((1 - alpha) v + alpha colour_r) in
    # float32 (row 0: v itself), row m + r to colour_r, the solid outline.
    colour = np.array([(0, 0, 0), *palette], np.float32)[:, None, :]  # (m, 1, 3)
    m = len(colour)
    values = np.arange(256, dtype=np.float32)[None, :, None]
    blend = ((1 - alpha) * values + alpha * colour).round()
    blend[0] = values[0]
    lut = np.concatenate([blend, np.broadcast_to(colour, blend.shape)]).astype(np.uint8)  # (2m, 256, 3)
    rows = (rows + edge * m) * 256
    return np.stack([lut[..., c].ravel()[rows + rgb[..., c]] for c in range(3)], axis=-1)
