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


@dataclass(frozen=True)
class _Strength:
    """How often and how hard the full presets (default, heavy) transform: they differ only in these numbers."""

    affine_p: float
    rotate: float  # degrees
    shear: float  # degrees
    warp_p: float
    warp: float
    brightness_contrast: float
    brightness_contrast_p: float
    gamma: tuple[int, int]  # percent
    gamma_p: float
    noise_std: tuple[float, float]
    blur_sigma: tuple[float, float]
    noise_or_blur_p: float
    colour_p: float
    colour: float
    zoom: tuple[float, float]


_DEFAULT = _Strength(0.5, 45, 10, 0.3, 1.0, 0.2, 0.5, (80, 125), 0.3, (0.01, 0.05), (0.3, 1.0), 0.2, 0.3, 1.0, (0.8, 1.25))
_HEAVY = _Strength(0.7, 180, 15, 0.5, 1.5, 0.3, 0.7, (70, 150), 0.5, (0.02, 0.08), (0.3, 1.5), 0.4, 0.5, 2.0, (0.67, 1.5))


def _full_preset(spec: PresetSpec, s: _Strength) -> tuple[list, list, tuple[float, float]]:
    geometric = [*_flips(spec), _affine(spec, s.affine_p, s.rotate, s.shear), _warp(spec, s.warp_p, s.warp)]
    photometric = [
        A.RandomBrightnessContrast(brightness_limit=s.brightness_contrast, contrast_limit=s.brightness_contrast,
                                   p=s.brightness_contrast_p),
        A.RandomGamma(gamma_limit=s.gamma, p=s.gamma_p),
        A.OneOf([A.GaussNoise(std_range=s.noise_std, p=1.0), A.GaussianBlur(sigma_limit=s.blur_sigma, p=1.0)],
                p=s.noise_or_blur_p),
        *_colour(spec, s.colour_p, s.colour),
    ]
    return geometric, photometric, s.zoom


@AUGMENTATIONS.register("default")
def _preset_default(spec: PresetSpec) -> tuple[list, list, tuple[float, float]]:
    return _full_preset(spec, _DEFAULT)


@AUGMENTATIONS.register("heavy")
def _preset_heavy(spec: PresetSpec) -> tuple[list, list, tuple[float, float]]:
    return _full_preset(spec, _HEAVY)
