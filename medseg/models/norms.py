"""Normalisation layers: BatchNorm -> GroupNorm swap and BatchNorm momentum.

GroupNorm does not depend on the batch, which matters for the small batches 2D/2.5D medical training often
uses. Swapping keeps each layer's affine parameters (gamma, beta), so a pretrained encoder keeps its learned
scales and shifts; only the running statistics are dropped (GroupNorm normalises per sample instead).
"""

from __future__ import annotations

import math

from timm.layers import BatchNormAct2d, GroupNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def group_count(num_channels: int, groups: int) -> int:
    """Groups actually used for ``num_channels``: ``gcd(num_channels, groups)``.

    GroupNorm needs the group count to divide the channels; the gcd keeps each group at the requested size or a
    divisor of it (e.g. 24 channels with ``groups=32`` -> 8 groups of 3, not 24 groups of 1 = instance norm).
    """
    return math.gcd(num_channels, groups)


def _to_group_norm(bn: _BatchNorm, groups: int) -> nn.Module:
    c = bn.num_features
    g = group_count(c, groups)
    if isinstance(bn, BatchNormAct2d):
        # timm fuses the activation into its norm layer; keep it, or the encoder would lose its non-linearity.
        gn: nn.GroupNorm = GroupNormAct(c, num_groups=g, eps=bn.eps, affine=bn.affine, apply_act=False)
        gn.act = bn.act
        gn.drop = bn.drop
    else:
        gn = nn.GroupNorm(g, c, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn = gn.to(bn.weight.device)
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    return gn


def convert_batchnorm_to_groupnorm(module: nn.Module, groups: int) -> int:
    """Replace every 2D BatchNorm inside ``module`` (in place) by GroupNorm with ``gcd(C, groups)`` groups.

    gamma/beta are copied, running statistics dropped; timm's ``BatchNormAct2d`` becomes ``GroupNormAct`` with
    the same activation. Returns the number of layers replaced.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and not isinstance(child, nn.BatchNorm1d | nn.BatchNorm3d):
            setattr(module, name, _to_group_norm(child, groups))
            replaced += 1
        else:
            replaced += convert_batchnorm_to_groupnorm(child, groups)
    return replaced


def set_batchnorm_momentum(module: nn.Module, momentum: float) -> int:
    """Set ``momentum`` on every BatchNorm layer in ``module``; returns how many were changed.

    smp's ``efficientnet-b*`` encoders ship TF's 0.01 (torch convention), which leaves running statistics far
    from the data after a short training (see NOTES); 0.1 is torch's default.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = momentum
            n += 1
    return n
