"""The training loader for ``model.cache_encoder_features``: random stride-aligned patches of whole cases, whose
encoder features come from `medseg.models.EncoderFeatureCache` (computed once per case or slice) instead of
an encoder pass per step.

`attach_feature_cache(module, train_loader, cfg)` checks the config, gives the module its cache and returns
the loader that replaces the training loader. Its batches carry ``case`` (item index), ``offset`` (y, x) and
``label`` (+ ``weight``) but no image: `SegModule.training_step` asks the cache for the patch's features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medseg.config import ExperimentConfig
from medseg.data.dataset import case_input, epoch_item
from medseg.errors import ConfigError
from medseg.models import EncoderFeatureCache
from medseg.transforms.padding import pad

__all__ = ["AlignedCrops", "CropSampler", "attach_feature_cache", "check_feature_cache_config"]


def check_feature_cache_config(cfg: ExperimentConfig, stride: int) -> None:
    """Cached features are the network's features only for a frozen encoder seeing unchanged images."""
    m, a, d = cfg.model, cfg.augment, cfg.data
    why = []
    if m.transfer != "freeze_encoder":
        why.append(f"a frozen encoder (model.transfer: freeze_encoder, got {m.transfer})")
    if a.preset != "none":
        why.append(f"no random spatial or intensity augmentation (augment.preset: none, got {a.preset})")
    if a.mixup or a.cutmix:
        why.append(f"no mixup/cutmix (augment.mixup: 0, augment.cutmix: 0, got {a.mixup}, {a.cutmix})")
    if d.patch_size[0] % stride or d.patch_size[1] % stride:
        why.append(f"data.patch_size a multiple of the encoder stride {stride} (got {list(d.patch_size)})")
    if why:
        raise ConfigError("model.cache_encoder_features needs " + "; ".join(why))


class CropSampler:
    """The random offsets' generator, with the interface `ResumableRandomState` saves and restores (and data
    loader workers reseed), like the augmentation it replaces."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"numpy": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["numpy"]

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed % 2**32)


class AlignedCrops(torch.utils.data.Dataset):
    """Patches of ``cfg.data.patch_size`` at offsets that are multiples of ``stride``, drawn uniformly from each
    case (2D) or slice (3D, with its 2.5D context) padded at the bottom/right to a multiple of ``stride`` and at
    least the patch (``augment.padding_mode``; the weight map is 0 in constant padding).

    ``cases``: the cached training cases (``{"image": (C, *spatial), "label", ["weight"]}``). Item ``i`` ->
    ``{"case": i-th case or slice, "offset": (2,) long, "label": (H, W) long[, "weight": (H, W) float]}``.
    """

    def __init__(self, cases: Any, cfg: ExperimentConfig, stride: int, samples_per_epoch: int | None = None) -> None:
        self.cases = cases
        self.data = cfg.data
        self.k = cfg.data.context_slices
        self.patch = tuple(int(s) for s in cfg.data.patch_size)
        self.stride = stride
        self.mode = cfg.augment.padding_mode
        self.items: list[tuple[int, int]] = []  # (case index, slice index or -1 for 2D)
        for i in range(len(cases)):
            label = cases[i]["label"]
            self.items += [(i, z) for z in range(label.shape[0])] if label.ndim == 3 else [(i, -1)]
        self.length = samples_per_epoch or len(self.items)
        self.augment = CropSampler(cfg.train.seed)
        self._worker_seed: int | None = None

    # The random state ResumableRandomState saves and restores (the same interface as PatchDataset's).
    def state_dict(self) -> dict[str, Any]:
        return self.augment.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augment.load_state_dict(state)

    def reseed(self, seed: int) -> None:
        self.augment.reseed(seed)

    def __len__(self) -> int:
        return self.length

    def _arrays(self, item: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        i, z = self.items[item]
        d = self.cases[i]
        weight = d.get("weight")
        image = case_input(d, self.data, z, self.k)
        if z < 0:
            return image, d["label"], weight
        return image, d["label"][z], None if weight is None else weight[z]

    def _padding(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        s = self.stride
        return tuple((0, max(p, -(-n // s) * s) - n) for n, p in zip(shape[-2:], self.patch, strict=True))

    def image_of(self, item: int) -> torch.Tensor:
        """The whole padded network input ``(C, Hp, Wp)`` of an item (what `EncoderFeatureCache` encodes)."""
        image = self._arrays(item)[0]
        return torch.from_numpy(np.ascontiguousarray(pad(image, ((0, 0), *self._padding(image.shape)), self.mode)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:  # every worker holds a copy of the same seed
            self.augment.reseed(info.seed)
            self._worker_seed = info.seed
        item = epoch_item(index, len(self.items), self.length, self.augment.rng)
        _, label, weight = self._arrays(item)
        widths = self._padding(label.shape)
        (ph, pw), s = self.patch, self.stride
        hp, wp = label.shape[0] + widths[0][1], label.shape[1] + widths[1][1]
        rng = self.augment.rng
        y, x = s * int(rng.integers(0, (hp - ph) // s + 1)), s * int(rng.integers(0, (wp - pw) // s + 1))
        window = (slice(y, y + ph), slice(x, x + pw))
        sample = {
            "case": torch.tensor(item),
            "offset": torch.tensor([y, x]),
            "label": torch.from_numpy(np.ascontiguousarray(pad(label, widths, self.mode)[window])).long(),
        }
        if weight is not None:  # constant padding: padded pixels weigh nothing
            sample["weight"] = torch.from_numpy(np.ascontiguousarray(pad(weight, widths, self.mode)[window])).float()
        return sample


def attach_feature_cache(module: Any, train_loader: torch.utils.data.DataLoader, cfg: ExperimentConfig) -> torch.utils.data.DataLoader:
    """Give ``module`` (a `SegModule`) an `EncoderFeatureCache` and return the loader of `AlignedCrops` that
    replaces ``train_loader`` (same batch size, length, workers and last-batch rule). ``train_loader.dataset``
    must hold the cached training cases as ``.cache``."""
    check_feature_cache_config(cfg, module.model.output_stride)
    crops = AlignedCrops(train_loader.dataset.cache, cfg, module.model.output_stride, len(train_loader.dataset))
    module.feature_cache = EncoderFeatureCache(module.model, crops.image_of)
    workers = train_loader.num_workers
    return torch.utils.data.DataLoader(crops, batch_size=train_loader.batch_size, shuffle=True, num_workers=workers,
                                       drop_last=train_loader.drop_last, persistent_workers=workers > 0)
