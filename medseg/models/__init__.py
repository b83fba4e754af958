"""Segmentation networks: the ``MODELS`` registry (UNet, UNet++ over segmentation-models-pytorch), encoders,
pretrained-weight sources and transfer-learning strategies.

>>> from medseg.config import ModelConfig
>>> net = build_model(ModelConfig(arch="unetplusplus", pretrained="none"), in_channels=1, num_classes=2)
>>> net(torch.zeros(2, 1, 45, 61)).shape   # any H, W
torch.Size([2, 2, 45, 61])
"""

from __future__ import annotations

from medseg.models.encoders import input_normalisation, resolve_encoder_name
from medseg.models.factory import MODELS, build_model
from medseg.models.feature_cache import EncoderFeatureCache
from medseg.models.network import SegmentationNet, UnetNet, UnetPlusPlusNet
from medseg.models.norms import convert_batchnorm_to_groupnorm, set_batchnorm_momentum
from medseg.models.pretrained import LoadReport, load_pretrained, lukemelas_to_timm_lite
from medseg.models.transfer import (
    apply_transfer_strategy,
    freeze_encoder,
    freeze_stages,
    param_groups,
    unfreeze_encoder,
    unfreeze_for_epoch,
    zero_init_residual,
)

__all__ = [
    "MODELS",
    "EncoderFeatureCache",
    "LoadReport",
    "SegmentationNet",
    "UnetNet",
    "UnetPlusPlusNet",
    "apply_transfer_strategy",
    "build_model",
    "convert_batchnorm_to_groupnorm",
    "freeze_encoder",
    "freeze_stages",
    "input_normalisation",
    "load_pretrained",
    "lukemelas_to_timm_lite",
    "param_groups",
    "resolve_encoder_name",
    "set_batchnorm_momentum",
    "unfreeze_encoder",
    "unfreeze_for_epoch",
    "zero_init_residual",
]
