"""Segmentation losses: functional math (:mod:`.functional`), modules and the ``LOSSES`` registry (:mod:`.modules`)."""

from __future__ import annotations

from medseg.losses.functional import focal_loss, soft_dice_loss, weighted_bce, weighted_cross_entropy
from medseg.losses.modules import (
    LOSSES,
    CombinedLoss,
    DeepSupervisionLoss,
    FocalLoss,
    SoftDiceLoss,
    WeightedBCELoss,
    WeightedCrossEntropyLoss,
    build_loss,
)

__all__ = [
    "LOSSES",
    "CombinedLoss",
    "DeepSupervisionLoss",
    "FocalLoss",
    "SoftDiceLoss",
    "WeightedBCELoss",
    "WeightedCrossEntropyLoss",
    "build_loss",
    "focal_loss",
    "soft_dice_loss",
    "weighted_bce",
    "weighted_cross_entropy",
]
