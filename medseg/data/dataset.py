"""Datasets: a MONAI cache of preprocessed cases (read once), random training patches drawn from it, and
whole cases for validation.

Reading, normalising, label mapping and weight maps are deterministic and expensive, so they run once per
case inside ``monai.data.CacheDataset``; only cropping and augmentation run per step. 3D volumes are served
as 2.5D slices: slice z with ``k`` neighbours on each side stacked as channels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, MapTransform

from medseg.config import ExperimentConfig
from medseg.data.datalist import Case
from medseg.data.preprocess import map_labels, prepare_image, touching_borders
from medseg.errors import DatasetError, MedsegError
from medseg.io import read_scan


class LoadCased(MapTransform):
    """``{"image": path, "mask": path, "instances": path}`` -> arrays: image ``(C, *spatial)`` float32,
    label ``(*spatial)`` int64, instances ``(*spatial)`` int32, plus ``spacing`` in array order."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(keys=["image"])
        self.cfg = cfg

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scan = read_scan(d["image"])
        image = prepare_image(scan, self.cfg.data)
        d["image"] = image
        d["spacing"] = np.asarray(scan.geometry.spacing_zyx, dtype=np.float32)
        if d.get("mask"):
            mask = read_scan(d["mask"])
            d["label"] = map_labels(mask, self.cfg.data.label_map, scan.spatial_shape, _name(d["mask"]))
        if d.get("instances"):
            inst = read_scan(d["instances"])
            arr = inst.array if inst.array.ndim == inst.spatial_ndim else inst.array[..., 0]
            if arr.shape != scan.spatial_shape:
                raise DatasetError(f"{_name(d['instances'])}: instance map shape {arr.shape} != image shape {scan.spatial_shape}")
            d["instances"] = arr.astype(np.int32)
            if self.cfg.data.separate_touching and "label" in d:
                d["label"] = np.where(touching_borders(d["instances"]), 0, d["label"])
        for k in ("mask",):
            d.pop(k, None)
        return d


def _name(p: Any) -> str:
    return str(p).rsplit("/", 1)[-1]


def case_dicts(cases: list[Case]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "image": str(c.image), "mask": str(c.mask) if c.mask else None,
         "instances": str(c.instances) if c.instances else None}
        for c in cases
    ]


class CaseWeightMapd(MapTransform):
    """U-Net boundary weight map for a cached case: ``label (*spatial)`` (+ ``instances``) -> ``weight``.

    Computed once per case (it lives in the cache), with sigma in mm from the case's spacing when asked.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(keys=["label"])
        self.loss = cfg.loss

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medseg.transforms.dictionary import UNetWeightMap

        d = dict(data)
        objects = self.loss.objects
        instances = d.get("instances")
        if objects == "instances" and instances is None:
            raise DatasetError(f"{d['id']}: loss.objects is 'instances' but the case has no instance map (set data.instances_dir)")
        transform = UNetWeightMap(
            w0=self.loss.w0, sigma=self.loss.sigma, class_weights=self.loss.class_weights, objects=objects,
            spacing=[float(s) for s in d["spacing"]] if self.loss.sigma_in_mm else None,
            max_class_weight=self.loss.max_class_weight,
        )
        inst = instances[None] if objects == "instances" else None
        d["weight"] = np.asarray(transform(d["label"][None], inst))[0].astype(np.float32)
        return d


def build_case_cache(cases: list[Case], cfg: ExperimentConfig, progress: bool = False) -> CacheDataset:
    """Every case read and preprocessed once (plus its weight map when the loss uses one)."""
    steps: list[Callable] = [LoadCased(cfg)]
    if cfg.loss.weight_map:
        steps.append(CaseWeightMapd(cfg))
    try:
        return CacheDataset(case_dicts(cases), transform=Compose(steps), cache_rate=1.0, num_workers=0, progress=progress)
    except RuntimeError as e:
        # MONAI wraps transform errors in RuntimeError; surface ours (they name the file) unchanged.
        cause = e
        while cause is not None and not isinstance(cause, MedsegError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def context_stack(volume: np.ndarray, z: int, k: int) -> np.ndarray:
    """``(C, Z, Y, X)`` -> ``((2k+1)*C, Y, X)``: slices z-k..z+k (edges repeat), slice-major channel order."""
    idx = np.clip(np.arange(z - k, z + k + 1), 0, volume.shape[1] - 1)
    sl = volume[:, idx]  # (C, 2k+1, Y, X)
    return np.ascontiguousarray(sl.transpose(1, 0, 2, 3).reshape(-1, *volume.shape[2:]))


class PatchDataset(torch.utils.data.Dataset):
    """Random augmented training patches: 2D cases directly, 3D cases as 2.5D slices.

    Returns ``{"image": (C, H, W) float32, "label": (H, W) int64[, "weight": (H, W) float32]}``.
    """

    def __init__(self, cache: CacheDataset, cfg: ExperimentConfig, augment: Callable, samples_per_epoch: int | None = None):
        self.cache = cache
        self.k = cfg.data.context_slices
        self.augment = augment
        # (case index, slice index or -1 for 2D)
        self.items: list[tuple[int, int]] = []
        for i in range(len(cache)):
            d = cache[i]
            if d["label"].ndim == 3:
                self.items += [(i, z) for z in range(d["label"].shape[0])]
            else:
                self.items.append((i, -1))
        if not self.items:
            raise DatasetError("empty dataset: no training cases")
        self.length = samples_per_epoch or len(self.items)
        self._worker_seed: int | None = None

    def _reseed_in_worker(self) -> None:
        # Each loader worker holds a copy of the seeded augmentation: without a reseed from the worker's own
        # seed (torch derives it from the main process RNG per epoch) every worker draws the same crops.
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed and hasattr(self.augment, "reseed"):
            self.augment.reseed(info.seed)
            self._worker_seed = info.seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self._reseed_in_worker()
        i, z = self.items[index % len(self.items)]
        d = self.cache[i]
        weight = d.get("weight")
        if z < 0:
            image, label = d["image"], d["label"]
        else:
            image = context_stack(d["image"], z, self.k)
            label = d["label"][z]
            weight = weight[z] if weight is not None else None
        out = self.augment(
            np.ascontiguousarray(np.moveaxis(image, 0, -1)), np.ascontiguousarray(label),
            None if weight is None else np.ascontiguousarray(weight),
        )
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(out["image"], -1, 0))).float(),
            "label": torch.from_numpy(np.ascontiguousarray(out["mask"])).long(),
        }
        if out.get("weight") is not None:
            sample["weight"] = torch.from_numpy(np.ascontiguousarray(out["weight"])).float()
        return sample


class WholeCaseDataset(torch.utils.data.Dataset):
    """Whole preprocessed cases for validation/evaluation (batch size 1; sizes differ)."""

    def __init__(self, cache: CacheDataset):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        d = self.cache[index]
        return {"id": d["id"], "image": torch.from_numpy(d["image"]), "label": torch.from_numpy(d["label"]),
                "spacing": torch.from_numpy(d["spacing"])}


def collate_single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of one whole case, kept unstacked (sizes differ between cases)."""
    assert len(batch) == 1
    return batch[0]
