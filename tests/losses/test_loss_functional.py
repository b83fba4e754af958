from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medseg.losses.functional import focal_loss, soft_dice_loss, weighted_bce, weighted_cross_entropy


def logits_for(p1: list[list[float]]) -> torch.Tensor:
    """(1, 2, H, W) logits whose softmax gives foreground probability ``p1``."""
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.log(1 - p), torch.log(p)])[None]


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, 7, generator=g), torch.randint(0, 3, (2, 5, 7), generator=g)


def test_weighted_ce_with_ones_equals_torch_ce(batch) -> None:
    logits, target = batch
    ones = torch.ones(2, 5, 7)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones), F.cross_entropy(logits, target))
    torch.testing.assert_close(weighted_cross_entropy(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(
        weighted_cross_entropy(logits, target, ones, label_smoothing=0.1),
        F.cross_entropy(logits, target, label_smoothing=0.1),
    )
    # (B, 1, H, W) targets and weight maps, as MONAI pipelines give them, are the same thing.
    torch.testing.assert_close(
        weighted_cross_entropy(logits, target[:, None].float(), ones[:, None]),
        F.cross_entropy(logits, target),
    )


def test_weighted_ce_weights_each_pixel(batch) -> None:
    logits, target = batch
    w = torch.rand(2, 5, 7)
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(weighted_cross_entropy(logits, target, w), (w * per_pixel).mean())
    # A zero weight removes a pixel; class weights multiply in per target class.
    cw = torch.tensor([0.5, 2.0, 3.0])
    torch.testing.assert_close(
        weighted_cross_entropy(logits, target, w, class_weights=cw), (w * cw[target] * per_pixel).mean()
    )


def test_weighted_ce_by_hand() -> None:
    logits = logits_for([[0.9, 0.2]])
    target = torch.tensor([[[1, 1]]])
    w = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)
    expected = (-math.log(0.9) - 3 * math.log(0.2)) / 2
    assert float(weighted_cross_entropy(logits, target, w)) == pytest.approx(expected)


def test_shape_mismatch_raises(batch) -> None:
    logits, target = batch
    with pytest.raises(ValueError, match="does not match"):
        weighted_cross_entropy(logits, target[:, :4])
    with pytest.raises(ValueError, match="weight_map"):
        weighted_cross_entropy(logits, target, torch.ones(2, 5, 6))


def test_weighted_bce_matches_torch_and_smooths_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 4, 4, generator=g)
    target = torch.randint(0, 2, (3, 4, 4), generator=g)
    w = torch.rand(3, 4, 4, generator=g)
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), weight=w)
    torch.testing.assert_close(weighted_bce(logits, target, w), expected)
    # Smoothing 0.2 turns target 1 into 0.9: loss at p = sigmoid(0) = 0.5 is still log 2.
    zero = torch.zeros(1, 1, 1, 1)
    assert float(weighted_bce(zero, torch.ones(1, 1, 1), label_smoothing=0.2)) == pytest.approx(math.log(2))
    x = torch.full((1, 1, 1, 1), 2.0)
    p = 1 / (1 + math.exp(-2.0))
    by_hand = -(0.9 * math.log(p) + 0.1 * math.log(1 - p))
    assert float(weighted_bce(x, torch.ones(1, 1, 1), label_smoothing=0.2)) == pytest.approx(
        by_hand, rel=1e-6
    )
    with pytest.raises(ValueError, match="one-channel"):
        weighted_bce(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3))


def test_dice_by_hand() -> None:
    p = [[0.9, 0.2], [0.6, 0.1]]
    logits = logits_for(p)
    target = torch.tensor([[[1, 0], [1, 0]]])
    s = 1e-5
    # Foreground: intersection 0.9 + 0.6, Σp = 1.8, Σg = 2.
    dice_fg = (2 * 1.5 + s) / (1.8 + 2 + s)
    # Background: p0 = 0.1, 0.8, 0.4, 0.9, g0 = 0, 1, 0, 1 -> intersection 1.7, Σp = 2.2, Σg = 2.
    dice_bg = (2 * 1.7 + s) / (2.2 + 2 + s)
    assert float(soft_dice_loss(logits, target)) == pytest.approx(1 - dice_fg, rel=1e-6)
    assert float(soft_dice_loss(logits, target, include_background=True)) == pytest.approx(
        1 - (dice_fg + dice_bg) / 2, rel=1e-6
    )


def test_dice_batch_versus_per_sample_by_hand() -> None:
    # Sample 1 has no foreground and predicts p = 0.5 at both pixels; sample 2 is perfect on one pixel.
    logits = torch.cat([logits_for([[0.5, 0.5]]), logits_for([[1 - 1e-12, 1e-12]])])
    target = torch.tensor([[[0, 0]], [[1, 0]]])
    s = 1e-5
    per_sample = [1 - (0 + s) / (1.0 + 0 + s), 1 - (2 * (1 - 1e-12) + s) / ((1 - 1e-12 + 1e-12) + 1 + s)]
    batch_dice = 1 - (2 * (1 - 1e-12) + s) / (2.0 + 1 + s)
    assert float(soft_dice_loss(logits, target, batch=False)) == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    assert float(soft_dice_loss(logits, target, batch=True)) == pytest.approx(batch_dice, rel=1e-6)


def test_dice_single_sigmoid_channel_by_hand() -> None:
    x = torch.tensor([[[[0.0, 2.0]]]], dtype=torch.float64)  # (1, 1, 1, 2)
    p = [0.5, 1 / (1 + math.exp(-2.0))]
    target = torch.tensor([[[0, 1]]])
    expected = 1 - (2 * p[1] + 1e-5) / (sum(p) + 1 + 1e-5)
    assert float(soft_dice_loss(x, target)) == pytest.approx(expected, rel=1e-6)


def test_focal_by_hand_and_gamma_zero_is_ce(batch) -> None:
    logits = logits_for([[0.9, 0.2]])
    target = torch.tensor([[[1, 1]]])
    expected = ((0.1**2) * -math.log(0.9) + (0.8**2) * -math.log(0.2)) / 2
    assert float(focal_loss(logits, target, gamma=2.0)) == pytest.approx(expected, rel=1e-6)
    w = torch.tensor([[[2.0, 0.0]]], dtype=torch.float64)
    assert float(focal_loss(logits, target, w, gamma=2.0)) == pytest.approx(0.01 * -math.log(0.9), rel=1e-6)
    x, y = batch
    torch.testing.assert_close(focal_loss(x, y, gamma=0.0), F.cross_entropy(x, y))
    # One sigmoid channel: gamma 0 is BCE.
    x1 = x[:, :1]
    y1 = (y > 0).long()
    torch.testing.assert_close(
        focal_loss(x1, y1, gamma=0.0), F.binary_cross_entropy_with_logits(x1[:, 0], y1.float())
    )


# ------------------------------------------------------------------------- ignore label (pseudo-labels)


@pytest.mark.parametrize("name", ["ce", "bce", "dice", "dice_ce", "focal", "dice_focal"])
def test_ignored_pixels_add_nothing_to_any_loss(name: str) -> None:
    """Pixels labelled IGNORE_INDEX: no gradient, and the loss equals the loss with those pixels' logits changed
    arbitrarily (what a confidence filter promises: unconfident pseudo-labels do not train)."""
    from medseg.config import LossConfig
    from medseg.losses import build_loss
    from medseg.losses.functional import IGNORE_INDEX

    loss = build_loss(LossConfig(name=name))
    k = 1 if name == "bce" else 2
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8), generator=g)
    target[:, :3] = IGNORE_INDEX
    value = loss(logits, target)
    value.backward()
    assert logits.grad[:, :, :3].abs().max() == 0
    assert logits.grad[:, :, 3:].abs().max() > 0
    other = logits.detach().clone()
    other[:, :, :3] = torch.randn(2, k, 3, 8, generator=g) * 10
    torch.testing.assert_close(loss(other, target), value.detach())


def test_dice_over_valid_pixels_equals_dice_of_the_labeled_region() -> None:
    from medseg.losses.functional import IGNORE_INDEX

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 10, 10, generator=g)
    target = torch.randint(0, 3, (2, 10, 10), generator=g)
    partial = target.clone()
    partial[:, 6:] = IGNORE_INDEX
    for background in (False, True):  # with background counted, ignored pixels must not count as background
        torch.testing.assert_close(soft_dice_loss(logits, partial, include_background=background),
                                   soft_dice_loss(logits[:, :, :6], target[:, :6], include_background=background))
    # Pixel-weighted losses stay means over all pixels: ignored ones weigh 0.
    weights = torch.ones(2, 10, 10)
    weights[:, 6:] = 0
    torch.testing.assert_close(weighted_cross_entropy(logits, partial), weighted_cross_entropy(logits, target, weights))
    torch.testing.assert_close(focal_loss(logits, partial), focal_loss(logits, target, weights))
