"""Each learning-curve finding: on the rows of a real run (a saved fixture), on the rows the issue reported, and
on synthetic curves that show exactly one problem.

The fixture ``fixtures/demo_nuclei_6_epochs_metrics.csv`` is the metrics.csv of a real run:
``medseg train configs/experiments/demo_nuclei.yaml --epochs 6 --limit-cases 16 --set data.patch_size=[128,128]
--set train.samples_per_epoch=64 --set model.encoder_lr_mult=0.3`` (val_loss is the training loss on whole
validation images; one learning-rate column per parameter group).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from medseg.engine.diagnose import diagnose_curves

N = 12


def _rows(train, val, dice, lr=None) -> list[dict[str, float]]:
    lr = lr if lr is not None else [1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * e / N))) for e in range(N)]
    return [{"epoch": float(e), "train_loss": t, "val_loss": v, "val_dice": d, "lr": r}
            for e, (t, v, d, r) in enumerate(zip(train, val, dice, lr, strict=True))]


def _decay(start: float, end: float, rate: float = 0.5) -> list[float]:
    return [end + (start - end) * math.exp(-rate * e) for e in range(N)]


HEALTHY = _rows(_decay(1.0, 0.2), _decay(1.0, 0.25), [0.85 - 0.35 * math.exp(-0.8 * e) for e in range(N)])


def codes(rows) -> set[str]:
    return {f.code for f in diagnose_curves(rows)}


def _real_run() -> list[dict[str, float]]:
    with open(Path(__file__).parent / "fixtures/demo_nuclei_6_epochs_metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


REAL = _real_run()
# The healthy 4-epoch run of issue 14, printed as `[lr_too_high] training loss is noisy or diverging`: the issue
# gives the training losses and the first and last val Dice; the numbers it does not give are NaN here.
ISSUE = [{"epoch": float(e), "train_loss": t, "val_loss": math.nan, "val_dice": d}
         for e, (t, d) in enumerate(zip([0.65, 0.24, 0.17, 0.15], [0.938, math.nan, math.nan, 0.968], strict=True))]


def test_a_real_healthy_run_is_ok() -> None:
    assert {"lr_decoder", "lr_encoder"} <= REAL[0].keys()  # the rates of both parameter groups were recorded
    assert codes(REAL) == {"ok"}


def test_a_fast_steady_fall_is_not_noise() -> None:
    assert "lr_too_high" not in codes(ISSUE)  # before the fix: the spread of the steps counted as noise
    assert "lr_too_high" not in codes(REAL)


@pytest.mark.parametrize("broken", ["jump", "nan"])
def test_a_real_run_that_jumps_or_diverges_has_lr_too_high(broken: str) -> None:
    rows = [dict(r) for r in REAL]
    if broken == "jump":
        rows[3]["train_loss"] = 1.6 * rows[2]["train_loss"]  # up by 60% of its level, then back down
    else:
        for r in rows[3:]:
            r["train_loss"] = math.nan
    assert "lr_too_high" in codes(rows)


def test_healthy_curves_are_ok() -> None:
    assert codes(HEALTHY) == {"ok"}


def test_overfitting() -> None:
    val = [1.0, 0.7, 0.5, 0.42, 0.4, 0.43, 0.47, 0.52, 0.57, 0.61, 0.66, 0.7]
    dice = [0.5, 0.65, 0.75, 0.79, 0.8, 0.79, 0.78, 0.77, 0.76, 0.75, 0.74, 0.73]
    findings = diagnose_curves(_rows(_decay(1.0, 0.05), val, dice))
    assert {f.code for f in findings} == {"overfitting"}
    assert "epoch 5" in findings[0].message and "augmentation" in findings[0].message


def test_underfitting() -> None:
    dice = [0.2 + 0.01 * e for e in range(N - 4)] + [0.28] * 4
    found = codes(_rows(_decay(1.0, 0.8), _decay(1.05, 0.82), dice))
    assert found == {"underfitting"}


@pytest.mark.parametrize("train", [
    [1.0, 0.9, 3.5, 0.8, 4.0, 0.7, 5.0, 0.9, 6.0, 1.0, 7.0, 2.0],  # jumping
    [1.0, 0.9, 0.8, 1.5, 3.0, float("nan")] + [float("nan")] * 6,  # diverged to NaN
])
def test_lr_too_high(train: list[float]) -> None:
    assert "lr_too_high" in codes(_rows(train, train, [0.3] * N))


def test_decay_too_early() -> None:
    lr = [1e-3, 5e-4, 1e-4, 2e-5] + [1e-5] * 8
    dice = [0.5, 0.65, 0.72, 0.75] + [0.75] * 8
    found = diagnose_curves(_rows(_decay(1.0, 0.3), _decay(1.0, 0.35), dice, lr))
    assert {f.code for f in found} == {"decay_too_early"}
    assert "epoch 4" in found[0].message


def test_not_converged() -> None:
    dice = list(np.linspace(0.5, 0.86, N))
    found = codes(_rows(_decay(1.0, 0.2, 0.2), _decay(1.0, 0.25, 0.2), dice))
    assert found == {"not_converged"}


def test_too_short() -> None:
    assert codes(HEALTHY[:2]) == {"too_short"}
