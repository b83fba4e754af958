"""A budget shapes the schedule: the run fits the (fake) clock's budget and its LR ends on the schedule's floor,
also when steps turn slower halfway."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest

from medseg.engine.budget import ScheduleClock, initial_epoch_steps
from medseg.engine.train import train


def test_schedule_clock_stretches_the_rest_and_ends_on_the_nominal_last_step() -> None:
    clock = ScheduleClock(100)
    assert clock.virtual(40) == 40
    clock.replan(40, 70)  # 30 real steps left for 60 nominal ones
    assert clock.virtual(40) == pytest.approx(40) and clock.virtual(70) == pytest.approx(100)
    assert clock.virtual(55) == pytest.approx(70)
    clock.replan(55, 200)  # slower: more real steps for the remaining 30 nominal ones
    assert clock.virtual(55) == pytest.approx(70) and clock.virtual(200) == pytest.approx(100)
    assert clock.real(100) == 200 and clock.real(70) == 55
    state = clock.state_dict()
    again = ScheduleClock(1)
    again.load_state_dict(state)
    assert again.virtual(123) == clock.virtual(123)


def test_initial_epochs_start_with_a_short_calibration_epoch() -> None:
    steps = initial_epoch_steps(10, 40, budget_seconds=600, estimated_step_seconds=1.0)
    assert len(steps) == 10 and sum(steps) == 400 and steps[0] == 3
    assert max(steps[1:]) - min(steps[1:]) <= 1


class FakeClock(L.Callback):
    """Time advances only by what the run does: ``step_seconds(global_step)`` per training batch and
    ``val_seconds`` per validation case."""

    def __init__(self, step_seconds: Callable[[int], float], val_seconds: float) -> None:
        self.now = 1000.0
        self.step_seconds = step_seconds
        self.val_seconds = val_seconds
        self.lrs: list[float] = []

    def __call__(self) -> float:
        return self.now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.now += self.step_seconds(trainer.global_step)
        self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.now += self.val_seconds


def _budget_run(tiny_cfg, tmp_path: Path, step_seconds: Callable[[int], float]) -> tuple[FakeClock, dict]:
    cfg = tiny_cfg("train.budget_minutes=1.0", "train.epochs=5", "train.schedule=cosine", "train.min_lr_ratio=0.01")
    fake = FakeClock(step_seconds, val_seconds=0.2)
    train(cfg, tmp_path / "run", progress=False, extra_callbacks=[fake], clock=fake)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    return fake, info


def test_a_budgeted_run_fits_the_budget_and_ends_annealed(tiny_cfg, tmp_path: Path) -> None:
    fake, info = _budget_run(tiny_cfg, tmp_path, lambda step: 1.0)
    lr, floor = fake.lrs[-1], 0.003 * 0.01
    assert lr == pytest.approx(floor, rel=1e-6)  # the last step sits on the schedule's floor
    assert fake.now - 1000.0 <= 60.0  # the whole fake minute: steps + validation
    assert info["budget"]["replans"], "the measured step time re-planned the epochs"
    assert 30 <= info["result"]["global_step"] <= 60  # about (60 s - validation - margin) / 1 s per step


def test_steps_turning_slower_shrink_the_rest_and_still_anneal(tiny_cfg, tmp_path: Path) -> None:
    fake, info = _budget_run(tiny_cfg, tmp_path, lambda step: 0.5 if step < 20 else 2.0)
    assert fake.lrs[-1] == pytest.approx(0.003 * 0.01, rel=1e-6)
    assert fake.now - 1000.0 <= 60.0
    lengths = [r["steps_per_epoch"] for r in info["budget"]["replans"]]
    assert lengths[-1] < max(lengths)  # later epochs got shorter once steps cost 4x more


@pytest.mark.slow  # 6 short epochs and two passes: ~1 min alone, several on a loaded machine
def test_a_budget_reserves_the_pseudo_label_passes_still_to_come(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Semi-supervised rounds: each pass over the unlabeled images costs (fake) time outside the training steps; the
    guard reserves the passes still to come, so the run still ends inside its budget."""
    from engine_data import REPO, TINY_OVERRIDES, make_tiny_dataset

    from medseg.config import load_config
    from medseg.engine.pseudo_labels import PseudoLabelRounds

    data = make_tiny_dataset(tmp_path / "data", n=11)
    for p in sorted((data / "masks").iterdir())[-3:]:
        p.unlink()
    cfg = load_config(REPO / "configs/experiments/demo_nuclei.yaml", [
        f"data.root={data}", *TINY_OVERRIDES, "train.budget_minutes=1.0", "train.epochs=6",
        "train.unlabeled.enabled=true", "train.unlabeled.rounds=2"])
    fake = FakeClock(lambda step: 1.0, val_seconds=0.2)
    real_pass = PseudoLabelRounds._predict_all

    def slow_pass(self, pl_module, use_teacher):
        labels = real_pass(self, pl_module, use_teacher)
        fake.now += 5.0 * len(labels)  # 15 s per pass: a quarter of the budget each
        return labels

    monkeypatch.setattr(PseudoLabelRounds, "_predict_all", slow_pass)
    # Lightning's max_time backstop runs on the real clock: a loaded CI machine must not cut the fake minute short.
    train(cfg, tmp_path / "run", progress=False, extra_callbacks=[fake], clock=fake, max_time=timedelta(hours=1))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert [r["seconds"] for r in info["pseudo_labels"]] == [15.0, 15.0]
    assert fake.now - 1000.0 <= 60.0  # steps + validation + both passes
