"""Transforms: pure numpy functions (weight maps, padding) first, MONAI/albumentations wrappers second.

Submodules are imported on use: ``weightmap`` and ``padding`` need only numpy/scipy (and torch for
tensors), while ``augment`` and ``dictionary`` pull in albumentations/MONAI.
"""

from __future__ import annotations

from medseg.transforms.padding import crop_padding, pad_to_multiple, pad_to_size
from medseg.transforms.weightmap import (
    compute_weight_map,
    compute_weight_map_reference,
    objects_from_mask,
    objects_from_membranes,
)

__all__ = [
    "compute_weight_map",
    "compute_weight_map_reference",
    "crop_padding",
    "objects_from_mask",
    "objects_from_membranes",
    "pad_to_multiple",
    "pad_to_size",
]
