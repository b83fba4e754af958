"""Every registered architecture x norm x input channels x deep supervision: forward/backward at odd sizes."""

from __future__ import annotations

import itertools

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.models import MODELS, build_model
from medseg.models.network import reflect_pad_to_multiple

H, W, K = 45, 61, 3  # deliberately not multiples of 32

MATRIX = list(itertools.product(MODELS.names(), ["batch", "group"], [1, 3, 5], [False, True]))


@pytest.mark.parametrize(("arch", "norm", "channels", "deep_supervision"), MATRIX)
def test_forward_backward_any_size(small_cfg, arch, norm, channels, deep_supervision):
    cfg = small_cfg(arch=arch, norm=norm, deep_supervision=deep_supervision)
    if deep_supervision and arch != "unetplusplus":
        with pytest.raises(ConfigError, match="unetplusplus"):
            build_model(cfg, channels, K)
        return
    net = build_model(cfg, channels, K).train()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)]
    assert norms and all(isinstance(m, nn.GroupNorm if norm == "group" else nn.BatchNorm2d) for m in norms)

    out = net(torch.randn(2, channels, H, W))
    outs = out if isinstance(out, list) else [out]
    assert isinstance(out, list) == deep_supervision
    if deep_supervision:
        assert len(outs) == 1 + net.num_nested
    for o in outs:
        assert o.shape == (2, K, H, W)
    sum(o.square().mean() for o in outs).backward()
    stem = net.encoder.conv_stem.weight
    assert stem.shape[1] == channels and stem.grad is not None and stem.grad.abs().sum() > 0
    if deep_supervision:
        assert all(h.weight.grad is not None for h in net.ds_heads)

    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, channels, H, W)).shape == (1, K, H, W)


@pytest.mark.parametrize(("arch", "smp_cls"), [("unet", smp.Unet), ("unetplusplus", smp.UnetPlusPlus)])
def test_decoder_forward_matches_smp(small_cfg, arch, smp_cls):
    """Our block-by-block decoder forward reproduces smp's own forward exactly (same weights, 64x64 input)."""
    cfg = small_cfg(arch=arch)
    net = build_model(cfg, 3, K).eval()
    ref = smp_cls(
        encoder_name=cfg.encoder,
        encoder_weights=None,
        decoder_channels=cfg.decoder_channels,
        in_channels=3,
        classes=K,
    ).eval()
    missing, unexpected = ref.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.startswith("ds_heads.") for k in unexpected)
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(net.input_mean).view(1, -1, 1, 1)
    std = torch.tensor(net.input_std).view(1, -1, 1, 1)
    with torch.no_grad():  # our net normalises [0, 1] input itself (encode); smp expects it done outside
        torch.testing.assert_close(net(x), ref((x - mean) / std))


def test_padding_is_reflection_and_output_is_cropped(small_cfg):
    net = build_model(small_cfg(), 1, K).eval()
    x = torch.randn(1, 1, H, W)
    padded = reflect_pad_to_multiple(x, net.output_stride)
    assert padded.shape[-2:] == (64, 64)
    torch.testing.assert_close(padded[..., :H, :W], x)
    torch.testing.assert_close(padded[..., H, :W], x[..., H - 2, :])  # mirrored, not zero or repeated
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(padded)[..., :H, :W])


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (33, 2)])
def test_tiny_inputs(small_cfg, size):
    net = build_model(small_cfg(), 2, K).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, *size)).shape == (1, K, *size)


def test_wrapper_exposes_encoder_facts(small_cfg):
    lite = build_model(small_cfg(), 3, K)
    assert lite.output_stride == 32
    assert lite.input_mean == (0.5, 0.5, 0.5) and lite.input_std == (0.5, 0.5, 0.5)
    b0 = build_model(small_cfg(encoder="efficientnet-b0"), 5, K)
    assert b0.input_mean == (0.485, 0.456, 0.406, 0.485, 0.456)
    assert len(b0.input_std) == 5
    stages = lite.encoder_stages()
    assert len(stages) == 5
    assert stages[0][0] is lite.encoder.conv_stem


@pytest.mark.parametrize(
    "encoder", ["efficientnet-b0", "resnet18", "tu-resnet18", "mobilenet_v2", "resnet10t"]
)
def test_other_encoders_build(small_cfg, encoder):
    net = build_model(small_cfg(encoder=encoder), 1, 2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 40, 50)).shape == (1, 2, 40, 50)
    if encoder == "resnet10t":  # a bare timm name becomes smp's timm-universal encoder
        assert net.encoder_name == "tu-resnet10t"


def test_unknown_names_list_valid_ones(small_cfg):
    with pytest.raises(ConfigError, match=r"unet, unetplusplus"):
        build_model(small_cfg(arch="segformer"), 3, 2)
    with pytest.raises(ConfigError) as err:
        build_model(small_cfg(encoder="efficientnet-b99"), 3, 2)
    msg = str(err.value)
    for expected in (
        "timm-tf_efficientnet_lite0",
        "efficientnet-b7",
        "get_encoder_names",
        "timm.list_models",
    ):
        assert expected in msg


def test_inconsistent_options_fail(small_cfg):
    with pytest.raises(ConfigError, match="deep_supervision"):
        build_model(small_cfg(arch="unetplusplus", inference_head="pruned"), 3, 2)
    with pytest.raises(ConfigError, match="pruned_depth"):
        build_model(small_cfg(arch="unetplusplus", deep_supervision=True, pruned_depth=5), 3, 2)
    with pytest.raises(ConfigError, match="decoder_channels"):
        build_model(small_cfg(decoder_channels=(8, 8)), 3, 2)


def test_group_count_divides_channels():
    from medseg.models.norms import group_count

    assert group_count(32, 8) == 8
    assert group_count(24, 32) == 8  # not 24 groups of one channel (instance norm)
    assert group_count(40, 16) == 8
