"""Robustness evaluation: corruptions keep shape/dtype/range and move masks with images, FGSM/PGD raise the loss
of a trained model, and `medseg robustness` runs end to end on a tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medseg.bundle import save_bundle
from medseg.cli import app
from medseg.data import discover_cases
from medseg.engine.robustness import (
    CORRUPTIONS,
    corrupt_case,
    corrupt_image,
    corrupt_mask,
    fgsm,
    member_loss,
    pgd,
)
from medseg.io import read_mask, read_scan
from medseg.io.geometry import Geometry, Scan
from medseg.models import build_model


def _scan(array: np.ndarray) -> Scan:
    return Scan(array, Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), tuple(array.shape[:2])), "toy.png")


def _grey(dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(20, 200, size=(48, 40)).astype(dtype)
    image[10:30, 12:28] = 230
    return image


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_corruption_keeps_shape_dtype_range_and_severity_zero_is_identity(name: str, dtype: type) -> None:
    image = _grey(dtype)
    scan = _scan(image)
    assert corrupt_image(scan, name, 0) is image
    for severity in range(1, len(CORRUPTIONS[name].levels) + 1):
        out = corrupt_image(scan, name, severity)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert out.min() >= image.min() and out.max() <= image.max()
        assert not np.array_equal(out, image), f"{name} severity {severity} changed nothing"


@pytest.mark.parametrize("name", [n for n, c in CORRUPTIONS.items() if not c.grey_only])
def test_colour_corruption_keeps_shape(name: str) -> None:
    rgb = np.stack([_grey(), _grey()[::-1], _grey()[:, ::-1]], axis=-1)
    out = corrupt_image(_scan(rgb), name, 2)
    assert out.shape == rgb.shape and out.dtype == rgb.dtype


def test_inversion_is_refused_for_colour() -> None:
    rgb = np.stack([_grey()] * 3, axis=-1)
    with pytest.raises(ValueError, match="grey images only"):
        corrupt_image(_scan(rgb), "invert", 1)


@pytest.mark.parametrize("name", [n for n, c in CORRUPTIONS.items() if c.geometric])
def test_geometric_corruption_moves_mask_with_image(name: str) -> None:
    # The image is its own mask (a bright square on black): after the transform the mask must still sit exactly
    # where the bright pixels went, and keep its label values.
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 16:40] = 255
    image_out = corrupt_image(_scan(mask.copy()), name, 3)
    mask_out = corrupt_mask(_scan(mask), name, 3)
    assert set(np.unique(mask_out)) <= {0, 255}
    assert not np.array_equal(mask_out, mask)
    bright, inside = image_out > 127, mask_out > 0
    assert (bright == inside).mean() > 0.98


def test_intensity_corruption_leaves_mask_alone() -> None:
    mask = _scan(np.eye(8, dtype=np.uint8))
    assert corrupt_mask(mask, "blur", 3) is mask.array


def test_corrupt_case_writes_moved_mask(tiny_data: Path, tmp_path: Path) -> None:
    case = discover_cases(tiny_data, "images", "masks")[0]
    moved = corrupt_case(case, "rotation", 2, tmp_path)
    assert moved.id == case.id and moved.mask != case.mask
    assert read_scan(moved.image).array.shape == read_scan(case.image).array.shape
    assert set(np.unique(read_mask(moved.mask).array)) <= set(np.unique(read_mask(case.mask).array))


def _trained_toy(steps: int = 60) -> tuple[list[torch.nn.Module], torch.Tensor, torch.Tensor]:
    """A small conv net trained to segment a bright square (loss well below chance)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32) * 0.3
    x[..., 8:24, 8:24] += 0.6
    label = (x[:, 0] > 0.5).long()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3, padding=1))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), label).backward()
        opt.step()
    return [model.eval()], x, label


def test_fgsm_and_pgd_raise_the_loss_of_a_trained_model() -> None:
    members, x, label = _trained_toy()
    with torch.no_grad():
        clean = member_loss(members, x, label).item()
    assert clean < 0.3  # it did learn
    eps = 8 / 255
    for attack in (fgsm, pgd):
        adv = attack(members, x, label, eps)
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            assert member_loss(members, adv, label).item() > clean * 1.5
    with torch.no_grad():
        weak = member_loss(members, fgsm(members, x, label, 1 / 255), label).item()
        strong = member_loss(members, fgsm(members, x, label, 8 / 255), label).item()
    assert clean < weak < strong


def test_robustness_cli_end_to_end(tiny_cfg, tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    state = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes).state_dict()
    bundle = save_bundle(tmp_path / "bundle", cfg, {"model": state}, {"input_channels": cfg.data.input_channels}, "# tiny")
    out = tmp_path / "robust"
    result = CliRunner().invoke(app, ["robustness", str(bundle), "--data", str(tiny_data), "--split", "all",
                                      "--limit-cases", "1", "--eps", "0.01", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "gaussian_noise" in result.output and "pgd" in result.output
    rows = json.loads((out / "robustness.json").read_text())
    expected = 1 + sum(len(c.levels) for c in CORRUPTIONS.values()) + 2  # clean, corruptions, FGSM + PGD at one eps
    assert len(rows) == expected
    assert all(r["n_cases"] == 1 and 0.0 <= r["dice"] <= 1.0 for r in rows)
    assert (out / "robustness.csv").read_text().startswith("corruption,severity,param,dice,n_cases")
    with Image.open(out / "robustness.png") as png:
        assert png.size[0] > 400


def test_robustness_cli_bad_bundle_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["robustness", str(tmp_path / "nope"), "--data", str(tmp_path)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
