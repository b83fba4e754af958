"""Datasets: a MONAI cache of cases on the model grid (read and resampled once, kept in their own dtype), random
training patches drawn from it (a planned share centred on foreground), and whole cases for validation.

Reading, label mapping, resampling and weight maps are deterministic and expensive, so they run once per case
inside MONAI's ``CacheDataset`` (``data.cache: memory``), ``PersistentDataset`` (``disk``: one file per case under
the run's ``cache/`` folder, keyed by the case and every setting that shapes it) or plain ``Dataset`` (``none``:
read on every access). The cache holds each image in its source dtype (uint8 photos stay uint8) with its intensity
bounds, and labels as uint8, so memory is what the files hold at the planned scale.

Per patch only a window around the sampled centre is converted to float and augmented — never the whole image.
3D volumes are served as 2.5D slices: slice z with ``k`` neighbours on each side stacked as channels.

A case that cannot be read is reported (one line naming the file) and left out; the others are still used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, MapTransform

from medseg.config import ExperimentConfig
from medseg.data.datalist import Case
from medseg.data.preprocess import map_labels, model_input, prepare_scan, touching_borders
from medseg.errors import DatasetError, MedsegError
from medseg.io import read_mask, read_scan
from medseg.transforms.padding import pad
from medseg.transforms.resample import model_grid_spacing

log = logging.getLogger("medseg")

FOREGROUND_POINTS_PER_CLASS = 2_000  # foreground voxel coordinates kept per class for centred sampling
REGION_FACTOR = 1.5  # window cut around a patch centre, relative to the patch: room for zoom-out and rotation
# Unreadable cases are left out while they are few (a damaged file, one mislabelled mask); more than this share
# (and more than one) is a systematic problem — a wrong label map, a wrong folder — and stops the run.
MAX_LEFT_OUT_SHARE = 0.10


class LoadCased(MapTransform):
    """``{"id", "image": path, "mask": path, "instances": path}`` -> a case on the model grid:
    ``image (C_src, *grid)`` in its own dtype, ``bounds`` (intensity, float64 (2,) or None), ``label (*grid)``
    uint8, ``instances`` int32, ``spacing`` (model grid, array order), ``fg_points (n, ndim)`` int32 and
    ``fg_classes (n,)`` uint8 (a sample of foreground voxels per class, for centred patches)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(keys=["image"])
        self.cfg = cfg

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = {"id": data["id"]}
        scan = read_scan(data["image"])
        label = instances = None
        if data.get("mask"):
            label = map_labels(read_mask(data["mask"]), self.cfg.data.label_map, scan.spatial_shape, _name(data["mask"]))
        if data.get("instances"):
            inst = read_mask(data["instances"])
            if inst.array.shape != scan.spatial_shape:
                raise DatasetError(f"{_name(data['instances'])}: instance map shape {inst.array.shape} != image shape "
                                   f"{scan.spatial_shape}")
            instances = inst.array.astype(np.int32)
            if self.cfg.data.separate_touching and label is not None:
                label = np.where(touching_borders(instances), 0, label).astype(label.dtype)
        prepared = prepare_scan(scan, self.cfg.data, label, instances)
        d["image"] = prepared.image
        d["bounds"] = None if prepared.bounds is None else np.asarray(prepared.bounds, dtype=np.float64)
        d["spacing"] = np.asarray(model_grid_spacing(prepared.geometry), dtype=np.float32)
        if prepared.label is not None:
            d["label"] = prepared.label
            d["fg_points"], d["fg_classes"] = foreground_points(prepared.label, seed=_stable_seed(str(data["id"])))
        if prepared.instances is not None:
            d["instances"] = prepared.instances
        return d


def _name(p: Any) -> str:
    return str(p).rsplit("/", 1)[-1]


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def foreground_points(label: np.ndarray, seed: int = 0, per_class: int = FOREGROUND_POINTS_PER_CLASS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` coordinates ``(n, ndim)`` of each foreground class (uniformly sampled), and their
    classes ``(n,)``."""
    rng = np.random.default_rng(seed)
    points, classes = [], []
    for k in np.unique(label):
        if k == 0:
            continue
        coords = np.argwhere(label == k)
        if len(coords) > per_class:
            coords = coords[rng.choice(len(coords), per_class, replace=False)]
        points.append(coords.astype(np.int32))
        classes.append(np.full(len(coords), k, dtype=np.uint8))
    if not points:
        return np.zeros((0, label.ndim), dtype=np.int32), np.zeros(0, dtype=np.uint8)
    return np.concatenate(points), np.concatenate(classes)


class CaseWeightMapd(MapTransform):
    """U-Net boundary weight map for a cached case: ``label (*spatial)`` (+ ``instances``) -> ``weight`` (float32,
    on the model grid, with sigma in mm from the model-grid spacing when asked). Computed once per case."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(keys=["label"])
        self.loss = cfg.loss

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medseg.transforms.dictionary import UNetWeightMap

        d = dict(data)
        if "label" not in d:
            return d
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


class _ReportErrors(MapTransform):
    """Runs the loading steps; a case that fails with a MedsegError becomes ``{"id", "error"}`` so one bad case
    does not stop the others (MONAI would wrap and re-raise it)."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        super().__init__(keys=["image"])
        self.steps = Compose(list(steps))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        try:
            return self.steps(dict(data))
        except RuntimeError as e:  # MONAI's Compose wraps errors raised by a transform
            cause = _medseg_cause(e)
            if cause is None:
                raise
            return {"id": data["id"], "error": str(cause)}
        except MedsegError as e:
            return {"id": data["id"], "error": str(e)}


def _medseg_cause(e: BaseException) -> MedsegError | None:
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, MedsegError):
        cause = cause.__cause__
    return cause


def case_dicts(cases: list[Case], grid_key: str = "") -> list[dict[str, Any]]:
    return [
        {"id": c.id, "image": str(c.image), "mask": str(c.mask) if c.mask else None,
         "instances": str(c.instances) if c.instances else None, "grid": grid_key}
        for c in cases
    ]


def grid_key(cfg: ExperimentConfig) -> str:
    """Hash of every setting that changes what the cache holds for a case (disk caches are keyed by it)."""
    d, loss = cfg.data, cfg.loss
    shaping = {"data": d.model_dump(mode="json", include={"label_map", "resample", "target_spacing", "target_size",
                                                            "slice_axis", "intensity", "intensity_range", "ct_window",
                                                            "channels", "separate_touching"}),
               "weight": loss.model_dump(mode="json", include={"weight_map", "w0", "sigma", "sigma_in_mm", "class_weights",
                                                                "max_class_weight", "objects"}) if loss.weight_map else None,
               "version": 2}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


class CaseCache(torch.utils.data.Dataset):
    """The readable cases of a MONAI dataset (memory / disk / none), as numpy dicts; unreadable ones are listed
    in ``problems`` (one line each) and skipped."""

    def __init__(self, base: Dataset, problems: list[str], good: list[int], ids: list[str]) -> None:
        self.base = base
        self.problems = problems
        self.good = good
        self.ids = ids

    def __len__(self) -> int:
        return len(self.good)

    def __getitem__(self, index: int) -> dict[str, Any]:
        d = self.base[self.good[index]]
        if "error" in d:  # data.cache: none, and the file changed since the first pass
            raise DatasetError(d["error"])
        return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def build_case_cache(cases: list[Case], cfg: ExperimentConfig, progress: bool = False,
                     cache_dir: Path | None = None, check_left_out: bool = True) -> CaseCache:
    """Every case read and brought to the model grid once (plus its weight map when the loss uses one), held as
    ``data.cache`` says. Unreadable cases are reported and left out (`check_left_out`: unless there are too many);
    none readable -> DatasetError."""
    steps: list[Callable] = [LoadCased(cfg)]
    if cfg.loss.weight_map:
        steps.append(CaseWeightMapd(cfg))
    transform = _ReportErrors(steps)
    key = grid_key(cfg)
    items = case_dicts(cases, key)
    mode = cfg.data.cache
    if mode == "memory":
        base: Dataset = CacheDataset(items, transform=transform, cache_rate=1.0,
                                     num_workers=max(1, cfg.data.num_workers) if cfg.data.num_workers else 0,
                                     progress=progress, copy_cache=False)
    elif mode == "disk":
        folder = Path(cache_dir or "cache") / key
        folder.mkdir(parents=True, exist_ok=True)
        base = PersistentDataset(items, transform=transform, cache_dir=folder)
    else:
        base = Dataset(items, transform=transform)
    problems, good = [], []
    for i in range(len(items)):
        d = base[i]
        if "error" in d:
            problems.append(str(d["error"]))
        else:
            good.append(i)
    if check_left_out:
        check_left_out_share(problems, len(items))
    if not good:
        raise DatasetError(f"no readable case among {len(items)}: {problems[0] if problems else 'empty dataset'}")
    return CaseCache(base, problems, good, [cases[i].id for i in good])


def check_left_out_share(problems: list[str], total: int) -> None:
    """Too many unreadable cases is a systematic problem (DatasetError); a few are reported and left out."""
    if len(problems) > max(1, int(MAX_LEFT_OUT_SHARE * total)):
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise DatasetError(f"{len(problems)} of {total} cases cannot be used: {'; '.join(problems[:2])}{more}")
    for p in problems:
        log.warning("left out: %s", p)


def cache_nbytes(cache: CaseCache) -> int:
    """Bytes of the arrays a cache holds (what ``data.cache: memory`` keeps in RAM)."""
    total = 0
    for i in range(len(cache)):
        total += sum(v.nbytes for v in cache[i].values() if isinstance(v, np.ndarray))
    return total


def context_indices(z: int, k: int, depth: int) -> np.ndarray:
    """Slice indices z-k..z+k with edge repetition (2.5D context)."""
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


def case_input(d: dict[str, Any], data: Any, z: int = -1, k: int = 0,
               window: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
    """Network input ``(C, h, w)`` float32 of a cached case (``z < 0``) or of slice ``z`` with ``k`` neighbours on
    each side stacked slice-major (2.5D), cut to ``window`` (y, x) first: only the window is converted."""
    bounds = None if d.get("bounds") is None else tuple(float(v) for v in d["bounds"])
    name = str(d.get("id", ""))
    if z < 0:
        return model_input(d["image"][(slice(None), *window)], data, bounds, name)
    idx = context_indices(z, k, d["image"].shape[1])
    m = model_input(d["image"][(slice(None), idx, *window)], data, bounds, name)  # (channels, 2k+1, h, w)
    return m.transpose(1, 0, 2, 3).reshape(-1, *m.shape[2:])


def _window(center: int, size: int, extent: int, centred: bool) -> tuple[slice, tuple[int, int]]:
    """A window of ``size`` around ``center`` on an axis of ``extent``: (the part inside the image, padding before
    and after). The whole axis when it is no longer than the window. ``centred`` (a foreground centre): the window
    is centred on it, padded where it leaves the image, so the augmentation's crop always holds the centre;
    otherwise it is shifted inside the image (uniform crops never show padding an image does not need)."""
    if extent <= size:
        return slice(0, extent), (0, 0)
    start = center - size // 2
    if not centred:
        start = min(max(0, start), extent - size)
    stop = start + size
    return slice(max(0, start), min(extent, stop)), (max(0, -start), max(0, stop - extent))


def epoch_item(index: int, n_items: int, epoch_length: int, rng: np.random.Generator) -> int:
    """Which item sample ``index`` of an epoch trains on. A loader hands out indices below ``epoch_length``: when
    that covers the items, cycle through them (each at least once per epoch); when the epoch is shorter than the
    dataset (``train.samples_per_epoch`` under the number of cases or slices), draw one at random, else the items
    past the epoch length would never be trained on."""
    return index % n_items if epoch_length >= n_items else int(rng.integers(n_items))


class PatchDataset(torch.utils.data.Dataset):
    """Random augmented training patches: 2D cases directly, 3D cases as 2.5D slices.

    Each sample picks an item (case, slice); with probability ``data.foreground_share`` its centre is a random
    foreground voxel of the case (a random class first, so rare classes are seen), otherwise a uniform position.
    A window of ``REGION_FACTOR`` x patch around it is cut (for a foreground centre: centred, mirror-padded where it
    leaves the image — zero-padded with ``augment.padding_mode: constant`` — so the augmentation's crop holds the
    centre), converted to network input (`model_input`) and augmented to the patch size.

    Returns ``{"image": (C, H, W) float32, "label": (H, W) uint8[, "weight": (H, W) float32][, "soft": (K, H, W)
    float32]}`` (``soft``: when the cache's cases carry a teacher's probabilities, ``medseg.engine.distill``).

    The sampler keeps its own generator; ``state_dict``/``load_state_dict``/``reseed`` cover it together with the
    augmentation's (exact resume, distinct streams per loader worker).

    ``pseudo`` (semi-supervised training, `medseg.engine.pseudo_labels.PseudoLabelledCases`): once it holds
    pseudo-labels, each sample comes from a pseudo-labelled image with probability ``pseudo.share``, through
    ``pseudo.augment`` (the strong augmentation); their unconfident pixels carry ``IGNORE_INDEX``.
    """

    def __init__(self, cache: CaseCache, cfg: ExperimentConfig, augment: Callable, samples_per_epoch: int | None = None,
                 pseudo: Any = None):
        self.cache = cache
        self.pseudo = pseudo
        self.data = cfg.data
        self.k = cfg.data.context_slices
        self.augment = augment
        self.padding_mode = cfg.augment.padding_mode
        self.share = cfg.data.foreground_share
        ph, pw = cfg.data.patch_size
        self.region = (math.ceil(ph * REGION_FACTOR), math.ceil(pw * REGION_FACTOR))
        self.items: list[tuple[int, int]] = []  # (case index, slice index or -1 for 2D)
        for i in range(len(cache)):
            d = cache[i]
            if "label" not in d:
                raise DatasetError(f"{d['id']}: training case without a mask")
            if d["label"].ndim == 3:
                self.items += [(i, z) for z in range(d["label"].shape[0])]
            else:
                self.items.append((i, -1))
        if not self.items:
            raise DatasetError("empty dataset: no training cases")
        self.length = samples_per_epoch or len(self.items)
        self.rng = np.random.default_rng(cfg.train.seed + 104_729)
        self._worker_seed: int | None = None

    # --------------------------------------------------------------------------------------- RNG state
    def state_dict(self) -> dict[str, Any]:
        state = {"sampler": self.rng.bit_generator.state}
        if hasattr(self.augment, "state_dict"):
            state["augment"] = self.augment.state_dict()
        if self.pseudo is not None and hasattr(self.pseudo.augment, "state_dict"):
            state["pseudo_augment"] = self.pseudo.augment.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["sampler"]
        if "augment" in state and hasattr(self.augment, "load_state_dict"):
            self.augment.load_state_dict(state["augment"])
        if "pseudo_augment" in state and self.pseudo is not None and hasattr(self.pseudo.augment, "load_state_dict"):
            self.pseudo.augment.load_state_dict(state["pseudo_augment"])

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed + 104_729)
        if hasattr(self.augment, "reseed"):
            self.augment.reseed(seed)
        if self.pseudo is not None and hasattr(self.pseudo.augment, "reseed"):
            self.pseudo.augment.reseed(seed + 7_919)

    def _reseed_in_worker(self) -> None:
        # Each loader worker holds a copy of the seeded sampler and augmentation: without a reseed from the
        # worker's own seed (torch derives it from the main process RNG per epoch) every worker draws the same.
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self.reseed(info.seed % 2**32)
            self._worker_seed = info.seed

    # ------------------------------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        return self.length

    def _centre(self, d: dict[str, Any], z: int) -> tuple[int, tuple[int, int], bool]:
        """(slice, (y, x)) of the patch centre, and whether it is a foreground voxel."""
        shape = d["label"].shape
        points = d.get("fg_points")
        if self.share > 0 and points is not None and len(points) and self.rng.random() < self.share:
            classes = d["fg_classes"]
            k = self.rng.choice(np.unique(classes))
            candidates = np.flatnonzero(classes == k)
            p = points[candidates[self.rng.integers(len(candidates))]]
            return (int(p[0]) if len(shape) == 3 else -1), (int(p[-2]), int(p[-1])), True
        h, w = shape[-2:]
        return z, (int(self.rng.integers(h)), int(self.rng.integers(w))), False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self._reseed_in_worker()
        augment = self.augment
        if self.pseudo is not None and self.pseudo.ready and self.rng.random() < self.pseudo.share:
            d, z = self.pseudo.draw(self.rng)
            augment = self.pseudo.augment
        else:
            i, z = self.items[epoch_item(index, len(self.items), self.length, self.rng)]
            d = self.cache[i]
        z, (cy, cx), centred = self._centre(d, z)
        label_full = d["label"]
        h, w = label_full.shape[-2:]
        ys, ypad = _window(cy, self.region[0], h, centred)
        xs, xpad = _window(cx, self.region[1], w, centred)
        weight = d.get("weight")
        window = (ys, xs)
        image = pad(case_input(d, self.data, z, self.k, window), ((0, 0), ypad, xpad), self.padding_mode)
        label = pad(label_full[window] if z < 0 else label_full[(z, *window)], (ypad, xpad), self.padding_mode)
        if weight is not None:  # constant padding: padded pixels weigh nothing
            weight = pad(weight[window] if z < 0 else weight[(z, *window)], (ypad, xpad), self.padding_mode)
        soft = d.get("soft")  # a teacher's probabilities (K, *grid) (`medseg distill`), cut and padded like the image
        if soft is not None:
            soft = pad(np.asarray(soft[(slice(None), *window)] if z < 0 else soft[(slice(None), z, *window)],
                                  dtype=np.float32), ((0, 0), ypad, xpad), self.padding_mode)
            soft = np.ascontiguousarray(np.moveaxis(soft, 0, -1))
        extra = {} if soft is None else {"soft": soft}  # augmentations written before soft targets take 3 arguments
        out = augment(
            np.ascontiguousarray(np.moveaxis(image, 0, -1)), np.ascontiguousarray(label),
            None if weight is None else np.ascontiguousarray(weight), **extra,
        )
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(out["image"], -1, 0))),
            "label": torch.from_numpy(np.ascontiguousarray(out["mask"])),
        }
        if out.get("weight") is not None:
            sample["weight"] = torch.from_numpy(np.ascontiguousarray(out["weight"]))
        if out.get("soft") is not None:
            sample["soft"] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(out["soft"], -1, 0)))
        return sample


class WholeCaseDataset(torch.utils.data.Dataset):
    """Whole cases on the model grid for validation (batch size 1; sizes differ): network input, label and
    weight map (when the loss uses one).

    ``max_cases``: validate on the first that many of a seeded permutation (``all_indices``) — the same subset every
    round, so rounds compare; a budget re-plan may change ``indices`` between rounds."""

    def __init__(self, cache: CaseCache, cfg: ExperimentConfig, max_cases: int | None = None, seed: int = 0):
        self.cache = cache
        self.data = cfg.data
        self.all_indices = [int(i) for i in np.random.default_rng(seed).permutation(len(cache))]
        self.indices = list(self.all_indices[:max_cases] if max_cases else self.all_indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        d = self.cache[self.indices[index]]
        bounds = None if d.get("bounds") is None else tuple(float(v) for v in d["bounds"])
        out = {"id": d["id"], "image": torch.from_numpy(model_input(d["image"], self.data, bounds, d["id"])),
               "label": torch.from_numpy(d["label"]), "spacing": torch.from_numpy(np.asarray(d["spacing"]))}
        if d.get("weight") is not None:
            out["weight"] = torch.from_numpy(d["weight"])
        return out


def collate_single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of one whole case, kept unstacked (sizes differ between cases)."""
    assert len(batch) == 1
    return batch[0]
