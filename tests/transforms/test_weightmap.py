from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from medseg.transforms.weightmap import (
    balanced_class_weights,
    border_cutoff,
    compute_weight_map,
    compute_weight_map_reference,
    objects_from_mask,
    objects_from_membranes,
)

# Small 256² DSB2018 maps with many touching nuclei (92-101 each) keep the reference fast.
DSB_CASES = ("520_c53326fe49fc", "390_9586e48a9a43", "636_f6863b83d75e", "003_0121d6759c5a")


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def two_discs(gap: int = 2) -> np.ndarray:
    """Two discs of radius 10 on one row, ``gap`` background pixels apart, in a 64×128 field."""
    objects = np.zeros((64, 128), dtype=np.int32)
    objects[disc(objects.shape, (32, 40), 10)] = 1
    objects[disc(objects.shape, (32, 40 + 20 + gap + 1), 10)] = 2
    return objects


def test_weight_peaks_in_the_gap_between_touching_discs_and_is_w_c_far_away() -> None:
    objects = two_discs(gap=2)
    w = compute_weight_map(objects, w0=10.0, sigma=5.0)
    bg = objects == 0
    n_bg, n_fg = bg.sum(), (~bg).sum()
    # The heaviest background pixels are the gap pixels on the centre row, between the two discs.
    peak = np.unravel_index(np.argmax(np.where(bg, w, 0)), w.shape)
    assert peak[0] == 32 and 50 < peak[1] < 53
    # With equal class weights the gap is the maximum of the whole map.
    w_eq = compute_weight_map(objects, class_weights=[1.0, 1.0])
    assert w_eq[32, 51] == w_eq.max() > 9
    # In the gap, d1 + d2 = 3 px (1 + 2 from the two gap pixels' centres): w = 1 + 10·exp(-9/50).
    assert w[32, 51] == pytest.approx(1 + 10 * math.exp(-9 / 50), abs=1e-5)
    # Far from both discs only w_c is left: 1 on background, n_bg/n_fg on the objects.
    assert w[0, 0] == pytest.approx(1.0, abs=1e-6) and w[63, 127] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(w[~bg], n_bg / n_fg, rtol=1e-6)
    # The border term is on background only: foreground next to the gap carries just w_c.
    assert w[32, 50] == pytest.approx(n_bg / n_fg, rel=1e-6)


def test_border_term_by_hand_on_two_pixels() -> None:
    objects = np.array([[1, 0, 0, 0, 2]], dtype=np.int32)
    w = compute_weight_map(objects, w0=10.0, sigma=5.0, class_weights=[1.0, 1.0])
    # Pixel 2 is 2 px from each object; pixel 1 is 1 and 3 px away: both sums are 4.
    expected = 1 + 10 * math.exp(-16 / 50)
    np.testing.assert_allclose(w[0], [1, expected, expected, expected, 1], rtol=1e-6)


def test_one_object_gets_no_border_term() -> None:
    objects = np.zeros((40, 40), dtype=np.int32)
    objects[disc(objects.shape, (20, 20), 8)] = 1
    w = compute_weight_map(objects, class_weights=[1.0, 3.0])
    np.testing.assert_array_equal(w, np.where(objects > 0, 3.0, 1.0).astype(np.float32))


def test_no_objects_is_all_background_weight() -> None:
    w = compute_weight_map(np.zeros((7, 9), dtype=np.uint16))
    assert w.dtype == np.float32 and w.shape == (7, 9)
    np.testing.assert_array_equal(w, 1.0)


@pytest.mark.parametrize("stem", DSB_CASES)
def test_fast_equals_reference_on_real_dsb2018_instance_maps(datasets_dir, stem: str) -> None:
    objects = np.asarray(Image.open(datasets_dir / "dsb2018_nuclei" / "instances" / f"{stem}.png"))
    assert objects.dtype == np.uint16 and objects.max() > 50
    fast = compute_weight_map(objects)
    ref = compute_weight_map_reference(objects)
    assert fast.dtype == np.float32 and fast.shape == objects.shape
    assert ref.max() > 5  # touching nuclei: the border term is really there
    np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=0)


def test_fast_equals_reference_in_3d_with_anisotropic_spacing() -> None:
    rng = np.random.default_rng(1)
    objects = np.zeros((12, 40, 40), dtype=np.int32)
    zz, yy, xx = np.indices(objects.shape)
    spacing = (3.0, 0.5, 0.5)  # mm, array order
    for k in range(1, 16):
        c = rng.uniform((0, 0, 0), objects.shape)
        r = rng.uniform(2.0, 4.0)  # mm
        ball = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + (
            (xx - c[2]) * spacing[2]
        ) ** 2 <= r * r
        objects[ball & (objects == 0)] = k
    kw = {"w0": 10.0, "sigma": 2.0, "spacing": spacing}
    fast = compute_weight_map(objects, **kw)
    ref = compute_weight_map_reference(objects, **kw)
    assert ref.max() > 3
    np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=0)
    # sigma is in mm: the same sigma in pixels gives a different map.
    assert np.abs(compute_weight_map(objects, w0=10.0, sigma=2.0) - fast).max() > 0.1


def test_reference_keeps_the_two_smallest_distances() -> None:
    # Three objects on a row: pixel 3 is 3 px from object 1, 1 px from 2, 2 px from 3 -> d1 + d2 = 1 + 2.
    objects = np.array([[1, 0, 2, 0, 0, 3]], dtype=np.int32)
    for fn in (compute_weight_map, compute_weight_map_reference):
        w = fn(objects, class_weights=[0.0, 0.0])
        assert w[0, 3] == pytest.approx(10 * math.exp(-9 / 50), rel=1e-6)


def test_label_numbers_need_not_be_contiguous() -> None:
    objects = two_discs()
    relabelled = np.where(objects == 2, 77, objects * 5)
    np.testing.assert_array_equal(compute_weight_map(objects), compute_weight_map(relabelled))


def test_class_weights_given_and_balanced() -> None:
    objects = two_discs()
    labels = (objects > 0).astype(np.int64)
    weights = balanced_class_weights(labels)
    assert weights[0] == 1.0 and weights[1] == pytest.approx((labels == 0).sum() / (labels == 1).sum())
    assert balanced_class_weights(labels, max_weight=2.0)[1] == 2.0
    w = compute_weight_map(objects, class_weights=[0.5, 2.0], w0=0.0)
    np.testing.assert_array_equal(w, np.where(objects > 0, 2.0, 0.5).astype(np.float32))
    with pytest.raises(ValueError, match="class_weights"):
        compute_weight_map(objects, class_weights=[1.0])
    # Semantic labels choose w_c: a second class on disc 2.
    labels[objects == 2] = 2
    w = compute_weight_map(objects, labels=labels, class_weights=[1.0, 2.0, 4.0], w0=0.0)
    assert w[objects == 1].min() == 2.0 and w[objects == 2].min() == 4.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(TypeError):
        compute_weight_map(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="spacing"):
        compute_weight_map(np.zeros((4, 4), dtype=np.int32), spacing=(1.0,))
    with pytest.raises(ValueError, match=">= 0"):
        compute_weight_map(-np.ones((4, 4), dtype=np.int32))


def test_border_cutoff_is_where_the_term_falls_below_tol() -> None:
    d = border_cutoff(10.0, 5.0, 1e-4)
    assert 10 * math.exp(-(d**2) / 50) == pytest.approx(1e-4)
    assert border_cutoff(1e-5, 5.0, 1e-4) == 0.0


def test_objects_from_mask_splits_classes_and_diagonal_contacts() -> None:
    mask = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 2],
            [0, 0, 1, 2],
        ]
    )
    objects = objects_from_mask(mask)
    assert objects.dtype == np.int32
    # Face connectivity: the diagonal contact does not join the two 1-regions; class 2 is its own object.
    assert len(np.unique(objects[objects > 0])) == 3
    assert np.array_equal(objects > 0, mask > 0)
    assert len(np.unique(objects_from_mask(mask, connectivity=2)[mask == 1])) == 1


def test_objects_from_membranes_synthetic_cross() -> None:
    mask = np.full((21, 21), 255, dtype=np.uint8)
    mask[10, :] = 0
    mask[:, 10] = 0
    objects = objects_from_membranes(mask)
    assert objects.max() == 4
    np.testing.assert_array_equal(objects == 0, mask == 0)
    w = compute_weight_map(objects, class_weights=[1.0, 1.0])
    # Membrane pixels between two cells carry the border term; the cross centre touches four cells.
    assert w[10, 3] == pytest.approx(1 + 10 * math.exp(-4 / 50), rel=1e-6)


def test_objects_from_membranes_on_isbi(datasets_dir) -> None:
    path = sorted((datasets_dir / "isbi2012_em" / "masks").glob("*.png"))[0]
    mask = np.asarray(Image.open(path))
    objects = objects_from_membranes(mask)
    np.testing.assert_array_equal(objects == 0, mask == 0)
    assert objects.max() > 50  # hundreds of cells in a 512² slice
    w = compute_weight_map(objects)
    assert w[mask == 0].max() > 5  # thin membranes between cells get heavy weights
