"""Transfer-learning strategies: what of a pretrained encoder trains, when, and at which learning rate.

Strategies (``model.transfer``):

- ``full``: everything trains.
- ``freeze_encoder``: encoder parameters get ``requires_grad=False``; its BatchNorm layers then stay in eval
  mode (running statistics frozen too) because `SegmentationNet.train` keeps every BatchNorm whose affine
  parameters are all frozen in eval mode, even when Lightning calls ``model.train()``.
- ``partial``: the first ``freeze_stages`` encoder stages (shallow -> deep, see
  `SegmentationNet.encoder_stages`) are frozen, the deeper ones train.
- ``gradual_unfreeze``: the encoder starts frozen; `unfreeze_for_epoch` (called at each epoch start)
  unfreezes stages deepest first at the epochs in ``unfreeze_at_epochs`` (ULMFiT-style).

`param_groups` builds optimizer groups with a separate (usually lower) encoder learning rate and no weight
decay on biases and normalisation parameters. `zero_init_residual` zeroes the last norm's gamma in residual
blocks, so each block starts as identity (He et al., "Bag of tricks"), useful when training from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock, Bottleneck

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.feature_cache import EncoderFeatureCache as EncoderFeatureCache  # noqa: I001 re-export

_NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _set_trainable(modules: Iterable[nn.Module], trainable: bool) -> None:
    for m in modules:
        for p in m.parameters(recurse=False):
            p.requires_grad_(trainable)


def _refresh_norm_modes(model: nn.Module) -> None:
    # Re-apply train()/eval() so BatchNorm layers follow their (new) frozen state right away.
    model.train(model.training)


def freeze_encoder(model: nn.Module) -> None:
    """Freeze all encoder parameters (and hence its BatchNorm statistics, see module docstring)."""
    model.encoder.requires_grad_(False)
    _refresh_norm_modes(model)


def unfreeze_encoder(model: nn.Module) -> None:
    """Make all encoder parameters trainable again."""
    model.encoder.requires_grad_(True)
    _refresh_norm_modes(model)


def freeze_stages(model: nn.Module, n: int) -> None:
    """Freeze the first ``n`` encoder stages (shallowest first); the others become trainable."""
    stages = model.encoder_stages()
    if not 0 <= n <= len(stages):
        raise ConfigError(f"model.freeze_stages={n}: the encoder has {len(stages)} stages")
    for i, stage in enumerate(stages):
        _set_trainable(stage, trainable=i >= n)
    _refresh_norm_modes(model)


def unfreeze_for_epoch(model: nn.Module, epoch: int, unfreeze_at_epochs: Iterable[int]) -> int:
    """Set which encoder stages train at ``epoch`` under gradual unfreezing; returns how many train.

    The i-th entry of ``unfreeze_at_epochs`` is the epoch from which the i-th deepest stage trains: with
    (2, 4) the deepest stage trains from epoch 2, the two deepest from epoch 4, the rest stay frozen. The
    state depends only on ``epoch`` (not on earlier calls), so resuming from a checkpoint is correct.
    The optimizer from `param_groups` already holds the frozen parameters; frozen ones get no gradient and
    optimizers skip them until they unfreeze.
    """
    stages = model.encoder_stages()
    epochs = list(unfreeze_at_epochs)
    if len(epochs) > len(stages):
        raise ConfigError(
            f"model.unfreeze_at_epochs has {len(epochs)} entries; the encoder has {len(stages)} stages"
        )
    n_trainable = sum(1 for e in epochs if epoch >= e)
    freeze_stages(model, len(stages) - n_trainable)
    return n_trainable


def apply_transfer_strategy(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Put ``model`` in the initial trainable state of ``model_cfg.transfer``."""
    strategy = model_cfg.transfer
    model.requires_grad_(True)
    if strategy == "freeze_encoder":
        freeze_encoder(model)
    elif strategy == "partial":
        freeze_stages(model, model_cfg.freeze_stages)
    elif strategy == "gradual_unfreeze":
        if not model_cfg.unfreeze_at_epochs:
            raise ConfigError(
                "model.transfer=gradual_unfreeze needs model.unfreeze_at_epochs (one epoch per stage)"
            )
        unfreeze_for_epoch(model, 0, model_cfg.unfreeze_at_epochs)
    elif strategy != "full":
        raise ConfigError(
            f"unknown model.transfer {strategy!r}; valid: full, freeze_encoder, partial, gradual_unfreeze"
        )
    _refresh_norm_modes(model)


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, m in model.named_modules():
        for p_name, p in m.named_parameters(recurse=False):
            if isinstance(m, _NORM_TYPES) or p_name == "bias" or p.ndim <= 1:
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    encoder_lr_mult: float = 1.0,
    no_decay_on_bias_norm: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: encoder at ``lr * encoder_lr_mult``, the rest at ``lr``.

    With ``no_decay_on_bias_norm`` biases and normalisation weights (and any 1-D parameter) get
    ``weight_decay=0``: decaying them only shrinks scales/offsets towards 0 without regularising. Every
    parameter is included, frozen ones too, so gradual unfreezing works with one optimizer (parameters
    without a gradient are skipped by torch optimizers). Empty groups are left out.

    Returns:
        ``[{"params": [...], "lr": ..., "weight_decay": ..., "name": "encoder"|"encoder_no_decay"|...}, ...]``
    """
    no_decay = _no_decay_names(model) if no_decay_on_bias_norm else set()
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        part = "encoder" if name.startswith("encoder.") else "decoder"
        key = f"{part}_no_decay" if name in no_decay else part
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * (encoder_lr_mult if part == "encoder" else 1.0),
                "weight_decay": 0.0 if name in no_decay else weight_decay,
                "name": key,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def _last_norm_child(block: nn.Module) -> nn.Module | None:
    # Direct children only: a projection shortcut's own BatchNorm (torchvision's `downsample`) must stay.
    norms = [m for m in block.children() if isinstance(m, _NORM_TYPES)]
    return norms[-1] if norms else None


def _is_residual_block(m: nn.Module) -> bool:
    if isinstance(m, BasicBlock | Bottleneck):  # torchvision ResNets (smp's resnet* encoders)
        return True
    if getattr(m, "has_skip", False):  # timm EfficientNet/MobileNet blocks with an identity shortcut
        return True
    # smp's MBConvBlock (efficientnet-b* encoders, lukemelas port) adds its input exactly when this is set.
    return bool(getattr(m, "_has_drop_connect", False))


def zero_init_residual(module: nn.Module) -> int:
    """Zero gamma of the last norm layer in every residual block of ``module``; returns how many.

    Each residual branch then outputs 0 and the block starts as the identity. timm ResNet blocks use their own
    ``zero_init_last``. Meant for random initialisation: pretrained weights loaded afterwards overwrite it.
    """
    count = 0
    for m in module.modules():
        if hasattr(m, "zero_init_last") and callable(m.zero_init_last):
            m.zero_init_last()
            count += 1
        elif _is_residual_block(m):
            norm = _last_norm_child(m)
            if norm is not None and getattr(norm, "weight", None) is not None:
                nn.init.zeros_(norm.weight)
                count += 1
    return count
