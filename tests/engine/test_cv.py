"""k-fold cross-validation: OOF maps cover every case once, metrics CSV, fold-ensemble bundle, temperature."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.bundle import load_bundle
from medseg.engine.calibrate import expected_calibration_error, fit_temperature
from medseg.engine.cv import cross_validate
from medseg.inference import Predictor
from medseg.io import read_probabilities


def test_fit_temperature_recovers_the_overconfidence_factor() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=g) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g)[:, 0]
    overconfident = torch.log_softmax(3 * logits, 1).numpy()  # a model 3x too sure of itself
    cal = fit_temperature(overconfident, labels.numpy())
    assert cal.temperature == pytest.approx(3.0, rel=0.1)
    assert cal.nll_after < cal.nll_before and cal.ece_after < cal.ece_before / 3


def test_ece_is_zero_for_perfectly_calibrated_bins_and_large_when_overconfident() -> None:
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, torch.tensor([1, 1, 1, 1])) == pytest.approx(0.75)


def test_cross_validation_writes_oof_for_every_case_once_and_a_fold_ensemble(tiny_cfg, tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg("train.epochs=1")
    result = cross_validate(cfg, tmp_path, folds=2, progress=False, device="cpu")
    case_ids = sorted(p.stem for p in (tiny_data / "images").iterdir())
    split = json.loads((tmp_path / "splits.json").read_text())["folds"]
    assert len(split) == 2 and sorted(i for f in split for i in f) == case_ids

    # OOF probability maps: one per case, each a distribution over the classes on the image grid.
    oof = sorted((tmp_path / "oof").iterdir())
    assert [p.name.removesuffix(".npz") for p in oof] == case_ids and len(result.oof_files) == len(case_ids)
    probs, geometry = read_probabilities(oof[0])
    assert probs.shape == (2, 64, 64) and np.allclose(probs.sum(0), 1.0, atol=1e-4)

    # Per-case metrics: every case exactly once per foreground label, from the fold that held it out.
    with (tmp_path / "oof_metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == case_ids
    fold_of = {i: k for k, f in enumerate(split) for i in f}
    assert all(int(r["fold"]) == fold_of[r["case"]] for r in rows)
    assert all(0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["surface_dice"]) <= 1.0 for r in rows)
    dice = [float(r["dice"]) for r in rows]
    assert result.summary["nucleus"]["dice_mean"] == pytest.approx(np.mean(dice))
    assert result.summary["nucleus"]["dice_sd"] == pytest.approx(np.std(dice))

    # One bundle, the two fold models as members, with the OOF-fitted temperature.
    bundle = load_bundle(result.bundle)
    assert [p.stem for p in bundle.member_files] == ["fold_0", "fold_1"]
    assert bundle.calibration["temperature"] == pytest.approx(result.calibration.temperature)
    assert result.calibration.nll_after <= result.calibration.nll_before + 1e-6
    assert {"ece_before", "ece_after"} <= set(bundle.calibration)
    predictor = Predictor.from_bundle(bundle, device="cpu")
    assert len(predictor.members) == 2 and predictor.temperature == pytest.approx(result.calibration.temperature)
    assert "Cross-validation (2 folds" in bundle.model_card

    # A restarted run keeps finished folds instead of training them again.
    weights = tmp_path / "fold_0/bundle/weights/model.safetensors"
    before = weights.stat().st_mtime_ns
    cross_validate(cfg, tmp_path, folds=2, resume=True, progress=False, device="cpu")
    assert weights.stat().st_mtime_ns == before
