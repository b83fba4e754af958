"""AlignedCrops: the training patches behind model.cache_encoder_features (2D cases and 2.5D slices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.engine.cached_features import AlignedCrops


def _case(shape: tuple[int, ...], seed: int, channels: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((channels, *shape)).astype(np.float32), "label": rng.integers(0, 2, shape),
            "weight": np.ones(shape, np.float32)}


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_patches_are_stride_aligned_windows_of_the_padded_case(tiny_cfg, mode: str) -> None:
    cfg = tiny_cfg("data.patch_size=[64, 64]", f"augment.padding_mode={mode}")
    cases = [_case((100, 70), 0), _case((40, 130), 1)]  # smaller than the patch along one axis each
    crops = AlignedCrops(cases, cfg, stride=32, samples_per_epoch=40)
    seen = set()
    for index in range(len(crops)):
        s = crops[index]
        item, (y, x) = int(s["case"]), s["offset"].tolist()
        seen.add((item, y, x))
        image = crops.image_of(item)
        assert image.shape[-2] % 32 == image.shape[-1] % 32 == 0 and min(image.shape[-2:]) >= 64
        assert y % 32 == x % 32 == 0 and y + 64 <= image.shape[-2] and x + 64 <= image.shape[-1]
        label = cases[item]["label"]
        h, w = label.shape
        inside = s["label"][: max(0, h - y), : max(0, w - x)]
        np.testing.assert_array_equal(inside.numpy(), label[y : y + 64, x : x + 64])
        if mode == "constant":  # padded pixels weigh nothing and are background
            assert s["weight"].sum() == pytest.approx(inside.numel())
    assert {i for i, _, _ in seen} == {0, 1} and len(seen) > 4  # both cases, several offsets


def test_volume_slices_carry_their_context(tiny_cfg) -> None:
    cfg = tiny_cfg("data.patch_size=[32, 32]", "data.context_slices=1")
    volume = _case((5, 32, 32), 2)
    crops = AlignedCrops([volume], cfg, stride=32)
    assert len(crops) == 5  # one item per slice
    image = crops.image_of(0)  # slice 0 with neighbours -1 (repeated edge), 0, 1
    expected = volume["image"][0][[0, 0, 1]]
    torch.testing.assert_close(image, torch.from_numpy(expected))
    assert crops[4]["label"].shape == (32, 32)
