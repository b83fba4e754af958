"""Freezing strategies, gradual unfreezing, optimizer parameter groups, zero-gamma init, feature cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medseg.errors import ConfigError
from medseg.models import EncoderFeatureCache, build_model, param_groups, unfreeze_for_epoch
from medseg.models.transfer import zero_init_residual

K = 2


def _stage_params(net, stages) -> set[str]:
    ids = {id(p) for i in stages for m in net.encoder_stages()[i] for p in m.parameters(recurse=False)}
    return {n for n, p in net.named_parameters() if id(p) in ids}


def _trainable(net) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


def _train_step(net, steps: int = 2) -> None:
    opt = torch.optim.SGD(param_groups(net, lr=0.1, weight_decay=0.0), lr=0.1)
    net.train()
    for _ in range(steps):
        x = torch.randn(2, 3, 45, 61) * 3 + 1  # far from the running stats, so any update shows
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_stages_partition_the_encoder(small_cfg):
    net = build_model(small_cfg(), 3, K)
    stages = net.encoder_stages()
    names = [n for i in range(len(stages)) for n in sorted(_stage_params(net, [i]))]
    assert len(names) == len(set(names))  # each parameter in one stage only
    assert set(names) == {n for n, _ in net.named_parameters() if n.startswith("encoder.")}
    assert stages[0][0] is net.encoder.conv_stem
    assert net.encoder.blocks[6][0].conv_pwl in stages[-1]


def test_freeze_encoder_keeps_weights_and_bn_stats(small_cfg):
    net = build_model(small_cfg(transfer="freeze_encoder", pretrained="imagenet-offline"), 3, K)
    assert _trainable(net) == {n for n, _ in net.named_parameters() if not n.startswith("encoder.")}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _train_step(net)
    enc_bn = [m for m in net.encoder.modules() if isinstance(m, _BatchNorm)]
    dec_bn = [m for m in net.decoder.modules() if isinstance(m, _BatchNorm)]
    assert enc_bn and not any(m.training for m in enc_bn)  # model.train() did not wake them up
    assert all(m.training for m in dec_bn)
    after = net.state_dict()
    for k, v in after.items():
        if k.startswith("encoder."):
            torch.testing.assert_close(v, before[k], msg=k)  # weights and running stats untouched
    assert not torch.equal(
        after["decoder.blocks.0.conv1.1.running_mean"], before["decoder.blocks.0.conv1.1.running_mean"]
    )
    assert not torch.equal(after["segmentation_head.0.weight"], before["segmentation_head.0.weight"])


def test_partial_freezes_first_stages(small_cfg):
    net = build_model(small_cfg(transfer="partial", freeze_stages=2), 3, K)
    frozen = _stage_params(net, [0, 1])
    assert frozen and _trainable(net) == {n for n, _ in net.named_parameters()} - frozen
    net.train()
    stage_bn = [[m for m in s if isinstance(m, _BatchNorm)] for s in net.encoder_stages()]
    assert all(not m.training for s in stage_bn[:2] for m in s)
    assert all(m.training for s in stage_bn[2:] for m in s)
    before = net.encoder.bn1.running_mean.clone()
    deep_before = net.encoder.blocks[6][0].bn3.running_mean.clone()
    _train_step(net)
    torch.testing.assert_close(net.encoder.bn1.running_mean, before)
    assert not torch.equal(net.encoder.blocks[6][0].bn3.running_mean, deep_before)
    with pytest.raises(ConfigError, match="stages"):
        build_model(small_cfg(transfer="partial", freeze_stages=9), 3, K)


def test_gradual_unfreeze_deepest_first(small_cfg):
    net = build_model(small_cfg(transfer="gradual_unfreeze", unfreeze_at_epochs=(1, 3)), 3, K)
    encoder_params = {n for n, _ in net.named_parameters() if n.startswith("encoder.")}
    assert not (_trainable(net) & encoder_params)
    assert unfreeze_for_epoch(net, 1, (1, 3)) == 1
    assert _trainable(net) & encoder_params == _stage_params(net, [4])
    assert unfreeze_for_epoch(net, 5, (1, 3)) == 2
    assert _trainable(net) & encoder_params == _stage_params(net, [3, 4])
    assert unfreeze_for_epoch(net, 0, (1, 3)) == 0  # depends on the epoch only (resume-safe)
    assert not (_trainable(net) & encoder_params)
    with pytest.raises(ConfigError, match="unfreeze_at_epochs"):
        build_model(small_cfg(transfer="gradual_unfreeze"), 3, K)


@pytest.mark.parametrize("no_decay", [True, False])
def test_param_groups(small_cfg, no_decay):
    net = build_model(small_cfg(norm="group"), 3, K)
    groups = param_groups(
        net, lr=1e-3, weight_decay=0.05, encoder_lr_mult=0.1, no_decay_on_bias_norm=no_decay
    )
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # all, once
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == pytest.approx(1e-4) and by_name["decoder"]["lr"] == pytest.approx(1e-3)
    if not no_decay:
        assert set(by_name) == {"encoder", "decoder"} and all(g["weight_decay"] == 0.05 for g in groups)
        return
    zero_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    norm_and_bias = {
        id(net.encoder.bn1.weight),
        id(net.encoder.bn1.bias),
        id(net.segmentation_head[0].bias),
        id(net.decoder.blocks[0].conv1[1].weight),
    }
    assert norm_and_bias <= zero_decay
    assert id(net.encoder.conv_stem.weight) not in zero_decay
    assert all(p.ndim <= 1 for g in groups if g["weight_decay"] == 0.0 for p in g["params"])
    assert by_name["encoder_no_decay"]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("encoder", ["timm-tf_efficientnet_lite0", "efficientnet-b0", "resnet18"])
def test_zero_init_residual(small_cfg, encoder):
    net = build_model(small_cfg(encoder=encoder, zero_init_residual=True), 3, K)
    if encoder == "timm-tf_efficientnet_lite0":
        assert torch.all(net.encoder.blocks[1][1].bn3.weight == 0)  # residual (stride 1, same channels)
        assert torch.all(net.encoder.blocks[1][0].bn3.weight != 0)  # stride 2: no shortcut, must stay
    elif encoder == "efficientnet-b0":
        assert torch.all(net.encoder._blocks[2]._bn2.weight == 0)
        assert torch.all(net.encoder._blocks[1]._bn2.weight != 0)
    else:
        assert torch.all(net.encoder.layer2[0].bn2.weight == 0)
        assert torch.all(net.encoder.layer2[0].downsample[1].weight != 0)  # shortcut projection untouched
    assert zero_init_residual(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))) == 0


def test_bn_momentum(small_cfg):
    shipped = build_model(small_cfg(encoder="efficientnet-b0", bn_momentum=None), 3, K)
    assert {round(m.momentum, 6) for m in shipped.encoder.modules() if isinstance(m, _BatchNorm)} == {0.01}
    fixed = build_model(small_cfg(encoder="efficientnet-b0"), 3, K)  # default 0.1 (see NOTES)
    assert {m.momentum for m in fixed.modules() if isinstance(m, _BatchNorm)} == {0.1}


def test_frozen_bn_stays_eval_after_stage_trace_and_cache(small_cfg):
    net = build_model(small_cfg(transfer="freeze_encoder"), 3, K).train()
    net._stage_names = None  # force a fresh trace while training
    net.encoder_stages()
    EncoderFeatureCache(net, lambda _key: torch.randn(3, 32, 32))(["a"], [(0, 0)], (32, 32))
    enc_bn = [m for m in net.encoder.modules() if isinstance(m, _BatchNorm)]
    assert enc_bn and not any(m.training for m in enc_bn)
    assert net.decoder.training
