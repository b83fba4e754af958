"""Per-label segmentation metrics on label maps, via MONAI (Dice, IoU, HD95, surface Dice)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice
from monai.networks.utils import one_hot


def _onehot(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels), dtype=torch.long)[None, None]
    return one_hot(t, num_classes=num_classes, dim=1)


def per_label_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: tuple[float, ...] | None = None,
    hd95: bool = True,
    surface_tolerance_mm: float | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics for each foreground label ``1..K-1`` of two label maps of the same spatial shape.

    Dice/IoU are 1 when a label is absent from both; HD95 is NaN when either side lacks the label.
    ``spacing`` in array order makes HD95 (and surface Dice) millimetres.
    """
    p, t = _onehot(pred, num_classes), _onehot(target, num_classes)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)[0]
    out: dict[int, dict[str, float]] = {}
    sp = list(spacing) if spacing is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; we report NaN for those
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=sp)[0] if hd95 else None
        sd = (
            compute_surface_dice(p, t, [surface_tolerance_mm] * num_classes, include_background=True, spacing=sp)[0]
            if surface_tolerance_mm is not None
            else None
        )
    for k in range(1, num_classes):
        row = {"dice": float(dice[k]), "iou": float(iou[k])}
        if hd is not None:
            v = float(hd[k])
            row["hd95"] = v if math.isfinite(v) else float("nan")
        if sd is not None:
            row["surface_dice"] = float(sd[k])
        out[k] = row
    return out


def mean_foreground_dice(metrics: dict[int, dict[str, float]]) -> float:
    return float(np.mean([m["dice"] for m in metrics.values()])) if metrics else float("nan")
