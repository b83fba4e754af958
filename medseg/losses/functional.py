"""Segmentation loss math as plain functions.

Shapes: ``logits`` ``(B, K, *spatial)`` (K classes, softmax; K = 1 means one sigmoid channel);
``target`` ``(B, *spatial)`` integer class indices (``(B, 1, *spatial)`` is accepted too, as MONAI
pipelines produce); ``weight_map`` ``(B, *spatial)`` or ``(B, 1, *spatial)`` per-pixel weights, e.g. the
U-Net boundary weight map.

Pixel-weighted losses are **means over pixels** of ``w(x)·loss(x)`` (not divided by ``Σw``), so an
all-ones map gives the unweighted loss and the U-Net map's border pixels add to it, as in the paper's
energy ``Σ w(x) log p(x)``. Dice and focal come from MONAI; the weighted cross-entropy is ours.

Target pixels equal to ``IGNORE_INDEX`` (255) add nothing to any loss: pseudo-labelled pixels the teacher was not
confident about (`medseg.engine.pseudo_labels`). They weigh 0 in the pixel-weighted losses (which stay means over all
pixels) and are masked out of Dice (MONAI ``MaskedDiceLoss``). Labeled data never holds 255 (labels are class indices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as _MonaiDice
from monai.losses import FocalLoss as _MonaiFocal
from monai.losses import MaskedDiceLoss as _MonaiMaskedDice

__all__ = ["IGNORE_INDEX", "focal_loss", "soft_dice_loss", "weighted_bce", "weighted_cross_entropy"]

IGNORE_INDEX = 255  # a target pixel without a label: no loss (class indices stay below it)


def _class_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, [1,] *spatial)`` -> ``(B, *spatial)`` long, checked against ``logits``."""
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            "expected (B, *spatial) or (B, 1, *spatial)"
        )
    if target.is_floating_point():
        target = target.round()
    return target.long()


def _ignored(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(target with ignored pixels set to class 0, valid mask (B, *spatial) float)``; mask None when no pixel is
    ignored, so fully labeled batches compute exactly what they did before ignore labels existed."""
    ignore = target == IGNORE_INDEX
    if not bool(ignore.any()):
        return target, None
    return target.masked_fill(ignore, 0), (~ignore).float()


def _with_valid(weights: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor | None:
    if valid is None:
        return weights
    return valid if weights is None else weights * valid.to(weights.dtype)


def _pixel_weights(
    reference: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None,
    class_weights: Sequence[float] | torch.Tensor | None,
) -> torch.Tensor | None:
    """Per-pixel weights ``(B, *spatial)`` = weight map × class weight of the target class; None if neither."""
    weights = None
    if weight_map is not None:
        if weight_map.ndim == target.ndim + 1 and weight_map.shape[1] == 1:
            weight_map = weight_map[:, 0]
        if weight_map.shape != target.shape:
            raise ValueError(
                f"weight_map {tuple(weight_map.shape)} does not match target {tuple(target.shape)}"
            )
        weights = weight_map.to(reference.dtype)
    if class_weights is not None:
        table = torch.as_tensor(class_weights, dtype=reference.dtype, device=reference.device)
        per_pixel = table[target]
        weights = per_pixel if weights is None else weights * per_pixel
    return weights


def _weighted_mean(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return loss.mean() if weights is None else (loss * weights).mean()


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy, each pixel weighted by ``weight_map`` (and ``class_weights[target]``).

    Args:
        logits: ``(B, K, *spatial)``, K >= 2.
        target: ``(B, *spatial)`` class indices.
        weight_map: ``(B, *spatial)`` or None (all ones: equals ``F.cross_entropy``).
        label_smoothing: as in ``F.cross_entropy``.
        class_weights: ``(K,)`` weight per class, multiplied into the pixel weights.

    Returns:
        scalar: mean over pixels of ``w·CE``.
    """
    target, valid = _ignored(_class_target(logits, target))
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    return _weighted_mean(ce, _with_valid(_pixel_weights(ce, target, weight_map, class_weights), valid))


def weighted_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid binary cross-entropy for one-channel outputs, pixel-weighted.

    Args:
        logits: ``(B, 1, *spatial)``.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` with values 0/1.
        weight_map: ``(B, *spatial)`` or None.
        label_smoothing: targets become ``t·(1 - s) + s/2``.

    Returns:
        scalar: mean over pixels of ``w·BCE``.
    """
    if logits.ndim < 2 or logits.shape[1] != 1:
        raise ValueError(f"weighted_bce takes one-channel logits (B, 1, *spatial), got {tuple(logits.shape)}")
    target, valid = _ignored(_class_target(logits, target))
    t = target.to(logits.dtype)
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + 0.5 * label_smoothing
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
    return _weighted_mean(bce, _with_valid(_pixel_weights(bce, target, weight_map, None), valid))


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch: bool = True,
) -> torch.Tensor:
    """``1 - (2·Σ p·g + smooth) / (Σ p + Σ g + smooth)``, averaged over classes (MONAI ``DiceLoss``).

    Args:
        logits: ``(B, K, *spatial)``: softmax over K; K = 1 -> sigmoid (background is then implicit).
        target: ``(B, *spatial)`` class indices.
        include_background: count class 0 too (ignored for K = 1).
        smooth: added to numerator and denominator.
        batch: sum over the whole batch before the ratio (one Dice per class). Per-sample Dice (False)
            scores a patch without a class as a near-total loss whenever anything is predicted there,
            which makes small-patch training noisy.

    Returns:
        scalar.
    """
    target, valid = _ignored(_class_target(logits, target))
    if valid is not None:
        return _masked_dice(logits, target, valid, include_background, smooth, batch)
    target = target[:, None]
    if logits.shape[1] == 1:
        loss = _MonaiDice(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch)
    else:
        loss = _MonaiDice(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            smooth_nr=smooth,
            smooth_dr=smooth,
            batch=batch,
        )
    return loss(logits, target.to(logits.dtype))


def _masked_dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, include_background: bool,
                 smooth: float, batch: bool) -> torch.Tensor:
    """Dice over the valid pixels only. The target is one-hot encoded here, before masking: MONAI would one-hot
    the masked target and so call every ignored pixel background."""
    mask = valid[:, None].to(logits.dtype)
    if logits.shape[1] == 1:
        loss = _MonaiMaskedDice(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch)
        return loss(logits, target[:, None].to(logits.dtype), mask)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    loss = _MonaiMaskedDice(include_background=include_background, softmax=True, smooth_nr=smooth, smooth_dr=smooth,
                            batch=batch)
    return loss(logits, onehot, mask)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    gamma: float = 2.0,
    class_weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss ``-(1 - p_t)^γ · log p_t`` (Lin et al. 2017), pixel-weighted (MONAI ``FocalLoss``).

    Softmax over K >= 2 classes, sigmoid for K = 1. ``γ = 0`` gives the (weighted) cross-entropy.

    Returns:
        scalar: mean over pixels of ``w·focal`` (summed over classes per pixel, so the scale matches CE;
        MONAI's own ``mean`` also divides by K).
    """
    target, valid = _ignored(_class_target(logits, target))
    if logits.shape[1] == 1:
        monai_focal = _MonaiFocal(gamma=gamma, reduction="none")
        per_class = monai_focal(logits, target[:, None].to(logits.dtype))
    else:
        monai_focal = _MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=gamma, reduction="none")
        per_class = monai_focal(logits, target[:, None])
    per_pixel = per_class.sum(dim=1)
    return _weighted_mean(per_pixel, _with_valid(_pixel_weights(per_pixel, target, weight_map, class_weights), valid))
