"""3D training augmentation: MONAI random dictionary transforms on channel-first volumes ``(C, Z, Y, X)``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai import transforms as mt

from medseg.transforms.augment_presets import AUGMENTATIONS, PaddingMode

__all__ = ["build_augmentation_3d"]


def build_augmentation_3d(
    preset: str,
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = ("label",),
    weight_keys: Sequence[str] = (),
    spatial_dims: int = 3,
    padding_mode: PaddingMode = "reflect",
) -> mt.Compose:
    """MONAI random dictionary transforms for channel-first volumes ``(C, Z, Y, X)`` (or ``(C, H, W)``).

    Labels use nearest interpolation; images and weight maps bilinear. Intensity transforms touch images
    only. Presets (the 2D preset names): ``none`` (identity), ``light`` (flips), ``default`` (+ small affine,
    noise, intensity scale/shift, gamma), ``heavy`` (stronger, more often). Seed with ``.set_random_state(seed)``.
    """
    if preset not in AUGMENTATIONS:
        raise ValueError(f"unknown 3D augmentation preset {preset!r}; valid: {', '.join(AUGMENTATIONS.names())}")
    if padding_mode not in ("reflect", "constant"):
        raise ValueError(f"padding_mode must be reflect or constant, got {padding_mode!r}")
    images, labels, weights = list(image_keys), list(label_keys), list(weight_keys)
    geo_keys = images + labels + weights
    modes = ["bilinear"] * len(images) + ["nearest"] * len(labels) + ["bilinear"] * len(weights)
    pad_mode = "reflection" if padding_mode == "reflect" else "zeros"
    ops: list[Any] = []
    if preset == "none":
        return mt.Compose(ops)
    ops += [mt.RandFlipd(geo_keys, prob=0.5, spatial_axis=a) for a in range(spatial_dims)]
    if preset == "light":
        return mt.Compose(ops)
    strong = preset == "heavy"
    rot = math.radians(30 if strong else 15)
    # 2.5D volumes are anisotropic: rotate in-plane (about the first spatial axis) more than out of plane.
    rotate_range = (rot,) if spatial_dims == 2 else (rot, rot / 3, rot / 3)
    ops += [
        mt.RandAffined(
            geo_keys,
            prob=0.5 if strong else 0.3,
            rotate_range=rotate_range,
            scale_range=(0.2 if strong else 0.1,) * spatial_dims,
            shear_range=(0.1 if strong else 0.05,) * (1 if spatial_dims == 2 else 6),
            mode=modes,
            padding_mode=pad_mode,
        ),
        mt.RandGaussianNoised(images, prob=0.3 if strong else 0.15, std=0.05 if strong else 0.03),
        mt.RandScaleIntensityd(images, factors=0.2 if strong else 0.1, prob=0.3),
        mt.RandShiftIntensityd(images, offsets=0.1 if strong else 0.05, prob=0.3),
        mt.RandAdjustContrastd(images, prob=0.3, gamma=(0.7, 1.5) if strong else (0.8, 1.25)),
    ]
    return mt.Compose(ops)
