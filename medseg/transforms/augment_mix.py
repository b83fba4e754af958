"""Batch mixing for training: mixup and cutmix on tensor batches, and the loss that goes with them.

`SegModule.training_step` applies :func:`mix_batch` with ``augment.mixup`` / ``augment.cutmix`` (probabilities
per batch) and their ``*_alpha`` (the Beta distribution of the mixing share), then :func:`mixed_loss`. Both are
off by default: blended labels are risky for medical masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MixedBatch", "cutmix_batch", "mix_batch", "mixed_loss", "mixup_batch"]


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


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator; a numpy Generator seeded from ours keeps the draw reproducible.
    if alpha <= 0:
        raise ValueError(f"mixup/cutmix alpha must be > 0, got {alpha}")
    seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _partners(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(image.shape[0], generator=generator, device="cpu").to(image.device)


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
    lam = _beta(alpha, generator)
    perm = _partners(image, generator)
    mixed = lam * image + (1.0 - lam) * image[perm]
    return MixedBatch(mixed, target, weight, target[perm], None if weight is None else weight[perm], lam)


def cutmix_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """CutMix (Yun et al. 2019): paste a box covering ``1 - lam`` of the area from a partner sample,
    ``lam ~ Beta(alpha, alpha)``.

    Image, target and weight get the same box, so labels stay hard and aligned.
    """
    lam = _beta(alpha, generator)
    perm = _partners(image, generator)
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


def mix_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    *,
    mixup_alpha: float = 0.4,
    cutmix_alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """With probability ``mixup`` apply mixup (``mixup_alpha``), else with probability ``cutmix`` cutmix
    (``cutmix_alpha``), else nothing.

    Both probabilities default to 0 (``AugmentConfig.mixup`` / ``.cutmix``), which returns the batch unchanged
    and draws nothing from ``generator``.
    """
    if mixup < 0 or cutmix < 0 or mixup + cutmix > 1:
        raise ValueError(f"augment.mixup and augment.cutmix are probabilities summing to at most 1, got {mixup}, {cutmix}")
    if mixup > 0 or cutmix > 0:
        u = float(torch.rand(1, generator=generator))
        if u < mixup:
            return mixup_batch(image, target, weight, alpha=mixup_alpha, generator=generator)
        if u < mixup + cutmix:
            return cutmix_batch(image, target, weight, alpha=cutmix_alpha, generator=generator)
    return MixedBatch(image, target, weight)


def mixed_loss(
    loss: Callable[..., torch.Tensor], logits: torch.Tensor | list[torch.Tensor], batch: MixedBatch
) -> torch.Tensor:
    """``lam·loss(logits, target, weight) + (1 - lam)·loss(logits, target_b, weight_b)``. ``logits`` may be a
    list of deep-supervision heads: ``loss`` (a `DeepSupervisionLoss`) then mixes per head."""
    value = loss(logits, batch.target, batch.weight)
    if batch.target_b is None or batch.lam >= 1.0:
        return value
    return batch.lam * value + (1.0 - batch.lam) * loss(logits, batch.target_b, batch.weight_b)
