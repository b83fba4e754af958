"""Transforms: pure numpy functions (weight maps, padding) first, MONAI/albumentations wrappers second.

The augmentation names are imported on first use (PEP 562 ``__getattr__``): ``weightmap`` and ``padding`` need
only numpy/scipy (and torch for tensors), while the augmentation modules pull in albumentations/MONAI.

- `augment`: the 2D pipeline (`build_augmentation_2d`, `Augment2D`)
- `augment_presets`: the ``AUGMENTATIONS`` preset registry
- `augment_rng`: the pipelines' private generators (share, save, restore, reseed)
- `augment_3d`: `build_augmentation_3d` (MONAI)
- `augment_mix`: batch mixup/cutmix (`mix_batch`, `mixed_loss`)
"""

from __future__ import annotations

import importlib
from typing import Any

from medseg.transforms.padding import crop_padding, pad_to_multiple, pad_to_size
from medseg.transforms.weightmap import (
    compute_weight_map,
    compute_weight_map_reference,
    objects_from_mask,
    objects_from_membranes,
)

_LAZY = {
    "Augment2D": "augment",
    "build_augmentation_2d": "augment",
    "AUGMENTATIONS": "augment_presets",
    "ComposeRandomState": "augment_rng",
    "build_augmentation_3d": "augment_3d",
    "MixedBatch": "augment_mix",
    "cutmix_batch": "augment_mix",
    "mix_batch": "augment_mix",
    "mixed_loss": "augment_mix",
    "mixup_batch": "augment_mix",
}

__all__ = [
    "AUGMENTATIONS",
    "Augment2D",
    "ComposeRandomState",
    "MixedBatch",
    "build_augmentation_2d",
    "build_augmentation_3d",
    "compute_weight_map",
    "compute_weight_map_reference",
    "crop_padding",
    "cutmix_batch",
    "mix_batch",
    "mixed_loss",
    "mixup_batch",
    "objects_from_mask",
    "objects_from_membranes",
    "pad_to_multiple",
    "pad_to_size",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"medseg.transforms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medseg.transforms' has no attribute {name!r}")
