"""EncoderFeatureCache: a frozen encoder's full-image features, computed once per image, cropped at
stride-aligned offsets, give the decoder what the network would compute."""

from __future__ import annotations

import pytest
import torch

from medseg.models import EncoderFeatureCache, build_model

K = 2


def _net(small_cfg, arch: str):
    return build_model(small_cfg(arch=arch, deep_supervision=arch == "unetplusplus", transfer="freeze_encoder"), 3, K)


def _images() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.rand(3, 64, 96, generator=g), "b": torch.rand(3, 96, 64, generator=g)}


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_a_whole_image_patch_equals_the_network_and_the_encoder_runs_once(small_cfg, arch: str) -> None:
    net = _net(small_cfg, arch).eval()
    images = _images()
    asked = []
    cache = EncoderFeatureCache(net, lambda key: asked.append(key) or images[key])
    with torch.no_grad():
        for _ in range(3):
            out = cache(["a"], [(0, 0)], (64, 96))
            torch.testing.assert_close(out, net(images["a"][None]))
        cache(["b", "a", "b"], [(0, 0), (0, 32), (32, 0)], (64, 64))
    assert asked == ["a", "b"] and cache.encoder_runs == 2 and len(cache) == 2


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_an_aligned_patch_gets_the_full_image_features_at_its_offset(small_cfg, arch: str) -> None:
    net = _net(small_cfg, arch).eval()
    image = _images()["a"]
    cache = EncoderFeatureCache(net, lambda _key: image)
    with torch.no_grad():
        full = net.encode(image[None])
        crops = cache.crop("a", (32, 64), (32, 32))
        for level, (f, c) in enumerate(zip(full, crops, strict=True)):
            s = 2**level
            torch.testing.assert_close(c, f[0, :, 32 // s : 64 // s, 64 // s : 96 // s])
        expected = net.forward_padded_features([c[None] for c in crops], (32, 32))
        torch.testing.assert_close(cache(["a"], [(32, 64)], (32, 32)), expected)
    with pytest.raises(ValueError, match="not aligned to the encoder stride 32"):
        cache.crop("a", (16, 0), (32, 32))


def test_the_decoder_trains_through_cached_features_and_the_encoder_must_be_frozen(small_cfg) -> None:
    net = _net(small_cfg, "unetplusplus").train()
    image = _images()["a"]
    cache = EncoderFeatureCache(net, lambda _key: image)
    out = cache(["a", "a"], [(0, 0), (0, 32)], (64, 64))
    assert isinstance(out, list) and len(out) == 5 and out[0].shape == (2, K, 64, 64)  # deep supervision heads
    sum(o.mean() for o in out).backward()
    assert net.segmentation_head[0].weight.grad is not None and net.ds_heads[0].weight.grad is not None
    assert all(p.grad is None for p in net.encoder.parameters())
    net.encoder.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        EncoderFeatureCache(net, lambda _key: image)(["a"], [(0, 0)], (64, 64))
