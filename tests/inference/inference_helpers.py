"""Helpers for inference tests: tiny real network configs (random init, no training) and toy models whose
symmetries are known."""

from __future__ import annotations

import torch
from torch import nn

from medseg.config import ExperimentConfig, load_config
from medseg.models import build_model

TINY = [
    "name=tiny", "model.pretrained=none", "model.decoder_channels=[16, 8, 8, 8, 8]",
    "data.labels={0: background, 1: nucleus}", "inference.tile_size=[64, 64]", "inference.batch_size=4",
]  # fmt: skip


def tiny_config(*overrides: str) -> ExperimentConfig:
    return load_config(None, [*TINY, *overrides])


def tiny_state(cfg: ExperimentConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    return model.state_dict()


class SymmetricConv(nn.Module):
    """(B, C, H, W) -> (B, 2, H, W): a 3×3 convolution whose kernel is symmetric in both axes (zero padding),
    so the model is exactly flip-equivariant; ``symmetric=False`` breaks that."""

    def __init__(self, channels: int = 3, symmetric: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)  # same weights and bias for every instance
        self.conv = nn.Conv2d(channels, 2, 3, padding=1)
        with torch.no_grad():
            w = torch.randn(2, channels, 3, 3)
            if symmetric:
                w = (w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4
            self.conv.weight.copy_(w * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Pointwise(nn.Module):
    """(B, C, H, W) -> (B, 2, H, W) from each pixel alone: equivariant to flips, rotations, shifts and tiling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(1, keepdim=True)
        return torch.cat([-4 * (m - 0.5), 4 * (m - 0.5)], dim=1)
