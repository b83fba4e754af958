"""Training options of issue 14 that were accepted but did nothing (or crashed), each proved to change the run
through the user's path (``medseg train`` / ``train(cfg, out)``): UNet++ deep supervision and its head weights,
mixup/cutmix with their alphas, cached encoder features, validation loss = training loss, and the learning rate
of every parameter group in metrics.csv and progress.png."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medseg.cli import app
from medseg.engine.module import SegModule
from medseg.engine.train import train
from medseg.errors import ConfigError

DS = ("model.arch=unetplusplus", "model.deep_supervision=true")


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.bundle / "weights/model.safetensors"))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------- deep supervision


def test_issue_reproduction_unetplusplus_deep_supervision_trains_and_predicts(tiny_cfg, tiny_data: Path, tmp_path: Path) -> None:
    from medseg.config import config_to_yaml

    runner = CliRunner()
    (tmp_path / "tiny.yaml").write_text(config_to_yaml(tiny_cfg()))  # the tiny demo config, as a user's YAML
    sets = [a for o in [*DS, "loss.weight_map=true"] for a in ("--set", o)]  # weight maps reach every head
    res = runner.invoke(app, ["train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"), "--epochs", "1", *sets])
    assert res.exit_code == 0, res.output  # before: AttributeError: 'list' object has no attribute 'ndim'
    res = runner.invoke(app, ["predict", str(tmp_path / "run/bundle"), str(tiny_data / "images"), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == len(list((tiny_data / "images").iterdir()))


def test_every_deep_supervision_head_is_trained_and_validation_uses_the_inference_head(tiny_cfg, tmp_path: Path) -> None:
    results = {head: train(tiny_cfg(*DS, "train.epochs=1", f"model.inference_head={head}", "model.pruned_depth=2"),
                           tmp_path / head, progress=False) for head in ("full", "mean", "pruned")}
    heads = _weights(results["full"])
    for j in range(4):  # the 1x1 heads on X(0,1..4) start with zero bias: training through every head moves them
        assert heads[f"ds_heads.{j}.bias"].abs().max() > 0, j
    dice = {h: float(_rows(tmp_path / h)[0]["val_dice"]) for h in results}
    # Same seed, same training: only the head that validation predicts with differs.
    assert all(torch.equal(_weights(r)["ds_heads.0.bias"], heads["ds_heads.0.bias"]) for r in results.values())
    assert len(set(dice.values())) == 3, dice


def test_deep_supervision_weights_reach_the_heads(tiny_cfg, tmp_path: Path) -> None:
    only_main = train(tiny_cfg(*DS, "train.epochs=1", "model.deep_supervision_weights=[1, 0, 0, 0, 0]"),
                      tmp_path / "main", progress=False)
    w = _weights(only_main)
    for j in range(4):  # weight 0: no gradient, and biases get no weight decay, so they stay at their zero init
        assert torch.equal(w[f"ds_heads.{j}.bias"], torch.zeros_like(w[f"ds_heads.{j}.bias"])), j
    with pytest.raises(ConfigError, match="set model.deep_supervision: true"):
        train(tiny_cfg("model.arch=unetplusplus", "model.deep_supervision_weights=[1, 1, 1, 1, 1]"), tmp_path / "x",
              progress=False)


# ------------------------------------------------------------------------------------------ mixup/cutmix


def _batch(cfg, n: int = 4, weight: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = cfg.data.patch_size
    batch = {"image": torch.rand(n, cfg.data.input_channels, h, w, generator=g),
             "label": (torch.rand(n, h, w, generator=g) > 0.7).long()}
    if weight:
        batch["weight"] = 1 + 5 * torch.rand(n, h, w, generator=g)
    return batch


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_training_step_mixes_the_batch_and_the_loss_with_weight_maps(tiny_cfg, kind: str) -> None:
    from medseg.transforms import mix_batch, mixed_loss

    cfg = tiny_cfg(f"augment.{kind}=1.0", f"augment.{kind}_alpha=0.7")
    module = SegModule(cfg)
    module.log = lambda *a, **k: None  # no Trainer here
    seen = []
    module.model.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach().clone()))
    batch = _batch(cfg)
    expected_mix = mix_batch(batch["image"], batch["label"], batch["weight"], **{kind: 1.0, f"{kind}_alpha": 0.7},
                             generator=torch.Generator().manual_seed(cfg.train.seed))
    module.model.eval()  # same BatchNorm statistics for the module's pass and the reference pass
    loss = module.training_step(batch, 0)
    assert torch.equal(seen[0], expected_mix.image) and not torch.equal(seen[0], batch["image"])
    with torch.no_grad():
        expected = mixed_loss(module.loss_fn, module.model(expected_mix.image), expected_mix)
    torch.testing.assert_close(loss.detach(), expected)
    if kind == "mixup":  # the partners' weight maps count too
        assert expected_mix.weight_b is not None and 0 < expected_mix.lam < 1


def test_mixup_and_cutmix_change_the_trained_model(tiny_cfg, tmp_path: Path) -> None:
    plain = _weights(train(tiny_cfg("train.epochs=1"), tmp_path / "plain", progress=False))
    for kind in ("mixup", "cutmix"):
        mixed = _weights(train(tiny_cfg("train.epochs=1", f"augment.{kind}=1.0"), tmp_path / kind, progress=False))
        assert any(not torch.equal(plain[k], mixed[k]) for k in plain), kind
    with pytest.raises(ConfigError, match="at most 1"):
        SegModule(tiny_cfg("augment.mixup=0.7", "augment.cutmix=0.6"))


# ------------------------------------------------------------------------------------ cached encoder features

CACHED = ("model.transfer=freeze_encoder", "augment.preset=none", "train.epochs=2")


class _EncodedImages(L.Callback):
    """Counts the images the encoder encodes while training (not validating)."""

    def __init__(self) -> None:
        self.images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def count(_module, args, _out):
            self.images += args[0].shape[0] if pl_module.training else 0

        pl_module.model.encoder.register_forward_hook(count)


def test_cached_encoder_features_run_the_encoder_once_per_case(tiny_cfg, tmp_path: Path) -> None:
    encoded = {}
    for cached in (False, True):
        probe = _EncodedImages()
        result = train(tiny_cfg(*CACHED, f"model.cache_encoder_features={str(cached).lower()}"), tmp_path / str(cached),
                       progress=False, extra_callbacks=[probe])
        assert result.global_step == 4  # 2 epochs of 8 patches in batches of 4, either way
        encoded[cached] = probe.images
    n_train = 6  # 8 tiny cases, folds=4: 6 train, 2 val
    assert encoded[False] == 16  # every patch of every step
    assert 1 <= encoded[True] <= n_train  # each case at most once (the ones the 16 draws hit)


def test_cached_features_train_the_decoder_only_and_resume_the_crop_stream(tiny_cfg, tmp_path: Path) -> None:
    from medseg.engine.checkpointing import ResumableRandomState

    class Initial(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    probe = Initial()
    trained = _weights(train(tiny_cfg(*CACHED, "model.cache_encoder_features=true"), tmp_path, progress=False,
                             extra_callbacks=[probe]))
    initial = probe.state
    assert all(torch.equal(trained[k], initial[k]) for k in initial if k.startswith("encoder."))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if k.startswith("decoder."))
    # The crop sampler is what ResumableRandomState saves in place of the augmentation's generators.
    from medseg.engine.cached_features import CropSampler

    sampler = CropSampler(3)
    state = ResumableRandomState(sampler).state_dict()["augment"]
    first = sampler.rng.integers(0, 1000, 5)
    sampler.reseed(99)
    sampler.load_state_dict(state)
    assert np.array_equal(sampler.rng.integers(0, 1000, 5), first)


@pytest.mark.parametrize(("override", "message"), [
    ("model.transfer=full", "frozen encoder"),
    ("augment.preset=light", "no random spatial or intensity augmentation"),
    ("augment.mixup=0.5", "no mixup/cutmix"),
    ("data.patch_size=[48, 48]", "multiple of the encoder stride 32"),
])
def test_cached_features_refuse_what_would_make_them_wrong(tiny_cfg, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg(*CACHED, "model.cache_encoder_features=true", override), tmp_path, progress=False)


# --------------------------------------------------------------------------------- numbers that mean it


def test_validation_loss_is_the_training_loss_with_the_weight_map(tiny_cfg) -> None:
    from medseg.inference.tiling import predict_logits_case

    cfg = tiny_cfg("loss.weight_map=true")
    module = SegModule(cfg).eval()
    batch = _batch(cfg, n=1)
    case = {"image": batch["image"][0], "label": batch["label"][0], "weight": batch["weight"][0]}
    with torch.no_grad():
        module.validation_step(case, 0)
        module.validation_step({k: v for k, v in case.items() if k != "weight"}, 1)
        logits = predict_logits_case(module.model, case["image"], 0, cfg.inference)[None]
        weighted = float(module.loss_fn(logits, case["label"][None], case["weight"][None]))
        unweighted = float(module.loss_fn(logits, case["label"][None]))
    rows = module._val_rows
    assert rows[0]["val_loss"] == pytest.approx(weighted) and rows[1]["val_loss"] == pytest.approx(unweighted)
    assert weighted != pytest.approx(unweighted)  # the weight map is used when the case carries one


def test_learning_rates_of_every_parameter_group_are_recorded_and_plotted(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    figures = []
    real_subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figures.append(real_subplots(*a, **k)) or figures[-1])
    train(tiny_cfg("train.epochs=1", "model.encoder_lr_mult=0.1"), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert {"lr_encoder", "lr_decoder"} <= rows[0].keys() and "lr" not in rows[0]
    for r in rows:
        assert float(r["lr_encoder"]) == pytest.approx(0.1 * float(r["lr_decoder"]))
    lr_axis = figures[-1][1][2]
    assert sorted(line.get_label() for line in lr_axis.get_lines()) == ["decoder", "encoder"]
