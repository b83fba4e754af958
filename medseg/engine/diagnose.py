"""Read learning curves like an experienced practitioner: name the likely problem and what to try.

Input rows are the per-epoch records written to metrics.csv (epoch, train_loss, val_loss, val_dice, and the
learning rate of each parameter group, ``lr_<group>``; the highest is the schedule's peak rate).
Heuristics, deliberately simple and explainable; each finding says what it saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finding:
    code: str  # overfitting | underfitting | lr_too_high | decay_too_early | not_converged | ok
    message: str


def _finite(values: list[float]) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def _largest_rise(loss: np.ndarray) -> float:
    """The largest epoch-to-epoch increase as a share of the level it rose from (0 for a curve that only falls).
    Noise is a loss that goes *up*: the spread of the steps alone would call a fast, steady fall noisy
    (0.65 → 0.24 → 0.17 → 0.15 has steps as spread out as their mean)."""
    finite = _finite(loss)
    if len(finite) < 2:
        return 0.0
    return float(np.max(np.diff(finite) / np.maximum(np.abs(finite[:-1]), 1e-8)))


def diagnose_curves(rows: list[dict[str, float]], good_dice: float = 0.7) -> list[Finding]:
    """Findings for per-epoch ``rows`` (metrics.csv): ``lr_too_high``, ``overfitting``, ``underfitting``,
    ``not_converged``, ``decay_too_early`` (each with what to try), ``too_short`` for fewer than 3 epochs,
    or one ``ok``. ``good_dice`` is the best val Dice below which close, high losses mean underfitting."""
    if len(rows) < 3:
        return [Finding("too_short", f"only {len(rows)} epoch(s): too few to read the curves; train longer")]
    train = np.array([r["train_loss"] for r in rows], dtype=float)
    val = np.array([r["val_loss"] for r in rows], dtype=float)
    dice = np.array([r["val_dice"] for r in rows], dtype=float)
    lr = np.array([max((float(v) for k, v in r.items() if k == "lr" or k.startswith("lr_")), default=math.nan)
                   for r in rows], dtype=float)
    n = len(rows)
    third = max(1, n // 3)
    out: list[Finding] = []

    if not np.all(np.isfinite(train)) or train[-1] > 1.5 * train[0] or _largest_rise(train) > 0.5:
        out.append(Finding("lr_too_high", "training loss is noisy or diverging (NaN, rising, or jumping by more than half its level): lower the learning rate (e.g. ÷3–10) or add warmup/gradient clipping"))

    best_val_epoch = int(np.nanargmin(val)) if np.isfinite(val).any() else n - 1
    if best_val_epoch < n - third and val[-1] > val[best_val_epoch] * 1.1 and train[-1] < train[best_val_epoch]:
        out.append(Finding("overfitting", f"validation loss was lowest at epoch {best_val_epoch + 1} and rose since while training loss kept falling: more augmentation, weight decay or data; fewer epochs or early stopping; a frozen/partially frozen encoder"))

    final_dice = float(np.nanmax(dice)) if np.isfinite(dice).any() else math.nan
    if final_dice < good_dice and abs(train[-1] - val[-1]) < 0.25 * max(train[-1], 1e-8) and train[-1] > 0.3 * train[0]:
        out.append(Finding("underfitting", f"training and validation loss are close and both high (best val Dice {final_dice:.2f}): a larger model or encoder, a higher learning rate, longer training, less regularisation"))

    recent = dice[-third:]
    if np.isfinite(recent).all() and n >= 4 and recent[-1] - recent[0] > 0.02 and np.all(np.diff(recent) > -0.01):
        out.append(Finding("not_converged", f"val Dice still rising over the last {third} epoch(s) ({recent[0]:.3f} → {recent[-1]:.3f}): train longer"))

    if np.isfinite(lr).all() and lr[0] > 0:
        low = np.where(lr < 0.05 * lr.max())[0]
        if len(low) and low[0] < n - third and np.isfinite(dice).all():
            after = dice[low[0]:]
            if after.max() - after.min() < 0.005:
                out.append(Finding("decay_too_early", f"the learning rate fell below 5% of its peak by epoch {low[0] + 1} and val Dice has been flat since: decay later (longer cosine, fewer steps) or use warm restarts"))

    return out or [Finding("ok", "curves look healthy: validation improved and settled without divergence or overfitting")]
