"""Loss modules over :mod:`medseg.losses.functional`, the ``LOSSES`` registry and ``build_loss``.

Every loss has the same call: ``loss(logits, target, weight_map=None) -> scalar``, with ``logits``
``(B, K, *spatial)``, ``target`` ``(B, *spatial)`` class indices, ``weight_map`` ``(B, *spatial)`` or None.
Losses that are not pixel-wise (Dice) ignore ``weight_map``. Binary tasks in medseg are K = 2 softmax;
``bce`` is for one-channel (K = 1) outputs and says so with ``single_channel = True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from medseg.config import LossConfig, ModelConfig
from medseg.losses import functional as LF
from medseg.registry import Registry

__all__ = [
    "LOSSES",
    "CombinedLoss",
    "DeepSupervisionLoss",
    "FocalLoss",
    "SoftDiceLoss",
    "WeightedBCELoss",
    "WeightedCrossEntropyLoss",
    "build_loss",
]


class _SegLoss(nn.Module):
    single_channel = False  # True: expects K = 1 logits


class WeightedCrossEntropyLoss(_SegLoss):
    """Pixel-weighted softmax cross-entropy (:func:`~medseg.losses.functional.weighted_cross_entropy`)."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32),
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        return LF.weighted_cross_entropy(logits, target, weight_map, self.label_smoothing, self.class_weights)


class WeightedBCELoss(_SegLoss):
    """Pixel-weighted sigmoid BCE for one-channel outputs (:func:`~medseg.losses.functional.weighted_bce`)."""

    single_channel = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        return LF.weighted_bce(logits, target, weight_map, self.label_smoothing)


class SoftDiceLoss(_SegLoss):
    """Soft Dice (:func:`~medseg.losses.functional.soft_dice_loss`); ``weight_map`` is ignored."""

    def __init__(self, include_background: bool = False, smooth: float = 1e-5, batch: bool = True) -> None:
        super().__init__()
        self.include_background = include_background
        self.smooth = smooth
        self.batch = batch

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        return LF.soft_dice_loss(logits, target, self.include_background, self.smooth, self.batch)


class FocalLoss(_SegLoss):
    """Pixel-weighted focal loss (:func:`~medseg.losses.functional.focal_loss`)."""

    def __init__(self, gamma: float = 2.0, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32),
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        return LF.focal_loss(logits, target, weight_map, self.gamma, self.class_weights)


class CombinedLoss(_SegLoss):
    """``Σ weight_i · loss_i(logits, target, weight_map)``, e.g. Dice + CE."""

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        self.weights = [float(w) for w, _ in terms]
        self.losses = nn.ModuleList([m for _, m in terms])
        self.single_channel = any(getattr(m, "single_channel", False) for m in self.losses)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        return sum(w * m(logits, target, weight_map) for w, m in zip(self.weights, self.losses, strict=True))


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``base_loss`` over the heads of a deep-supervised model (e.g. UNet++).

    ``forward(logits_list, target, weight_map=None)``: each entry of ``logits_list`` is ``(B, K, *spatial)``
    at full resolution (UNet++ heads are). ``weights`` are used as given, one per head; None -> equal
    weights summing to 1, so the scale matches a single head. A plain tensor is passed to ``base_loss``.
    """

    def __init__(self, base_loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.base_loss = base_loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        weight_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.base_loss(logits, target, weight_map)
        heads = list(logits)
        weights = self.weights if self.weights is not None else [1.0 / len(heads)] * len(heads)
        if len(weights) != len(heads):
            raise ValueError(f"{len(heads)} deep-supervision heads but {len(weights)} weights")
        return sum(w * self.base_loss(h, target, weight_map) for w, h in zip(weights, heads, strict=True))


# --------------------------------------------------------------------------------------------- registry

LOSSES: Registry[Callable[[LossConfig], nn.Module]] = Registry("loss")


def _class_weights(cfg: LossConfig) -> list[float] | None:
    # With weight maps on, w_c is already inside the map (compute_weight_map); applying it again here would
    # count it twice.
    return None if cfg.weight_map else cfg.class_weights


def _ce(cfg: LossConfig) -> WeightedCrossEntropyLoss:
    return WeightedCrossEntropyLoss(cfg.label_smoothing, _class_weights(cfg))


def _dice(cfg: LossConfig) -> SoftDiceLoss:
    return SoftDiceLoss(cfg.dice_include_background, cfg.dice_smooth, cfg.dice_batch)


def _focal(cfg: LossConfig) -> FocalLoss:
    return FocalLoss(cfg.focal_gamma, _class_weights(cfg))


@LOSSES.register("ce")
def build_ce(cfg: LossConfig) -> nn.Module:
    return _ce(cfg)


@LOSSES.register("bce")
def build_bce(cfg: LossConfig) -> nn.Module:
    return WeightedBCELoss(cfg.label_smoothing)


@LOSSES.register("dice")
def build_dice(cfg: LossConfig) -> nn.Module:
    return _dice(cfg)


@LOSSES.register("dice_ce")
def build_dice_ce(cfg: LossConfig) -> nn.Module:
    return CombinedLoss([(cfg.dice_weight, _dice(cfg)), (cfg.ce_weight, _ce(cfg))])


@LOSSES.register("focal")
def build_focal(cfg: LossConfig) -> nn.Module:
    return _focal(cfg)


@LOSSES.register("dice_focal")
def build_dice_focal(cfg: LossConfig) -> nn.Module:
    # ce_weight weighs the focal term: focal is the cross-entropy term of this pair.
    return CombinedLoss([(cfg.dice_weight, _dice(cfg)), (cfg.ce_weight, _focal(cfg))])


def build_loss(cfg: LossConfig, model: ModelConfig | None = None) -> nn.Module:
    """The ``LOSSES`` entry named ``cfg.name``; ``forward(logits, target, weight_map=None) -> scalar``.

    When ``model.deep_supervision`` is on, the model returns a list of heads in training mode, so the loss is
    wrapped in :class:`DeepSupervisionLoss` with ``model.deep_supervision_weights`` (each head gets the same
    target and weight map); a single tensor (the inference head, in validation) still goes straight through.
    """
    loss = LOSSES.build(cfg.name, cfg)
    if model is not None and model.deep_supervision:
        return DeepSupervisionLoss(loss, model.deep_supervision_weights)
    return loss
