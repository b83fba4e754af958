"""The 2D augmentation presets (``AUGMENTATIONS`` registry): which albumentations transforms each preset adds
after the random crop, and how far it zooms.

Presets: ``none`` (pad + random crop: sampling only), ``light`` (+ flips, mild zoom and brightness/contrast),
``default`` (+ rotation, shear, elastic/grid warping as in the U-Net paper, gamma, noise/blur, colour for RGB),
``heavy`` (the same, stronger and more often). `medseg.transforms.augment` builds the pipelines around them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import albumentations as A
import cv2

from medseg.registry import Registry

__all__ = ["AUGMENTATIONS", "CV2_BORDER", "PaddingMode", "PresetBuilder", "PresetSpec"]

PaddingMode = Literal["reflect", "constant"]
CV2_BORDER = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


@dataclass(frozen=True)
class PresetSpec:
    """What a preset builder needs to know about the task."""

    patch_size: tuple[int, int]
    rgb: bool
    border_mode: int


# A preset builder returns (geometric transforms after the crop, photometric transforms, zoom range).
PresetBuilder = Callable[[PresetSpec], tuple[list[A.BasicTransform], list[A.BasicTransform], tuple[float, float]]]
AUGMENTATIONS: Registry[PresetBuilder] = Registry("augmentation preset")


def _flips(spec: PresetSpec) -> list[A.BasicTransform]:
    # All 8 rotations/reflections of a square patch; a non-square patch can only be flipped, since a
    # 90° turn would change its shape.
    if spec.patch_size[0] == spec.patch_size[1]:
        return [A.SquareSymmetry(p=1.0)]
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]


def _warp(spec: PresetSpec, p: float, strength: float) -> A.BasicTransform:
    # The paper's smooth local deformations. Measured on a 256² patch: ElasticTransform(300, 12) moves pixels
    # ~2 px on average (5 px max); GridDistortion(5, 0.15) ~5 px (10 px max).
    border = {"border_mode": spec.border_mode, "fill": 0, "fill_mask": 0}
    return A.OneOf(
        [
            A.ElasticTransform(alpha=300 * strength, sigma=12, p=1.0, **border),
            A.GridDistortion(num_steps=5, distort_limit=0.15 * strength, p=1.0, **border),
        ],
        p=p,
    )


def _affine(spec: PresetSpec, p: float, rotate: float, shear: float) -> A.BasicTransform:
    return A.Affine(
        rotate=(-rotate, rotate),
        shear=(-shear, shear),
        border_mode=spec.border_mode,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _colour(spec: PresetSpec, p: float, strength: float) -> list[A.BasicTransform]:
    if not spec.rgb:
        return []
    # Stain/colour variation of H&E and brightfield images; hue in degrees, saturation/value in percent.
    return [
        A.HueSaturationValue(
            hue_shift_limit=10 * strength, sat_shift_limit=15 * strength, val_shift_limit=10 * strength, p=p
        )
    ]


@AUGMENTATIONS.register("none")
def _preset_none(spec: PresetSpec) -> tuple[list, list, tuple[float, float]]:
    return [], [], (1.0, 1.0)


@AUGMENTATIONS.register("light")
def _preset_light(spec: PresetSpec) -> tuple[list, list, tuple[float, float]]:
    geometric = _flips(spec)
    photometric = [A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
    return geometric, photometric, (0.9, 1.1)


@AUGMENTATIONS.register("default")
def _preset_default(spec: PresetSpec) -> tuple[list, list, tuple[float, float]]:
    geometric = [*_flips(spec), _affine(spec, p=0.5, rotate=45, shear=10), _warp(spec, p=0.3, strength=1.0)]
    photometric = [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.RandomGamma(gamma_limit=(80, 125), p=0.3),
        A.OneOf(
            [A.GaussNoise(std_range=(0.01, 0.05), p=1.0), A.GaussianBlur(sigma_limit=(0.3, 1.0), p=1.0)],
            p=0.2,
        ),
        *_colour(spec, p=0.3, strength=1.0),
    ]
    return geometric, photometric, (0.8, 1.25)


@AUGMENTATIONS.register("heavy")
def _preset_heavy(spec: PresetSpec) -> tuple[list, list, tuple[float, float]]:
    geometric = [*_flips(spec), _affine(spec, p=0.7, rotate=180, shear=15), _warp(spec, p=0.5, strength=1.5)]
    photometric = [
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.7),
        A.RandomGamma(gamma_limit=(70, 150), p=0.5),
        A.OneOf(
            [A.GaussNoise(std_range=(0.02, 0.08), p=1.0), A.GaussianBlur(sigma_limit=(0.3, 1.5), p=1.0)],
            p=0.4,
        ),
        *_colour(spec, p=0.5, strength=2.0),
    ]
    return geometric, photometric, (0.67, 1.5)
