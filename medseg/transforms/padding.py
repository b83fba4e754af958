"""Mirror padding for overlap-tile segmentation, recorded so predictions crop back exactly.

The U-Net paper predicts the border of an image from mirrored context; networks with 5 poolings also need
sizes divisible by 32. Both work on numpy arrays (e.g. ``(C, H, W)``) and torch tensors (e.g.
``(B, C, H, W)``); only the axes named in ``spatial_axes`` are padded (default: the last two).

``pad_widths`` is always one ``(before, after)`` pair per axis of the array (numpy ``np.pad`` layout), so
``crop_padding(pad(x)[0], pad_widths)`` is ``x`` — and also crops a prediction with different non-spatial
axes (e.g. ``(B, K, H, W)`` logits of a ``(B, C, H, W)`` input) as long as the rank is the same.

``reflect`` follows numpy's definition (mirror without repeating the edge pixel) for any pad width: a pad
wider than the image continues the mirror pattern periodically (period ``2·(n - 1)``), which torch's
``F.pad(mode="reflect")`` refuses; tensors use an index gather that reproduces numpy exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PadWidths", "crop_padding", "pad", "pad_to_multiple", "pad_to_size", "reflect_indices"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
PadWidths = tuple[tuple[int, int], ...]
PadMode = Literal["reflect", "constant"]


def reflect_indices(n: int, before: int, after: int) -> np.ndarray:
    """Source indices of numpy's ``reflect`` padding of an axis of length ``n``: ``(before + n + after,)``."""
    if n < 1:
        raise ValueError("cannot reflect-pad an empty axis")
    i = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = np.mod(i, period)
    return np.where(m < n, m, period - m)


def _normalise_axes(spatial_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = tuple(a % ndim for a in spatial_axes)
    if len(set(axes)) != len(axes) or any(not -ndim <= a < ndim for a in spatial_axes):
        raise ValueError(f"spatial_axes {tuple(spatial_axes)} invalid for an array with {ndim} axes")
    return axes


def _per_axis(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * n if isinstance(value, int | np.integer) else tuple(int(v) for v in value)
    if len(values) != n or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or one per spatial axis ({n}), got {value}")
    return values


def pad(array: ArrayT, pad_widths: PadWidths, mode: PadMode = "reflect", value: float = 0.0) -> ArrayT:
    """Pad ``array`` by ``pad_widths`` (one ``(before, after)`` per axis), numpy or torch alike."""
    if len(pad_widths) != array.ndim:
        raise ValueError(f"pad_widths has {len(pad_widths)} pairs for an array with {array.ndim} axes")
    if mode not in ("reflect", "constant"):
        raise ValueError(f"padding mode must be 'reflect' or 'constant', got {mode!r}")
    if all(b == 0 and a == 0 for b, a in pad_widths):
        return array
    if isinstance(array, np.ndarray):
        if mode == "constant":
            return np.pad(array, pad_widths, mode="constant", constant_values=value)
        return np.pad(array, pad_widths, mode="reflect")
    if mode == "constant":
        # F.pad takes pairs from the last axis backwards.
        flat = [w for b, a in reversed(pad_widths) for w in (b, a)]
        return F.pad(array, flat, mode="constant", value=value)
    out = array
    for axis, (b, a) in enumerate(pad_widths):
        if b or a:
            idx = torch.from_numpy(reflect_indices(out.shape[axis], b, a)).to(out.device)
            out = torch.index_select(out, axis, idx)
    return out


def _split(total: int) -> tuple[int, int]:
    # Centre the image in the padded canvas so both borders get mirrored context.
    return total // 2, total - total // 2


def pad_to_multiple(
    array: ArrayT,
    multiple: int | Sequence[int],
    mode: PadMode = "reflect",
    spatial_axes: Sequence[int] = (-2, -1),
    value: float = 0.0,
) -> tuple[ArrayT, PadWidths]:
    """Pad the spatial axes up to the next multiple of ``multiple`` (e.g. 32 for 5 poolings), centred.

    Args:
        array: numpy array or torch tensor, e.g. ``(C, H, W)``, ``(B, C, H, W)``, ``(C, Z, Y, X)``.
        multiple: one int for all spatial axes or one per axis.
        mode: ``reflect`` (mirror, numpy semantics) or ``constant`` (``value``).
        spatial_axes: axes to pad.

    Returns:
        ``(padded, pad_widths)``; ``crop_padding(padded, pad_widths)`` restores ``array``.
    """
    axes = _normalise_axes(spatial_axes, array.ndim)
    multiples = _per_axis(multiple, len(axes), "multiple")
    widths = [(0, 0)] * array.ndim
    for axis, m in zip(axes, multiples, strict=True):
        widths[axis] = _split(-array.shape[axis] % m)
    widths_t = tuple(widths)
    return pad(array, widths_t, mode, value), widths_t


def pad_to_size(
    array: ArrayT,
    size: int | Sequence[int],
    mode: PadMode = "reflect",
    spatial_axes: Sequence[int] = (-2, -1),
    value: float = 0.0,
) -> tuple[ArrayT, PadWidths]:
    """Pad the spatial axes up to at least ``size`` (centred); axes already as large are left alone.

    Reflect padding works even when the pad is wider than the image (e.g. a 37-pixel image to 256).

    Returns:
        ``(padded, pad_widths)``; ``crop_padding(padded, pad_widths)`` restores ``array``.
    """
    axes = _normalise_axes(spatial_axes, array.ndim)
    sizes = _per_axis(size, len(axes), "size")
    widths = [(0, 0)] * array.ndim
    for axis, s in zip(axes, sizes, strict=True):
        widths[axis] = _split(max(s - array.shape[axis], 0))
    widths_t = tuple(widths)
    return pad(array, widths_t, mode, value), widths_t


def crop_padding(array: ArrayT, pad_widths: PadWidths) -> ArrayT:
    """Undo :func:`pad_to_multiple` / :func:`pad_to_size`: slice ``pad_widths`` off every axis.

    ``array`` must have the padded array's rank; non-spatial axes with ``(0, 0)`` may differ in size.
    """
    if len(pad_widths) != array.ndim:
        raise ValueError(f"pad_widths has {len(pad_widths)} pairs for an array with {array.ndim} axes")
    index = tuple(slice(b, array.shape[axis] - a) for axis, (b, a) in enumerate(pad_widths))
    return array[index]
