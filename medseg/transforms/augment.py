"""The 2D training augmentation (:func:`build_augmentation_2d`): albumentations pipelines around a preset.

The image ``(H, W, C)`` float32 in [0, 1], the class mask ``(H, W)`` and an optional U-Net weight map
``(H, W)`` move together. They run through two albumentations pipelines:

1. **geometric** — the mask is albumentations' ``mask`` target, resampled nearest-neighbour: in 2.0.8 each
   geometric transform's ``mask_interpolation`` (default ``INTER_NEAREST``) applies to *every* mask target,
   so a weight map given as an extra mask would be nearest-resampled too. The weight map is therefore an
   extra ``image`` target, resampled **linearly** like the image (it is a smooth field). All targets of one
   call share the same random parameters, so they stay aligned. The resizing crop uses
   ``INTER_NEAREST_EXACT`` for the mask: cv2's plain ``INTER_NEAREST`` resize is off by ~half a pixel.
2. **photometric** — brightness/contrast/gamma, noise/blur, hue/colour: image only; running it separately
   keeps these away from the weight map, which as an ``image`` target would otherwise receive them too.
3. **random convolution** (optional, ``augment.random_convolution``): the shape-bias transform of
   `medseg.transforms.random_conv`, image only, last.

Images smaller than the patch are mirror-padded first (``PadIfNeeded``, ``BORDER_REFLECT_101`` = numpy
``reflect``), then a random crop whose size varies around the patch size (zoom relative to the *patch*, so
that images of different sizes are zoomed alike) is resized to the patch.

The presets live in `medseg.transforms.augment_presets`, the generator plumbing in
`medseg.transforms.augment_rng`, 3D in `medseg.transforms.augment_3d`, batch mixup/cutmix in
`medseg.transforms.augment_mix`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

from medseg.transforms.augment_presets import AUGMENTATIONS, CV2_BORDER, PaddingMode, PresetSpec
from medseg.transforms.augment_rng import ComposeRandomState
from medseg.transforms.random_conv import RandomConvolution

__all__ = ["Augment2D", "build_augmentation_2d"]


class Augment2D(ComposeRandomState):
    """A built 2D augmentation: ``aug(image, mask, weight=None) -> {"image", "mask"[, "weight"]}``.

    ``image`` ``(H, W, C)`` float32 in [0, 1]; ``mask`` ``(H, W)`` integer classes; ``weight`` ``(H, W)``
    float32 or None; ``soft`` ``(H, W, K)`` float32 (a teacher's probabilities) or None. Outputs have the patch size; the mask keeps its dtype and values (nearest resampling),
    the weight map is resampled linearly. ``state_dict``/``load_state_dict``/``reseed`` handle the two
    pipelines' private generators (`ComposeRandomState`).
    """

    def __init__(self, geometric: A.Compose, photometric: A.Compose, channels: int,
                 texture: RandomConvolution | None = None) -> None:
        super().__init__((geometric, photometric))
        self.geometric = geometric
        self.photometric = photometric
        self.channels = channels
        self.texture = texture

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.texture is not None:
            state["random_convolution"] = self.texture.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.texture is not None and "random_convolution" in state:
            self.texture.load_state_dict(state["random_convolution"])

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        if self.texture is not None:
            self.texture.set_random_state((seed + len(self.composes)) % 2**32)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, weight: np.ndarray | None = None, soft: np.ndarray | None = None
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
        if soft is not None:  # a teacher's probabilities (H, W, K): moved and resampled linearly, like the image
            if soft.shape[:2] != mask.shape:
                raise ValueError(f"soft target shape {soft.shape[:2]} differs from mask shape {mask.shape}")
            targets["soft"] = soft.astype(np.float32, copy=False)
        out = self.geometric(**targets)
        image_out = self.photometric(image=out["image"])["image"]
        if image_out.ndim == 2:  # one-channel images may come back without their channel axis
            image_out = image_out[..., None]
        if self.texture is not None:
            image_out = np.moveaxis(self.texture(np.ascontiguousarray(np.moveaxis(image_out, -1, 0))), 0, -1)
        result = {"image": image_out.astype(np.float32, copy=False), "mask": out["mask"].astype(mask.dtype)}
        if weight is not None:
            result["weight"] = out["weight"].astype(np.float32, copy=False)
        if soft is not None:
            result["soft"] = out["soft"].astype(np.float32, copy=False)
        return result


def build_augmentation_2d(
    preset: str,
    patch_size: Sequence[int],
    channels: int,
    padding_mode: PaddingMode = "reflect",
    *,
    rgb: bool | None = None,
    seed: int | None = None,
    random_convolution: float = 0.0,
    random_convolution_kernels: Sequence[int] = (1, 3, 5, 7),
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
        random_convolution: probability per patch of the random-convolution shape-bias transform
            (`medseg.transforms.random_conv`); ``random_convolution_kernels`` its kernel sizes.
    """
    if padding_mode not in CV2_BORDER:
        raise ValueError(f"padding_mode must be reflect or constant, got {padding_mode!r}")
    ph, pw = (int(s) for s in patch_size)
    spec = PresetSpec((ph, pw), channels == 3 if rgb is None else rgb, CV2_BORDER[padding_mode])
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
    texture = None
    if random_convolution > 0:
        texture = RandomConvolution(random_convolution, random_convolution_kernels)
        texture.set_random_state(None if seed is None else seed + 2)
    return Augment2D(
        A.Compose([pad, crop, *geometric], additional_targets={"weight": "image", "soft": "image"}, seed=seeds[0]),
        A.Compose(photometric, seed=seeds[1]),
        channels,
        texture,
    )
