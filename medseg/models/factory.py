"""The ``MODELS`` registry and `build_model`: a `ModelConfig` -> a ready `SegmentationNet`.

Registry entries build the architecture with random weights (smp ``encoder_weights=None``, BatchNorm);
`build_model` then applies what is common to all of them, in an order that matters:

1. zero-gamma residual init (optional; an initialisation, so pretrained weights loaded next override it),
2. ImageNet encoder weights (strict, into the BatchNorm layout they were trained in),
3. BatchNorm -> GroupNorm (keeping gamma/beta) or BatchNorm momentum,
4. weights from a file/bundle (by name and shape, into the final layout, which may be GroupNorm),
5. the transfer strategy's initial frozen state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import segmentation_models_pytorch as smp
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.encoders import resolve_encoder_name
from medseg.models.network import SegmentationNet, UnetNet, UnetPlusPlusNet
from medseg.models.norms import convert_batchnorm_to_groupnorm, set_batchnorm_momentum
from medseg.models.pretrained import ENCODER_SOURCES, load_pretrained
from medseg.models.transfer import apply_transfer_strategy, zero_init_residual
from medseg.registry import Registry, UnknownNameError

ModelBuilder = Callable[[ModelConfig, int, int], SegmentationNet]
MODELS: Registry[ModelBuilder] = Registry("model")


def _smp_kwargs(cfg: ModelConfig, in_channels: int, num_classes: int) -> dict:
    depth = len(cfg.decoder_channels)
    if not 3 <= depth <= 5:
        raise ConfigError(f"model.decoder_channels needs 3 to 5 entries (one per encoder stage), got {depth}")
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"need in_channels >= 1 and num_classes >= 1, got {in_channels}, {num_classes}")
    return {
        "encoder_name": resolve_encoder_name(cfg.encoder),
        "encoder_depth": depth,
        "encoder_weights": None,  # never download here; weights come from medseg.models.pretrained
        "decoder_channels": tuple(cfg.decoder_channels),
        # Our wrapper runs its own upsampling; tell smp the interpolation anyway for a truthful repr.
        "decoder_interpolation": "nearest" if cfg.upsampling == "transpose" else cfg.upsampling,
        "in_channels": in_channels,
        "classes": num_classes,
    }


def _build_smp(cls: type[nn.Module], kwargs: dict) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # timm-* encoder names are deprecated upstream; our offline Lite weights target that layout.
            warnings.filterwarnings("ignore", message=".*encoders are deprecated.*")
            return cls(**kwargs)
    except (ValueError, KeyError, RuntimeError, AssertionError, TypeError) as e:
        raise ConfigError(
            f"cannot build {cls.__name__} with encoder {kwargs['encoder_name']!r}: {e}"
        ) from None


@MODELS.register("unet")
def build_unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> UnetNet:
    """U-Net (smp ``Unet``) with any smp/timm encoder; no deep supervision."""
    if cfg.deep_supervision or cfg.inference_head != "full" or cfg.deep_supervision_weights is not None:
        raise ConfigError(
            "model.deep_supervision(_weights) / inference_head mean/pruned apply to arch unetplusplus only "
            f"(got arch unet, deep_supervision={cfg.deep_supervision}, inference_head={cfg.inference_head})"
        )
    kwargs = _smp_kwargs(cfg, in_channels, num_classes)
    net = _build_smp(smp.Unet, kwargs)
    return UnetNet(net, kwargs["encoder_name"], in_channels, num_classes, cfg.upsampling)


@MODELS.register("unetplusplus")
def build_unetplusplus(cfg: ModelConfig, in_channels: int, num_classes: int) -> UnetPlusPlusNet:
    """UNet++ (smp ``UnetPlusPlus``) with deep-supervision heads on X(0,1..D-1) and pruned inference."""
    kwargs = _smp_kwargs(cfg, in_channels, num_classes)
    depth = kwargs["encoder_depth"]
    if cfg.inference_head != "full" and not cfg.deep_supervision:
        raise ConfigError(
            f"model.inference_head={cfg.inference_head} uses the deep-supervision heads, which only learn with "
            "model.deep_supervision: true"
        )
    if not 1 <= cfg.pruned_depth <= depth - 1:
        raise ConfigError(
            f"model.pruned_depth must be in 1..{depth - 1} (nested nodes X(0,j)), got {cfg.pruned_depth}"
        )
    weights = cfg.deep_supervision_weights
    if weights is not None and not cfg.deep_supervision:
        raise ConfigError("model.deep_supervision_weights weigh the deep-supervision heads: set model.deep_supervision: true")
    if weights is not None and len(weights) != depth:
        raise ConfigError(
            f"model.deep_supervision_weights needs {depth} entries (main output, then heads X(0,1..{depth - 1})), "
            f"got {len(weights)}"
        )
    net = _build_smp(smp.UnetPlusPlus, kwargs)
    return UnetPlusPlusNet(
        net,
        kwargs["encoder_name"],
        in_channels,
        num_classes,
        cfg.upsampling,
        deep_supervision=cfg.deep_supervision,
        inference_head=cfg.inference_head,
        pruned_depth=cfg.pruned_depth,
    )


def build_model(model_cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationNet:
    """Build the configured network: ``forward((B, in_channels, H, W)) -> (B, num_classes, H, W)`` logits.

    See the module docstring for the build steps; ``model.load_report`` tells what initial weights were loaded.
    Unknown ``arch``/``encoder`` names and inconsistent options raise `ConfigError`.
    """
    try:
        builder = MODELS.get(model_cfg.arch)
    except UnknownNameError as e:
        raise ConfigError(f"model.arch: {e}") from None
    net = builder(model_cfg, in_channels, num_classes)
    if model_cfg.zero_init_residual:
        zero_init_residual(net.encoder)
    encoder_source = model_cfg.pretrained in ENCODER_SOURCES
    if encoder_source:
        net.load_report = load_pretrained(net, model_cfg.pretrained)
    if model_cfg.norm == "group":
        convert_batchnorm_to_groupnorm(net, model_cfg.groups)
    elif model_cfg.bn_momentum is not None:
        set_batchnorm_momentum(net, model_cfg.bn_momentum)
    if not encoder_source:
        net.load_report = load_pretrained(net, model_cfg.pretrained)
    apply_transfer_strategy(net, model_cfg)
    return net
