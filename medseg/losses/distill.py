"""Distillation losses: how far the student's logits are from a teacher's probabilities (`medseg distill`).

The teacher's probabilities are an ensemble's mean softmax (members × TTA views), so they are sharpened or softened
at temperature ``T`` as ``softmax(log p / T)`` — the same as dividing logits by ``T`` for one member, and the only
form that exists for a mean of softmaxes. Pixels whose teacher probabilities sum to less than one half are padding
(zero-filled by the augmentation's constant border) and do not count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-6


def _valid(teacher: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where the teacher has probabilities, 0 on padding."""
    return (teacher.sum(1, keepdim=True) > 0.5).to(teacher.dtype)


def kl_distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T² · KL(teacher_T ‖ student_T)`` per pixel, averaged over valid pixels. ``logits (B, K, H, W)``,
    ``teacher (B, K, H, W)`` probabilities. The T² keeps the gradient's size independent of ``T`` (Hinton et al.)."""
    t = float(temperature)
    log_q = F.log_softmax(logits.float() / t, dim=1)
    log_p = F.log_softmax(torch.log(teacher.float().clamp_min(EPS)) / t, dim=1)
    valid = _valid(teacher)
    kl = (log_p.exp() * (log_p - log_q)).sum(1, keepdim=True) * valid
    return t * t * kl.sum() / valid.sum().clamp_min(1.0)


def soft_dice_distillation(logits: torch.Tensor, teacher: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """``1 - mean over foreground classes of 2·Σ q·p / (Σ q + Σ p)`` between the student's softmax ``q`` and the
    teacher's probabilities ``p``, over the batch's valid pixels (class 0 is background and left out)."""
    q = F.softmax(logits.float(), dim=1)
    p = teacher.float()
    valid = _valid(p)
    q, p = q[:, 1:] * valid, p[:, 1:] * valid
    dims = (0, 2, 3)
    dice = (2 * (q * p).sum(dims) + smooth) / (q.sum(dims) + p.sum(dims) + smooth)
    return 1.0 - dice.mean()


def distillation_loss(logits: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor, kind: str = "kl",
                      temperature: float = 2.0) -> torch.Tensor:
    """The ``kind`` (``kl`` | ``soft_dice``) loss; deep-supervision heads (a list of full-resolution logits) are
    averaged, as `DeepSupervisionLoss` does with equal weights."""
    heads = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if kind == "kl":
        values = [kl_distillation(h, teacher, temperature) for h in heads]
    elif kind == "soft_dice":
        values = [soft_dice_distillation(h, teacher) for h in heads]
    else:
        raise ValueError(f"unknown distillation loss {kind!r}; use kl or soft_dice")
    return sum(values) / len(values)
