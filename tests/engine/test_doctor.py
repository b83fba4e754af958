"""`medseg doctor` gives each deliberately broken setup its own diagnosis, and a sound one none of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.engine.doctor import run_doctor
from medseg.models import build_model

BROKEN = {"label_map_mismatch", "lr_too_high", "frozen"}


def _errors(report) -> set[str]:
    return {c.code for c in report.checks if c.severity == "error"}


def test_wrong_label_map_is_named_with_the_values_and_a_fix(tiny_cfg, tmp_path: Path) -> None:
    report = run_doctor(tiny_cfg("data.label_map={0: 0, 1: 1}"), tmp_path)  # masks hold 0/255
    assert _errors(report) == {"label_map_mismatch"}
    msg = next(c.message for c in report.checks if c.code == "label_map_mismatch")
    assert "[255]" in msg and "8 of 8 masks" in msg and "{0: 0, 255: 1}" in msg
    assert "initial_loss_ok" not in report.codes  # training checks are skipped after a data error


def test_learning_rate_10_diverges(tiny_cfg, tmp_path: Path) -> None:
    report = run_doctor(tiny_cfg("train.lr=10"), tmp_path, overfit_batches=1, overfit_steps=5, lr_find=False)
    assert _errors(report) == {"lr_too_high"}
    assert "train.lr=10" in next(c.message for c in report.checks if c.code == "lr_too_high")


def test_frozen_model_and_zero_learning_rate(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes)
    model.requires_grad_(False)
    report = run_doctor(cfg, tmp_path, model=model, overfit_batches=1, lr_find=False)
    assert _errors(report) == {"frozen"}
    assert "no parameter is trainable" in next(c.message for c in report.checks if c.code == "frozen")
    report = run_doctor(tiny_cfg("train.lr=0"), tmp_path, overfit_batches=1, overfit_steps=2, lr_find=False)
    assert _errors(report) == {"frozen"}
    assert "no weight changed" in next(c.message for c in report.checks if c.code == "frozen")


def test_sound_setup_gets_none_of_those_and_an_lr_range_test(tiny_cfg, tmp_path: Path) -> None:
    report = run_doctor(tiny_cfg(), tmp_path, overfit_batches=1, overfit_steps=4, lr_find_steps=16)
    assert not (_errors(report) | BROKEN) & report.codes, report.checks
    assert {"data_found", "class_balance", "initial_loss_ok"} <= report.codes
    assert report.suggested_lr is not None and 1e-7 <= report.suggested_lr < 10
    assert report.lr_plot == tmp_path / "lr_find.png" and report.lr_plot.stat().st_size > 1000


def test_doctor_command_prints_the_diagnosis_and_exits_1_on_errors(tiny_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    repo = Path(__file__).resolve().parents[2]
    res = CliRunner().invoke(app, ["doctor", str(repo / "configs/experiments/demo_nuclei.yaml"), "--data", str(tiny_data),
                                   "--out", str(tmp_path), "--set", "data.label_map={0: 0, 1: 1}"])
    assert res.exit_code == 1, res.output
    assert "label_map_mismatch" in res.output and "Traceback" not in res.output


def test_lr_suggestion_is_the_steepest_descent_before_the_loss_blows_up() -> None:
    import numpy as np

    from medseg.engine.doctor import divergence_lr, suggest_lr

    lrs = np.logspace(-6, 0, 13)
    losses = np.array([1.0, 1.0, 0.99, 0.95, 0.85, 0.6, 0.45, 0.4, 0.38, 0.5, 2.0, 9.0, 0.1])  # > 4x min at lrs[10]
    assert divergence_lr(lrs, losses) == pytest.approx(lrs[10])
    assert suggest_lr(lrs, losses) == pytest.approx(lrs[5])  # steepest fall, not the last (cliff) point
    assert divergence_lr(lrs, np.linspace(1, 0.5, 13)) is None
    assert suggest_lr(lrs[:4], losses[:4]) is None  # too short to tell


def test_overfit_check_runs_the_real_training_step_in_a_trainer_also_for_deep_supervision(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    from medseg.engine.module import SegModule

    real = SegModule.training_step
    calls = []

    def spy(self, batch, batch_idx):
        calls.append(self.trainer.overfit_batches)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(SegModule, "training_step", spy)
    cfg = tiny_cfg("model.arch=unetplusplus", "model.deep_supervision=true", "augment.mixup=0.5")
    report = run_doctor(cfg, tmp_path, overfit_batches=1, overfit_steps=3, lr_find=False)
    assert calls == [1, 1, 1]  # one Lightning step per overfit step, on the one fixed batch
    assert "initial_loss_ok" in report.codes and {"overfit_ok", "cannot_overfit"} & report.codes, report.checks
    assert not _errors(report)
