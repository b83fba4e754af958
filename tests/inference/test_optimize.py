"""BatchNorm folding keeps outputs and refuses unsafe folds."""

from __future__ import annotations

import torch
from inference_helpers import tiny_config
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medseg.inference.optimize import fold_batchnorm
from medseg.models import build_model


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_fold_batchnorm_keeps_outputs_of_a_real_network() -> None:
    cfg = tiny_config()
    model = build_model(cfg.model, 3, 2).eval()
    _randomise_bn(model)
    folded, n = fold_batchnorm(model, torch.rand(1, 3, 64, 64))
    assert n > 30  # every conv->BN pair of encoder and decoder
    executed = []
    hooks = [m.register_forward_hook(lambda m, a, o: executed.append(m)) for m in folded.modules()
             if isinstance(m, _BatchNorm)]
    x = torch.rand(2, 3, 96, 77)
    with torch.no_grad():
        out = folded(x)
        ref = model(x)
    for h in hooks:
        h.remove()
    assert not executed  # no BatchNorm runs any more
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # the original is untouched


class ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the raw conv output is needed too: folding would change the result


def test_fold_batchnorm_refuses_when_conv_output_is_reused() -> None:
    model = ConvUsedTwice().eval()
    _randomise_bn(model)
    folded, n = fold_batchnorm(model, torch.rand(1, 3, 16, 16))
    assert n == 0 and folded is model
