"""Fixtures for model tests: small, offline configs (nothing in tests/models downloads weights)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from medseg.config import ModelConfig

SMALL_DECODER = (32, 16, 16, 8, 8)
ENCODER = "timm-tf_efficientnet_lite0"


def _small_cfg(**overrides: Any) -> ModelConfig:
    kw: dict[str, Any] = {"encoder": ENCODER, "decoder_channels": SMALL_DECODER, "pretrained": "none"}
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture
def small_cfg() -> Callable[..., ModelConfig]:
    """``small_cfg(**overrides)``: Lite0 encoder, tiny decoder, random init unless ``pretrained`` is given."""
    return _small_cfg


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
