"""Mask edits on one 2D slice, as the editing view applies them: brush, eraser, fill a hole, delete a connected
component, and click prompts that use the model's own probabilities (issue 16 items 7 and 8); with undo/redo.

Everything here is numpy on a slice ``(rows, cols)`` of class indices, so it is tested without a browser. Slices of a
volume are views (``display.take_plane``), so an edit writes through into the volume. The history keeps, per edit, the
slice's values before and after, so undo/redo restore exactly what was there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.draw import line

PROMPT_WINDOW = 48  # px: a click prompt grows at most this far from the click (a *local* threshold)
PROMPT_MIN_PROBABILITY = 0.02  # below this at the click, the model sees nothing there: nothing is added
PROMPT_RELATIVE = 0.5  # the region: pixels whose probability is at least half the click's (and above the minimum)


class EditRefused(ValueError):
    """An edit that does nothing sensible where it was asked (the message says why, for the page)."""


def _stroke_pixels(shape: tuple[int, int], points: Sequence[Sequence[float]], radius: float) -> np.ndarray:
    """Boolean footprint of a brush of ``radius`` px dragged through ``points`` (x, y in slice pixels)."""
    hit = np.zeros(shape, bool)
    pts = [(float(y), float(x)) for x, y in points]
    if not pts:
        return hit
    r = max(0.5, float(radius))
    # Centres along the path at most one pixel apart, so a fast drag leaves no gaps.
    centres = {(round(pts[0][0]), round(pts[0][1]))}
    for (y0, x0), (y1, x1) in zip(pts, pts[1:], strict=False):
        rr, cc = line(round(y0), round(x0), round(y1), round(x1))
        centres.update(zip(rr.tolist(), cc.tolist(), strict=True))
    # The brush: every pixel within ``radius`` of a centre (distance <= radius, so size 1 is one pixel wide).
    span = int(np.floor(r))
    dy, dx = np.mgrid[-span : span + 1, -span : span + 1]
    keep = dy**2 + dx**2 <= r * r
    dy, dx = dy[keep], dx[keep]
    for y, x in centres:
        rr, cc = y + dy, x + dx
        inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        hit[rr[inside], cc[inside]] = True
    return hit


def brush(mask: np.ndarray, points: Sequence[Sequence[float]], radius: float, label: int) -> np.ndarray:
    """The changed pixels after painting ``label`` along the stroke (other labels there are overwritten)."""
    where = _stroke_pixels(mask.shape, points, radius)
    out = mask.copy()
    out[where] = label
    return out


def erase(mask: np.ndarray, points: Sequence[Sequence[float]], radius: float, label: int) -> np.ndarray:
    """Erase ``label`` along the stroke (other labels are left alone: an edit is per label)."""
    where = _stroke_pixels(mask.shape, points, radius) & (mask == label)
    out = mask.copy()
    out[where] = 0
    return out


def _pixel(mask: np.ndarray, x: float, y: float) -> tuple[int, int]:
    r, c = int(np.clip(round(y), 0, mask.shape[0] - 1)), int(np.clip(round(x), 0, mask.shape[1] - 1))
    return r, c


def fill_hole(mask: np.ndarray, x: float, y: float, label: int) -> np.ndarray:
    """Fill the hole of ``label`` that contains the click: the connected region of other values around it, when
    ``label`` encloses it (it does not reach the slice's border)."""
    r, c = _pixel(mask, x, y)
    if mask[r, c] == label:
        raise EditRefused("Click inside a hole (a gap surrounded by the label), not on the label itself.")
    regions, _ = ndimage.label(mask != label)
    region = regions == regions[r, c]
    if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
        raise EditRefused("That area is not enclosed by the label, so it is not a hole (use the brush).")
    out = mask.copy()
    out[region] = label
    return out


def delete_component(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    """Remove the connected component (of whatever label) under the click."""
    r, c = _pixel(mask, x, y)
    value = mask[r, c]
    if value == 0:
        raise EditRefused("Click on a segmented region to delete it.")
    regions, _ = ndimage.label(mask == value)
    out = mask.copy()
    out[regions == regions[r, c]] = 0
    return out


def prompt_add(mask: np.ndarray, probability: np.ndarray, x: float, y: float, label: int) -> np.ndarray:
    """A click in a structure the model missed: add the region its own ``probability`` map (of ``label``, same
    shape as ``mask``) supports around the click — the connected pixels, within ``PROMPT_WINDOW`` px, whose
    probability is at least ``PROMPT_RELATIVE`` of the click's (a threshold lowered locally, not everywhere)."""
    r, c = _pixel(mask, x, y)
    p_click = float(probability[r, c])
    if p_click < PROMPT_MIN_PROBABILITY:
        raise EditRefused(f"The model sees nothing here (probability {p_click:.3f}); paint it with the brush.")
    threshold = max(PROMPT_MIN_PROBABILITY, PROMPT_RELATIVE * p_click)
    r0, r1 = max(0, r - PROMPT_WINDOW), min(mask.shape[0], r + PROMPT_WINDOW + 1)
    c0, c1 = max(0, c - PROMPT_WINDOW), min(mask.shape[1], c + PROMPT_WINDOW + 1)
    regions, _ = ndimage.label(probability[r0:r1, c0:c1] >= threshold)
    grown = regions == regions[r - r0, c - c0]
    out = mask.copy()
    out[r0:r1, c0:c1][grown] = label
    return out


def prompt_remove(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    """A click on a false positive: remove that component."""
    return delete_component(mask, x, y)


@dataclass
class Edit:
    """One applied edit: where (plane, slice) and the slice's values before and after."""

    where: tuple[str, int]
    before: np.ndarray
    after: np.ndarray


@dataclass
class EditHistory:
    """Undo/redo over edits of one mask (a result's editable copy)."""

    done: list[Edit] = field(default_factory=list)
    undone: list[Edit] = field(default_factory=list)

    def record(self, where: tuple[str, int], before: np.ndarray, after: np.ndarray) -> bool:
        """Remember an edit (False, and nothing remembered, when it changed nothing)."""
        if np.array_equal(before, after):
            return False
        self.done.append(Edit(where, before.copy(), after.copy()))
        self.undone.clear()
        return True

    def undo(self) -> Edit | None:
        if not self.done:
            return None
        edit = self.done.pop()
        self.undone.append(edit)
        return edit

    def redo(self) -> Edit | None:
        if not self.undone:
            return None
        edit = self.undone.pop()
        self.done.append(edit)
        return edit
