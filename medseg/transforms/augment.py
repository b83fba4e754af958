"""Training augmentation presets: albumentations for 2D, MONAI for 3D, plus batch mixup/cutmix.

2D (:func:`build_augmentation_2d`): the image ``(H, W, C)`` float32 in [0, 1], the class mask ``(H, W)`` and
an optional U-Net weight map ``(H, W)`` move together. It runs in two albumentations pipelines:

1. **geometric** — the mask is albumentations' ``mask`` target, resampled nearest-neighbour: in 2.0.8 each
   geometric transform's ``mask_interpolation`` (default ``INTER_NEAREST``) applies to *every* mask target,
   so a weight map given as an extra mask would be nearest-resampled too. The weight map is therefore an
   extra ``image`` target, resampled **linearly** like the image (it is a smooth field). All targets of one
   call share the same random parameters, so they stay aligned. The resizing crop uses
   ``INTER_NEAREST_EXACT`` for the mask: cv2's plain ``INTER_NEAREST`` resize is off by ~half a pixel.
2. **photometric** — brightness/contrast/gamma, noise/blur, hue/colour: image only; running it separately
   keeps these away from the weight map, which as an ``image`` target would otherwise receive them too.

Images smaller than the patch are mirror-padded first (``PadIfNeeded``, ``BORDER_REFLECT_101`` = numpy
``reflect``), then a random crop whose size varies around the patch size (zoom relative to the *patch*, so
that images of different sizes are zoomed alike) is resized to the patch.

Presets (``AUGMENTATIONS`` registry): ``none`` (pad + random crop: sampling only), ``light`` (+ flips,
mild zoom and brightness/contrast), ``default`` (+ rotation, shear, elastic/grid warping as in the U-Net
paper, gamma, noise/blur, colour for RGB), ``heavy`` (the same, stronger and more often).

3D (:func:`build_augmentation_3d`): MONAI random dictionary transforms on channel-first ``(C, Z, Y, X)``.

Mixup/cutmix (:func:`mix_batch`) act on tensor batches and are off unless asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from monai import transforms as mt

from medseg.registry import Registry
from medseg.transforms.padding import crop_padding, pad_to_multiple

__all__ = [
    "AUGMENTATIONS",
    "Augment2D",
    "MixedBatch",
    "build_augmentation_2d",
    "build_augmentation_3d",
    "build_eval_transform_2d",
    "crop_to_original",
    "cutmix_batch",
    "mix_batch",
    "mixed_loss",
    "mixup_batch",
]

PaddingMode = Literal["reflect", "constant"]
_CV2_BORDER = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


@dataclass(frozen=True)
class _Spec:
    """What a preset builder needs to know about the task."""

    patch_size: tuple[int, int]
    rgb: bool
    border_mode: int


# A preset builder returns (geometric transforms after the crop, photometric transforms, zoom range).
PresetBuilder = Callable[[_Spec], tuple[list[A.BasicTransform], list[A.BasicTransform], tuple[float, float]]]
AUGMENTATIONS: Registry[PresetBuilder] = Registry("augmentation preset")


def _flips(spec: _Spec) -> list[A.BasicTransform]:
    # All 8 rotations/reflections of a square patch; a non-square patch can only be flipped, since a
    # 90° turn would change its shape.
    if spec.patch_size[0] == spec.patch_size[1]:
        return [A.SquareSymmetry(p=1.0)]
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]


def _warp(spec: _Spec, p: float, strength: float) -> A.BasicTransform:
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


def _affine(spec: _Spec, p: float, rotate: float, shear: float) -> A.BasicTransform:
    return A.Affine(
        rotate=(-rotate, rotate),
        shear=(-shear, shear),
        border_mode=spec.border_mode,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _colour(spec: _Spec, p: float, strength: float) -> list[A.BasicTransform]:
    if not spec.rgb:
        return []
    # Stain/colour variation of H&E and brightfield images; hue in degrees, saturation/value in percent.
    return [
        A.HueSaturationValue(
            hue_shift_limit=10 * strength, sat_shift_limit=15 * strength, val_shift_limit=10 * strength, p=p
        )
    ]


@AUGMENTATIONS.register("none")
def _preset_none(spec: _Spec) -> tuple[list, list, tuple[float, float]]:
    return [], [], (1.0, 1.0)


@AUGMENTATIONS.register("light")
def _preset_light(spec: _Spec) -> tuple[list, list, tuple[float, float]]:
    geometric = _flips(spec)
    photometric = [A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
    return geometric, photometric, (0.9, 1.1)


@AUGMENTATIONS.register("default")
def _preset_default(spec: _Spec) -> tuple[list, list, tuple[float, float]]:
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
def _preset_heavy(spec: _Spec) -> tuple[list, list, tuple[float, float]]:
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


class Augment2D:
    """A built 2D augmentation: ``aug(image, mask, weight=None) -> {"image", "mask"[, "weight"]}``.

    ``image`` ``(H, W, C)`` float32 in [0, 1]; ``mask`` ``(H, W)`` integer classes; ``weight`` ``(H, W)``
    float32 or None. Outputs have the patch size; the mask keeps its dtype and values (nearest resampling),
    the weight map is resampled linearly.
    """

    def __init__(self, geometric: A.Compose, photometric: A.Compose, channels: int) -> None:
        self.geometric = geometric
        self.photometric = photometric
        self.channels = channels
        for c in self._composes():
            _share_generators(c)

    # albumentations keeps private generators (numpy Generator + random.Random per Compose) that global seeding
    # does not reach: exact resume saves and restores them, and data-loader workers reseed them.

    def _composes(self) -> tuple[A.Compose, A.Compose]:
        return self.geometric, self.photometric

    def state_dict(self) -> dict[str, Any]:
        """The generators' state, as plain ints/strings/tuples (loadable with ``torch.load(weights_only=True)``)."""
        return {
            f"compose_{i}": {"numpy": c.random_generator.bit_generator.state, "python": c.py_random.getstate()}
            for i, c in enumerate(self._composes())
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, c in enumerate(self._composes()):
            s = state[f"compose_{i}"]
            c.random_generator.bit_generator.state = s["numpy"]
            c.py_random.setstate(s["python"])
            # Compose hands its generators to every transform; keep them pointing at the restored ones.
            c.set_random_state(c.random_generator, c.py_random)

    def reseed(self, seed: int) -> None:
        """New independent streams from ``seed``: each data-loader worker calls this with its own seed, or
        every worker (holding a copy of the same seeded pipeline) would draw the same augmentations."""
        for i, c in enumerate(self._composes()):
            c.set_random_seed((seed + i) % 2**32)
            _share_generators(c)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        if image.ndim != 3 or image.shape[-1] != self.channels:
            raise ValueError(f"image must be (H, W, {self.channels}), got {image.shape}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
        if weight is not None and weight.shape != mask.shape:
            raise ValueError(f"weight shape {weight.shape} differs from mask shape {mask.shape}")
        targets: dict[str, np.ndarray] = {"image": image.astype(np.float32, copy=False), "mask": mask}
        if weight is not None:
            targets["weight"] = weight.astype(np.float32, copy=False)
        out = self.geometric(**targets)
        image_out = self.photometric(image=out["image"])["image"]
        if image_out.ndim == 2:  # one-channel images may come back without their channel axis
            image_out = image_out[..., None]
        result = {"image": image_out.astype(np.float32, copy=False), "mask": out["mask"].astype(mask.dtype)}
        if weight is not None:
            result["weight"] = out["weight"].astype(np.float32, copy=False)
        return result


def _share_generators(compose: A.Compose) -> None:
    """Make every transform draw from the Compose's one generator pair.

    albumentations 2.0.8's ``Compose(seed=s)`` gives each transform its own generators seeded with the same
    ``s``, so their draws are identical: HorizontalFlip(p=0.5) and VerticalFlip(p=0.5) then always fire
    together (measured: 93 of 200 calls both, 107 neither, never one alone).
    """
    compose.set_random_state(compose.random_generator, compose.py_random)


def build_augmentation_2d(
    preset: str,
    patch_size: Sequence[int],
    channels: int,
    padding_mode: PaddingMode = "reflect",
    *,
    rgb: bool | None = None,
    seed: int | None = None,
) -> Augment2D:
    """Build a 2D training augmentation from a preset name (``AUGMENTATIONS``: none, light, default, heavy).

    Args:
        preset: preset name.
        patch_size: ``(H, W)`` of the output crops.
        channels: channels of the input image (e.g. 3, or ``(2k+1)·C`` for 2.5D stacks).
        padding_mode: ``reflect`` (mirror, the U-Net way) or ``constant`` (zeros; the weight map is 0 there
            too, so padded pixels do not count in a weighted loss) for padding and warped borders.
        rgb: apply colour (hue/saturation) transforms; None -> ``channels == 3``. Pass False for 2.5D stacks
            of 3 gray slices.
        seed: seeds both pipelines, for reproducible runs and tests.
    """
    if padding_mode not in _CV2_BORDER:
        raise ValueError(f"padding_mode must be reflect or constant, got {padding_mode!r}")
    ph, pw = (int(s) for s in patch_size)
    spec = _Spec((ph, pw), channels == 3 if rgb is None else rgb, _CV2_BORDER[padding_mode])
    geometric, photometric, (zoom_lo, zoom_hi) = AUGMENTATIONS.get(preset)(spec)
    # The crop is zoom × patch before resizing to the patch; pad so the largest crop fits.
    pad = A.PadIfNeeded(
        min_height=math.ceil(ph * zoom_hi),
        min_width=math.ceil(pw * zoom_hi),
        border_mode=spec.border_mode,
        fill=0,
        fill_mask=0,
    )
    if zoom_lo == zoom_hi == 1.0:
        crop: A.BasicTransform = A.RandomCrop(height=ph, width=pw)
    else:
        # cv2's INTER_NEAREST resize is not centre-aligned: the mask lands ~half a pixel off the linearly
        # resized image (measured here: ~2% of a 64² patch disagrees, some pixels away from any edge).
        # INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR does.
        crop = A.RandomSizedCrop(
            min_max_height=(round(ph * zoom_lo), round(ph * zoom_hi)),
            size=(ph, pw),
            w2h_ratio=pw / ph,
            mask_interpolation=cv2.INTER_NEAREST_EXACT,
        )
    seeds = (None, None) if seed is None else (seed, seed + 1)
    return Augment2D(
        A.Compose([pad, crop, *geometric], additional_targets={"weight": "image"}, seed=seeds[0]),
        A.Compose(photometric, seed=seeds[1]),
        channels,
    )


def build_eval_transform_2d(
    pad_multiple: int = 32, padding_mode: PaddingMode = "reflect"
) -> Callable[..., dict[str, Any]]:
    """Validation/inference path, no randomness: pad the whole image to a multiple of ``pad_multiple``.

    ``fn(image(H, W, C), mask(H, W)|None, weight(H, W)|None) -> {"image", "mask", "weight", "pad_widths"}``
    (absent inputs stay None). ``pad_widths`` holds the ``(H, W)`` pads; crop a ``(..., H', W')`` prediction
    back with ``crop_to_original``.
    """

    def transform(
        image: np.ndarray, mask: np.ndarray | None = None, weight: np.ndarray | None = None
    ) -> dict[str, Any]:
        padded, widths = pad_to_multiple(image, pad_multiple, padding_mode, spatial_axes=(0, 1))
        hw = widths[:2]
        out: dict[str, Any] = {"image": padded.astype(np.float32, copy=False), "pad_widths": hw}
        out["mask"] = None if mask is None else pad_to_multiple(mask, pad_multiple, padding_mode, (0, 1))[0]
        # Padded pixels must not count: constant-pad the weight with 0 whatever the image padding is.
        out["weight"] = (
            None if weight is None else pad_to_multiple(weight, pad_multiple, "constant", (0, 1))[0]
        )
        return out

    return transform


def crop_to_original(
    prediction: np.ndarray | torch.Tensor, pad_widths: tuple[tuple[int, int], ...]
) -> np.ndarray | torch.Tensor:
    """Crop the last two axes of a prediction by the ``(H, W)`` ``pad_widths`` of the eval transform."""
    return crop_padding(prediction, ((0, 0),) * (prediction.ndim - 2) + tuple(pad_widths))


# ------------------------------------------------------------------------------------------------ 3D


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
    only. Presets: ``none`` (identity), ``light`` (flips), ``default`` (+ small affine, noise, intensity
    scale/shift, gamma), ``heavy`` (stronger, more often). Seed with ``.set_random_state(seed)``.
    """
    if preset not in ("none", "light", "default", "heavy"):
        raise ValueError(f"unknown 3D augmentation preset {preset!r}; valid: default, heavy, light, none")
    if padding_mode not in _CV2_BORDER:
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


# ----------------------------------------------------------------------------------------- mixup/cutmix


@dataclass
class MixedBatch:
    """A batch after :func:`mix_batch`. Train on it with :func:`mixed_loss`.

    ``image`` ``(B, C, *spatial)``; ``target`` ``(B, *spatial)`` long; ``weight`` ``(B, *spatial)`` or None.
    Mixup also sets ``target_b``/``weight_b`` (the partners) and ``lam`` (share of ``target``); cutmix pastes
    hard labels, so it needs no partner (``lam`` = 1).
    """

    image: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    target_b: torch.Tensor | None = None
    weight_b: torch.Tensor | None = None
    lam: float = 1.0


def mixup_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    alpha: float = 0.4,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Mixup (Zhang et al. 2018): ``lam·x_i + (1 - lam)·x_perm(i)``, ``lam ~ Beta(alpha, alpha)``.

    Targets stay hard; the loss mixes instead (:func:`mixed_loss`).
    """
    lam = float(np.random.default_rng(_seed(generator)).beta(alpha, alpha))
    perm = torch.randperm(image.shape[0], generator=generator, device="cpu").to(image.device)
    mixed = lam * image + (1.0 - lam) * image[perm]
    return MixedBatch(mixed, target, weight, target[perm], None if weight is None else weight[perm], lam)


def cutmix_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """CutMix (Yun et al. 2019): paste a box covering ``1 - lam`` of the area from a partner sample.

    Image, target and weight get the same box, so labels stay hard and aligned.
    """
    lam = float(np.random.default_rng(_seed(generator)).beta(alpha, alpha))
    perm = torch.randperm(image.shape[0], generator=generator, device="cpu").to(image.device)
    spatial = image.shape[2:]
    side = (1.0 - lam) ** (1.0 / len(spatial))  # box edge fraction per axis
    box = []
    for n in spatial:
        size = int(round(n * side))
        start = int(torch.randint(0, n - size + 1, (1,), generator=generator))
        box.append(slice(start, start + size))
    image, target = image.clone(), target.clone()
    image[(slice(None), slice(None), *box)] = image[perm][(slice(None), slice(None), *box)]
    target[(slice(None), *box)] = target[perm][(slice(None), *box)]
    if weight is not None:
        weight = weight.clone()
        weight[(slice(None), *box)] = weight[perm][(slice(None), *box)]
    return MixedBatch(image, target, weight)


def _seed(generator: torch.Generator | None) -> int | None:
    return None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def mix_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """With probability ``mixup`` apply mixup, else with probability ``cutmix`` cutmix, else nothing.

    Both default to 0 (``AugmentConfig.mixup`` / ``.cutmix``), which returns the batch unchanged.
    """
    if mixup > 0 or cutmix > 0:
        u = float(torch.rand(1, generator=generator))
        if u < mixup:
            return mixup_batch(image, target, weight, generator=generator)
        if u < mixup + cutmix:
            return cutmix_batch(image, target, weight, generator=generator)
    return MixedBatch(image, target, weight)


def mixed_loss(loss: Callable[..., torch.Tensor], logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
    """``lam·loss(logits, target, weight) + (1 - lam)·loss(logits, target_b, weight_b)``."""
    value = loss(logits, batch.target, batch.weight)
    if batch.target_b is None or batch.lam >= 1.0:
        return value
    return batch.lam * value + (1.0 - batch.lam) * loss(logits, batch.target_b, batch.weight_b)
