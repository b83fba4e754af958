from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.config import LossConfig
from medseg.losses import LOSSES, DeepSupervisionLoss, build_loss, soft_dice_loss, weighted_cross_entropy
from medseg.losses.functional import focal_loss
from medseg.registry import UnknownNameError


def inputs(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, max(k, 2), (2, 8, 8), generator=g)
    weight = 1 + 10 * torch.rand(2, 8, 8, generator=g)
    return logits, target, weight


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("with_weight_map", [False, True])
def test_every_loss_builds_and_runs_forward_backward(name: str, with_weight_map: bool) -> None:
    loss = build_loss(LossConfig(name=name, weight_map=with_weight_map))
    k = 1 if loss.single_channel else 3
    logits, target, weight = inputs(k)
    value = loss(logits, target, weight if with_weight_map else None)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # A better prediction (the target itself, confidently) lowers the loss.
    perfect = (F.one_hot(target, max(k, 2)).permute(0, 3, 1, 2).float() * 20 - 10)[:, -k:]
    assert loss(perfect, target, weight if with_weight_map else None) < value


def test_unknown_loss_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="valid: bce, ce, dice, dice_ce, dice_focal, focal"):
        build_loss(LossConfig(name="hinge"))


def test_dice_ce_is_weighted_sum_of_its_parts() -> None:
    logits, target, weight = inputs(3)
    cfg = LossConfig(name="dice_ce", dice_weight=0.3, ce_weight=2.0, label_smoothing=0.05)
    expected = 0.3 * soft_dice_loss(logits, target) + 2.0 * weighted_cross_entropy(
        logits, target, weight, label_smoothing=0.05
    )
    torch.testing.assert_close(build_loss(cfg)(logits, target, weight), expected)


def test_dice_focal_uses_focal_gamma() -> None:
    logits, target, weight = inputs(3)
    cfg = LossConfig(name="dice_focal", focal_gamma=1.5)
    expected = soft_dice_loss(logits, target) + focal_loss(logits, target, weight, gamma=1.5)
    torch.testing.assert_close(build_loss(cfg)(logits, target, weight), expected)


def test_class_weights_apply_only_without_weight_maps() -> None:
    logits, target, _ = inputs(3)
    cw = [1.0, 2.0, 4.0]
    plain = F.cross_entropy(logits, target, reduction="none")
    with_cw = build_loss(LossConfig(name="ce", class_weights=cw))(logits, target)
    torch.testing.assert_close(with_cw, (plain * torch.tensor(cw)[target]).mean())
    # With weight maps on, w_c is inside the map already; counting it again would square it.
    in_map = build_loss(LossConfig(name="ce", class_weights=cw, weight_map=True))(logits, target)
    torch.testing.assert_close(in_map, plain.mean())


def test_deep_supervision_sums_weighted_head_losses() -> None:
    base = build_loss(LossConfig(name="dice_ce"))
    heads = [inputs(2, seed=s)[0] for s in range(3)]
    _, target, weight = inputs(2)
    ds = DeepSupervisionLoss(base, weights=[0.5, 0.25, 0.25])
    expected = sum(w * base(h, target, weight) for w, h in zip([0.5, 0.25, 0.25], heads, strict=True))
    torch.testing.assert_close(ds(heads, target, weight), expected)
    # Default: equal weights summing to 1; a single tensor goes straight to the base loss.
    mean = sum(base(h, target, weight) for h in heads) / 3
    torch.testing.assert_close(DeepSupervisionLoss(base)(heads, target, weight), mean)
    torch.testing.assert_close(
        DeepSupervisionLoss(base)(heads[0], target, weight), base(heads[0], target, weight)
    )
    ds(heads, target, weight).backward()
    assert all(h.grad is not None for h in heads)
    with pytest.raises(ValueError, match="3 deep-supervision heads but 2 weights"):
        DeepSupervisionLoss(base, weights=[1.0, 1.0])(heads, target)
