"""Inference-only speed-ups for a trained network that keep its outputs (to float rounding).

``fold_batchnorm``: an eval-mode BatchNorm after a convolution is an affine map, so it can be folded into the
convolution's weights and bias and skipped. On this project's CPUs BatchNorm was a quarter of an
EfficientNet-UNet's forward time (memory-bound, one pass over every activation); folding removes it.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger("medseg")


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(conv name, bn name) for every BatchNorm whose input is exactly a Conv2d's output, found by running one
    forward with hooks (so it works for any architecture, not a list of known block layouts); and the output."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv name, output kept alive)
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def conv_hook(m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
                produced[id(out)] = (name, out)

            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, _BatchNorm):
            def bn_hook(m: nn.Module, args: tuple, name: str = name) -> None:
                hit = produced.get(id(args[0]))
                if hit is not None and hit[1] is args[0]:
                    pairs.append((hit[0], name))

            handles.append(module.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        for h in handles:
            h.remove()
    # A convolution run twice, or feeding two BatchNorms, cannot be folded into one of them.
    convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if calls.get(c) == 1 and convs.count(c) == 1], output


def _replacement(bn: nn.Module) -> nn.Module:
    # timm's BatchNormAct2d is BN -> dropout -> activation in one module: keep the latter two.
    if hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def fold_batchnorm(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> tuple[nn.Module, int]:
    """``(model', n)``: a copy of an eval-mode ``model`` with ``n`` Conv2d→BatchNorm pairs folded.

    ``example``: an input ``(B, C, H, W)`` to trace the pairs and to check the result; if the folded copy's
    output differs from the original's by more than ``atol`` (e.g. a conv output that is also used elsewhere),
    the original model is returned unchanged with ``n = 0``.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (BatchNorm uses running statistics)")
    pairs, expected = _conv_bn_pairs(model, example)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight, bias
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else folded, attr, _replacement(bn))
    with torch.no_grad():
        got = folded(example)
    diff = float((expected - got).abs().max())
    if diff > atol:
        log.warning("BatchNorm folding changed the output by %.2g; keeping the unfolded model", diff)
        return model, 0
    return folded.eval(), len(pairs)
