"""Recipes of one training run on real (tiny) data: snapshot ensembles, SWA with recomputed BatchNorm
statistics, exact resume, and the run record."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from engine_data import StopAfterEpoch
from safetensors.torch import load_file
from timm.layers import DropPath

from medseg.bundle import load_bundle
from medseg.engine.schedules import sgdr_cycle_ends
from medseg.engine.train import build_dataloaders, load_cases, split_cases, train
from medseg.inference import Predictor
from medseg.models import build_model


def _no_drop_path(model: torch.nn.Module) -> None:
    """The timm encoder's stochastic depth makes every train-mode forward random; switched off so that
    two BatchNorm passes over the same batch are comparable exactly."""
    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0


class _NoDropPath(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _no_drop_path(pl_module.model)


class _Capture(L.Callback):
    """Keeps a copy of the model's state at the end of training epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.state = epoch, None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def test_snapshot_ensemble_has_one_member_per_completed_sgdr_cycle(tiny_cfg, tmp_path: Path) -> None:
    # 3 epochs x 2 steps, cycles of 1 epoch then 2 (t_mult 2): ends at steps 2 and 6 -> two members.
    cfg = tiny_cfg("train.epochs=3", "train.schedule=sgdr", "train.snapshots=true",
                   "train.schedule_params={t0_epochs: 1, t_mult: 2}")
    result = train(cfg, tmp_path, progress=False)
    assert sgdr_cycle_ends(6, 2, 2) == [2, 6] and result.global_step == 6
    bundle = load_bundle(result.bundle)
    assert [p.stem for p in bundle.member_files] == ["snapshot_1", "snapshot_2"] == result.members
    first, second = bundle.load_members().values()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # taken at different points
    # The run ends exactly at the second cycle's end, so the last snapshot is the final model.
    final = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(second[k], final[f"model.{k}"]) for k in second)
    assert len(Predictor.from_bundle(bundle, device="cpu").members) == 2
    assert "Snapshot ensemble: 2" in bundle.model_card


def test_swa_member_has_batchnorm_statistics_recomputed_for_the_averaged_weights(tiny_cfg, tmp_path: Path) -> None:
    # One batch per epoch holding all 6 training crops (64x64 = the patch: no randomness in the pixels), so a
    # recompute over the train loader sees exactly what Lightning's BatchNorm pass saw. (A shorter epoch draws
    # its crops at random, and the recompute would see others.)
    # NCHW here: channels-last convolutions are not bitwise reproducible across oneDNN's algorithm choices (the
    # recompute then agrees only to ~5e-5 relative), and this test checks the statistics to 1e-5.
    cfg = tiny_cfg("train.epochs=3", "train.swa=true", "train.swa_start_epoch=0.34", "train.samples_per_epoch=6",
                   "train.batch_size=6", "train.channels_last=false")
    capture = _Capture(epoch=2)  # the last regular epoch; epoch 3 is Lightning's BatchNorm pass
    result = train(cfg, tmp_path, progress=False, extra_callbacks=[capture, _NoDropPath()])
    assert result.members == ["swa"]
    swa = load_file(str(result.bundle / "weights/swa.safetensors"))
    bn_keys = [k for k in swa if k.endswith("running_mean")]
    assert bn_keys
    # Statistics differ from those of the last non-SWA weights ...
    assert any(not torch.allclose(swa[k], capture.state[k]) for k in bn_keys)
    # ... and equal a fresh recompute over the train loader with the averaged weights.
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    model.load_state_dict(swa)
    _no_drop_path(model)
    train_dl, _ = build_dataloaders(cfg, *split_cases(cfg, load_cases(cfg), tmp_path))
    torch.optim.swa_utils.update_bn((b["image"] for b in train_dl), model)
    for k in bn_keys:
        assert torch.allclose(model.state_dict()[k], swa[k], atol=1e-5), k
        var = k.replace("running_mean", "running_var")
        assert torch.allclose(model.state_dict()[var], swa[var], rtol=1e-4, atol=1e-5), var


class _RecordStart(L.Callback):
    """Records the first epoch that trains, and the optimizer's state when training starts."""

    epoch: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch is None:
            self.epoch, self.epoch_start_step = trainer.current_epoch, trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        self.global_step = trainer.global_step
        self.state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in opt.state_dict()["state"].items()}
        self.lr = opt.param_groups[0]["lr"]


def test_resume_continues_at_the_same_epoch_with_the_same_optimizer_state(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("train.epochs=2")
    first = train(cfg, tmp_path, progress=False, extra_callbacks=[StopAfterEpoch(0)])
    assert first.epochs_run == 1 and first.global_step == 2
    saved = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 2

    probe = _RecordStart()
    second = train(cfg, tmp_path, resume=True, progress=False, extra_callbacks=[probe])
    assert (probe.epoch, probe.epoch_start_step, probe.global_step) == (1, 2, 2)  # after epoch 0, not from scratch
    saved_state = saved["optimizer_states"][0]["state"]
    assert saved_state and set(probe.state) == set(saved_state)
    for k, s in saved_state.items():
        assert int(probe.state[k]["step"]) == int(s["step"]) == 2
        assert torch.equal(probe.state[k]["exp_avg"], s["exp_avg"])
    assert probe.lr == saved["optimizer_states"][0]["param_groups"][0]["lr"]  # scheduler position restored
    assert second.epochs_run == 2 and second.global_step == 4
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["0.0", "1.0"] and "nan" not in rows[0]  # epoch 0 kept from run 1
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["resumed"] is True and info["packages"]["torch"] == torch.__version__.split("+")[0]
    assert info["config"]["train"]["epochs"] == 2 and info["git_commit"]


def test_optional_loggers_are_added_or_name_their_missing_package(tiny_cfg, tmp_path: Path) -> None:
    import importlib.util

    import pytest

    from medseg.engine.train import build_loggers
    from medseg.errors import ConfigError

    cfg = tiny_cfg("train.log_tensorboard=true")
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        assert [type(lg).__name__ for lg in build_loggers(cfg, tmp_path)] == ["CSVLogger", "TensorBoardLogger"]
    else:
        with pytest.raises(ConfigError, match="needs the tensorboard package"):
            build_loggers(cfg, tmp_path)
    assert [type(lg).__name__ for lg in build_loggers(tiny_cfg(), tmp_path)] == ["CSVLogger"]


def test_deterministic_runs_with_augmentation_give_identical_weights(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("train.epochs=1", "train.deterministic=true", "augment.preset=default")
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    wa, wb = (load_file(str(r.bundle / "weights/model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "a/run_info.json").read_text())["deterministic"] is True
