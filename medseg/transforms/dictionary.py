"""MONAI transform wrappers over the pure functions in this package (array transform + MapTransform pairs).

Data in MONAI pipelines is channel-first: masks and instance maps are ``(1, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from medseg.transforms.weightmap import compute_weight_map, objects_from_mask, objects_from_membranes

__all__ = ["UNetWeightMap", "UNetWeightMapd", "UNetWeightMapD", "UNetWeightMapDict"]

ObjectsMode = Literal["instances", "components", "membrane"]


def _spatial(array: NdarrayOrTensor, name: str) -> np.ndarray:
    """``(1, *spatial)`` -> ``(*spatial)`` numpy."""
    if array.ndim < 2 or array.shape[0] != 1:
        raise ValueError(
            f"{name} must be channel-first with one channel, (1, *spatial); got {tuple(array.shape)}"
        )
    return convert_to_numpy(array)[0]


class UNetWeightMap(Transform):
    """U-Net boundary weight map of a mask: ``(1, *spatial)`` -> ``(1, *spatial)`` float32.

    Args:
        w0, sigma, class_weights, max_class_weight: see :func:`medseg.transforms.weightmap.compute_weight_map`.
        objects: how objects are found when no instance map is passed to ``__call__``:
            ``components`` (connected components of each class of the mask), ``membrane`` (regions separated
            by 0-valued membranes, ISBI 2012), ``instances`` (an instance map must be passed).
        spacing: pixel size per spatial axis, array order; ``sigma`` is then in the same unit.
        sigma_in_mm: with ``spacing=None``, read the spacing from the mask's MetaTensor ``pixdim``.

    The mask's values are the class indices used for ``w_c`` (map raw values such as 255 to classes first).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        class_weights: Sequence[float] | None = None,
        objects: ObjectsMode = "components",
        spacing: Sequence[float] | None = None,
        sigma_in_mm: bool = False,
        max_class_weight: float | None = None,
    ) -> None:
        if objects not in ("instances", "components", "membrane"):
            raise ValueError(f"objects must be instances, components or membrane, got {objects!r}")
        self.w0 = w0
        self.sigma = sigma
        self.class_weights = class_weights
        self.objects = objects
        self.spacing = spacing
        self.sigma_in_mm = sigma_in_mm
        self.max_class_weight = max_class_weight

    def _spacing(self, mask: NdarrayOrTensor, ndim: int) -> Sequence[float] | None:
        if self.spacing is not None or not self.sigma_in_mm:
            return self.spacing
        if not isinstance(mask, MetaTensor):
            raise ValueError("sigma_in_mm needs a spacing or a MetaTensor mask that carries one (pixdim)")
        return [float(s) for s in mask.pixdim[:ndim]]

    def __call__(self, mask: NdarrayOrTensor, instances: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        labels = _spatial(mask, "mask")
        if not np.issubdtype(labels.dtype, np.integer):
            # Masks often arrive as float tensors after loading; class indices are integral.
            labels = np.rint(labels).astype(np.int64)
        if instances is not None:
            objects = _spatial(instances, "instances").astype(np.int64)
            if objects.shape != labels.shape:
                raise ValueError(f"instances shape {objects.shape} differs from mask shape {labels.shape}")
        elif self.objects == "components":
            objects = objects_from_mask(labels)
        elif self.objects == "membrane":
            objects = objects_from_membranes(labels)
        else:
            raise ValueError("objects='instances' needs an instance map")
        weight = compute_weight_map(
            objects,
            w0=self.w0,
            sigma=self.sigma,
            class_weights=self.class_weights,
            spacing=self._spacing(mask, labels.ndim),
            labels=labels,
            max_class_weight=self.max_class_weight,
        )
        out, *_ = convert_to_dst_type(weight[None], mask, dtype=np.float32)
        return out


class UNetWeightMapd(MapTransform):
    """Dictionary version of :class:`UNetWeightMap`: reads the mask at ``keys``, writes ``weight_key``.

    Args:
        keys: the mask key (one; several masks need one ``weight_key`` each).
        objects_key: key of an instance map ``(1, *spatial)``; when given, objects default to ``instances``.
        weight_key: output key(s), ``"weight"`` by default.
        Other arguments: see :class:`UNetWeightMap`.
    """

    backend = UNetWeightMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        objects_key: str | None = None,
        weight_key: str | Sequence[str] = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        class_weights: Sequence[float] | None = None,
        objects: ObjectsMode | None = None,
        spacing: Sequence[float] | None = None,
        sigma_in_mm: bool = False,
        max_class_weight: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.weight_keys = (weight_key,) if isinstance(weight_key, str) else tuple(weight_key)
        if len(self.weight_keys) != len(self.keys):
            raise ValueError(f"{len(self.keys)} mask keys need as many weight keys, got {self.weight_keys}")
        if objects is None:
            objects = "instances" if objects_key is not None else "components"
        if objects == "instances" and objects_key is None:
            raise ValueError("objects='instances' needs objects_key")
        self.objects_key = objects_key
        self.transform = UNetWeightMap(
            w0=w0,
            sigma=sigma,
            class_weights=class_weights,
            objects=objects,
            spacing=spacing,
            sigma_in_mm=sigma_in_mm,
            max_class_weight=max_class_weight,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        instances = None
        if self.objects_key is not None and self.transform.objects == "instances":
            instances = d[self.objects_key]
        for key, weight_key in self.key_iterator(d, self.weight_keys):
            d[weight_key] = self.transform(d[key], instances)
        return d


UNetWeightMapD = UNetWeightMapDict = UNetWeightMapd
