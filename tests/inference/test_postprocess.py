"""Post-processing on hand-made masks, and measurements against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import InferenceConfig
from medseg.inference.postprocess import (
    fill_holes,
    keep_largest_component,
    measure,
    postprocess_mask,
    remove_small_objects,
)
from medseg.io import Geometry


def _two_labels() -> np.ndarray:
    m = np.zeros((20, 20), np.uint8)
    m[1:8, 1:8] = 1  # label 1: a 7×7 ring...
    m[3:6, 3:6] = 0  # ...with a 3×3 hole
    m[12:14, 12:14] = 1  # label 1: a 4-pixel speck
    m[10:19, 1:10] = 2  # label 2: a 9×9 square with a hole holding label 1
    m[13:16, 4:7] = 1
    m[0, 19] = 2  # label 2: a single pixel
    return m


def test_remove_small_objects_keeps_only_big_components() -> None:
    m = _two_labels() == 1
    out = remove_small_objects(m, 5)
    assert out[1:8, 1:8].sum() == 49 - 9 and not out[12:14, 12:14].any() and out[13:16, 4:7].all()
    assert remove_small_objects(m, 10).sum() == 40  # the 3×3 (9 px) object goes too
    np.testing.assert_array_equal(remove_small_objects(m, 0), m)


def test_keep_largest_and_fill_holes() -> None:
    m = _two_labels() == 1
    largest = keep_largest_component(m)
    assert largest.sum() == 40 and largest[1:8, 1:8].sum() == 40
    filled = fill_holes(largest)
    assert filled.sum() == 49 and filled[3:6, 3:6].all()
    assert not keep_largest_component(np.zeros((4, 4), bool)).any()
    # Diagonal neighbours are separate components (face connectivity).
    diag = np.eye(3, dtype=bool)
    assert keep_largest_component(diag).sum() == 1


def test_postprocess_per_label_without_overwriting_other_labels() -> None:
    m = _two_labels()
    cfg = InferenceConfig(min_object_size=5, fill_holes=True)
    out = postprocess_mask(m, cfg, num_classes=3)
    assert out.dtype == m.dtype and out.shape == m.shape
    assert (out[3:6, 3:6] == 1).all()  # label 1's hole filled
    assert (out[12:14, 12:14] == 0).all()  # label 1's 4-pixel speck removed
    # Label 2's square has a "hole" holding a 3×3 label-1 block: filling label 2 must not overwrite it.
    assert (out[13:16, 4:7] == 1).all() and (out[10:19, 1:10] > 0).all()
    assert out[0, 19] == 0  # label 2's single pixel removed
    np.testing.assert_array_equal(postprocess_mask(m, InferenceConfig(), 3), m)  # all off: unchanged
    largest = postprocess_mask(m, InferenceConfig(keep_largest=True), 3)
    assert set(np.unique(largest[largest > 0])) == {1, 2} and (largest == 1).sum() == 40


def test_measure_2d_with_anisotropic_spacing() -> None:
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:7] = 1  # 12 px
    m[8, 0] = 1  # second object
    m[6:9, 6:11] = 2  # 15 px
    geo = Geometry(spacing=(0.25, 0.5), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), size=(10, 12))
    out = measure(m, geo, {0: {"name": "bg"}, 1: {"name": "a", "color": "#ff0000"}, 2: "b", 3: "absent"})
    assert out[1] == {"name": "a", "voxels": 13, "components": 2, "area_mm2": pytest.approx(13 * 0.125)}
    assert out[2]["area_mm2"] == pytest.approx(15 * 0.125) and out[2]["name"] == "b"
    assert out[3] == {"name": "absent", "voxels": 0, "components": 0, "area_mm2": 0.0}
    assert 0 not in out


def test_measure_3d_volume_in_ml() -> None:
    m = np.zeros((4, 10, 10), np.uint8)
    m[1:3, 2:7, 2:6] = 1  # 2*5*4 = 40 voxels
    # spacing is (x, y, z): 0.7 × 0.9 × 2.5 mm = 1.575 mm³ per voxel
    geo = Geometry(spacing=(0.7, 0.9, 2.5), origin=(0.0,) * 3, direction=tuple(np.eye(3).ravel()), size=(4, 10, 10))
    out = measure(m, geo, {0: "bg", 1: "organ"})
    assert out[1]["voxels"] == 40 and out[1]["volume_ml"] == pytest.approx(40 * 1.575 / 1000)
    assert "area_mm2" not in out[1]
    with pytest.raises(ValueError, match="does not match"):
        measure(m[:2], geo, {1: "organ"})
