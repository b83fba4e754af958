"""UNet++ deep supervision, inference heads (full / mean / pruned) and decoder upsampling modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.models import MODELS, build_model
from medseg.models.network import reflect_pad_to_multiple

H, W, K = 45, 61, 2


def _ds_net(small_cfg, **kw):
    return build_model(small_cfg(arch="unetplusplus", deep_supervision=True, **kw), 3, K)


def _conv_calls(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all conv calls, encoder conv calls) of one forward: a FLOP proxy that does not depend on timing."""
    calls = {"all": 0, "enc": 0}
    enc = set(net.encoder.modules())
    handles = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):

            def hook(mod, _i, _o):
                calls["all"] += 1
                calls["enc"] += mod in enc

            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return calls["all"], calls["enc"]


def test_inference_heads_are_what_they_claim(small_cfg):
    net = _ds_net(small_cfg, pruned_depth=2).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        feats = net.encode(reflect_pad_to_multiple(x, 32))
        heads = [h[..., :H, :W] for h in net.heads(feats)]
        assert len(heads) == 5
        full = net(x)
        net.inference_head = "mean"
        mean = net(x)
        net.inference_head = "pruned"
        pruned = net(x)
    torch.testing.assert_close(full, heads[0])
    torch.testing.assert_close(mean, torch.stack(heads).mean(0))
    torch.testing.assert_close(pruned, heads[2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pruned, full)
    assert pruned.shape == full.shape == (2, K, H, W)


def test_training_mode_returns_all_heads_eval_one(small_cfg):
    net = _ds_net(small_cfg).train()
    out = net(torch.randn(2, 3, H, W))
    assert isinstance(out, list) and len(out) == 5 and all(o.shape == (2, K, H, W) for o in out)
    assert all(not torch.allclose(out[0], o) for o in out[1:])
    net.eval()
    with torch.no_grad():
        assert isinstance(net(torch.randn(2, 3, H, W)), torch.Tensor)


def test_pruned_head_computes_less(small_cfg):
    """Pruning at X(0,j) skips the deeper nested nodes and the unused encoder stages."""
    x = torch.randn(1, 3, 64, 64)
    net = _ds_net(small_cfg, inference_head="full").eval()
    full_all, full_enc = _conv_calls(net, x)
    counts = []
    for depth in (1, 2, 3, 4):
        net.inference_head, net.pruned_depth = "pruned", depth
        counts.append(_conv_calls(net, x))
    alls, encs = zip(*counts, strict=True)
    assert list(alls) == sorted(alls) and len(set(alls)) == 4  # deeper node -> strictly more work
    assert alls[-1] < full_all  # even X(0,4) skips smp's final full-resolution block
    assert encs[0] < encs[2] < full_enc  # shallow heads do not run the deep encoder stages


@pytest.mark.parametrize("arch", MODELS.names())
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "transpose"])
def test_upsampling_modes_build_and_train(small_cfg, arch, mode):
    net = build_model(small_cfg(arch=arch, upsampling=mode), 3, K).train()
    out = net(torch.randn(2, 3, H, W))
    assert out.shape == (2, K, H, W)
    transposed = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert bool(transposed) == (mode == "transpose")
    out.mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in transposed)


@pytest.mark.parametrize("arch", MODELS.names())
def test_transpose_starts_as_nearest_bilinear_differs(small_cfg, arch):
    nets = {
        m: build_model(small_cfg(arch=arch, upsampling=m), 3, K).eval()
        for m in ("nearest", "bilinear", "transpose")
    }
    state = nets["nearest"].state_dict()
    nets["bilinear"].load_state_dict(state)  # interpolation modes have no parameters: same state dict
    missing, unexpected = nets["transpose"].load_state_dict(state, strict=False)
    assert missing and all(k.startswith("upsample.") for k in missing) and not unexpected
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        ref = nets["nearest"](x)
        torch.testing.assert_close(nets["transpose"](x), ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(nets["bilinear"](x), ref)


def test_deep_supervision_weights_length(small_cfg):
    from medseg.errors import ConfigError

    _ds_net(small_cfg, deep_supervision_weights=(1.0, 0.5, 0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="5 entries"):
        _ds_net(small_cfg, deep_supervision_weights=(1.0, 0.5))


def test_transformer_encoder_has_no_nested_top_row(small_cfg):
    """convnext has no stride-2 feature: UNet++ still builds, but deep supervision is refused clearly."""
    from medseg.errors import ConfigError

    net = build_model(small_cfg(arch="unetplusplus", encoder="tu-convnext_atto"), 3, K).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, H, W)).shape == (1, K, H, W)
    with pytest.raises(ConfigError, match="stride-2"):
        _ds_net(small_cfg, encoder="tu-convnext_atto")
