"""The model grid: resampling records its operations and is undone exactly on probabilities; a scan upscaled 3x
is predicted on its own grid and agrees with the native prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.config import DataConfig, ExperimentConfig, Resample
from medseg.inference.predictor import Predictor
from medseg.io import Geometry, Scan, read_scan
from medseg.metrics import per_label_metrics
from medseg.transforms.resample import (
    from_model_grid,
    model_grid_shape,
    model_grid_spacing,
    resize_image,
    resize_labels,
    to_model_grid,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples/data/dsb2018_sample"


class Brightness(torch.nn.Module):
    """A pointwise 'segmenter' (logit = brightness above mid-grey): what it predicts depends only on the
    pixel, so any difference between grids comes from resampling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 8.0 * (x.mean(1, keepdim=True) - 0.35)
        return torch.cat([-v, v], 1)


def test_model_grid_shapes_for_each_mode() -> None:
    assert model_grid_shape((300, 400), (1.0, 1.0), DataConfig()) == (300, 400)
    size = DataConfig(resample=Resample.size, target_size=256)
    h, w = model_grid_shape((300, 400), (1.0, 1.0), size)
    assert abs(h * w - 256 * 256) < 800 and h / w == pytest.approx(0.75, abs=0.01)
    spacing = DataConfig(resample=Resample.spacing, target_spacing=(2.0, 0.5, 0.5))
    assert model_grid_shape((20, 100, 100), (4.0, 1.0, 1.0), spacing) == (40, 200, 200)
    with pytest.raises(ValueError, match="rescaling"):
        model_grid_shape((20, 100, 100), (400.0, 1.0, 1.0), spacing)


def test_images_keep_their_dtype_and_labels_survive_a_round_trip() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 40, 60), dtype=np.uint8)
    up = resize_image(image, (80, 120))
    assert up.dtype == np.uint8 and up.shape == (3, 80, 120)
    label = np.zeros((40, 60), np.uint8)
    label[10:30, 5:25] = 1
    label[12:14, 30:58] = 2  # a 2 px bar
    back = resize_labels(resize_labels(label, (80, 120)), (40, 60))
    assert np.array_equal(back, label)  # exact: the 2x grid nests the original one


def test_operations_are_recorded_and_undone_on_probabilities() -> None:
    data = DataConfig(resample=Resample.spacing, target_spacing=(1.0, 1.0, 2.0), slice_axis=2, channels=1)
    geometry = Geometry((0.5, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (10, 12, 16))  # x, y, z order
    image = np.random.default_rng(1).random((1, 10, 12, 16)).astype(np.float32)
    out, _, _, grid = to_model_grid(image, geometry, data)
    assert [op["op"] for op in grid.operations] == ["resample", "transpose"]
    assert out.shape == (1, 4, 10, 12)  # x axis (0.5 mm) -> 2 mm, then slices along it come first
    assert model_grid_spacing(grid) == pytest.approx((2.0, 1.0, 1.0))
    probs = np.random.default_rng(2).random((3, 4, 10, 12)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    back = from_model_grid(probs, grid)
    assert back.shape == (3, 10, 12, 16)
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)  # linear resampling keeps a distribution


def test_a_scan_upscaled_3x_is_predicted_on_its_own_grid_like_the_native_one(tmp_path: Path) -> None:
    src = sorted((SAMPLE / "images").iterdir())[0]
    native = read_scan(src)
    big = np.asarray(Image.fromarray(native.array).resize((native.array.shape[1] * 3, native.array.shape[0] * 3),
                                                          Image.BILINEAR))
    upscaled = Scan(big, Geometry.identity(big.shape[:2]), "big.png")
    cfg = ExperimentConfig.model_validate({"data": {"resample": "size", "target_size": 256, "channels": 3},
                                           "inference": {"tile_size": [512, 512]}})
    predictor = Predictor([Brightness()], cfg, device="cpu")
    pred_native = predictor.predict_scan(native)
    pred_big = predictor.predict_scan(upscaled)
    assert pred_big.mask.shape == big.shape[:2] and pred_big.probs.shape == (2, *big.shape[:2])
    assert pred_big.geometry == upscaled.geometry  # back on the input grid, nothing left to undo
    # The native prediction upscaled the same way: probabilities bilinearly, then argmax.
    native_up = torch.nn.functional.interpolate(torch.from_numpy(pred_native.probs)[None], size=big.shape[:2],
                                                mode="bilinear", align_corners=False)[0]
    expected = native_up.argmax(0).numpy().astype(np.uint8)
    dice = per_label_metrics(pred_big.mask, expected, 2, hd95=False)[1]["dice"]
    assert dice >= 0.98
    assert 0.05 < pred_native.mask.mean() < 0.95  # the test means something: a real two-class mask
