"""Writers: label values, atomic replacement, overlays, probabilities, and DICOM -> NIfTI conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.io import (
    Geometry,
    Scan,
    read_mask,
    read_probabilities,
    read_scan,
    render_overlay,
    write_mask,
    write_overlay,
    write_probabilities,
    write_scan,
)
from medseg.io.overlay import to_display_rgb
from medseg.io.writers import atomic_path


def _scan_2d(shape=(6, 8)) -> Scan:
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    return Scan(array, Geometry.identity(shape), source="toy.png")


def _volume(shape=(5, 6, 7)) -> Scan:
    geometry = Geometry(
        spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, -1), size=shape
    )
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return Scan(array, geometry, source="toy.nii.gz")


def test_png_labels_are_written_as_given_or_scaled_for_viewing(tmp_path: Path) -> None:
    like = _scan_2d()
    labels = np.zeros((6, 8), np.int64)
    labels[1:3, 1:3], labels[4, 5] = 1, 2
    np.testing.assert_array_equal(read_mask(write_mask(labels, like, tmp_path / "m.png")).array, labels)
    viewed = read_mask(write_mask(labels, like, tmp_path / "v.png", scale_for_viewing=True)).array
    assert set(np.unique(viewed)) == {0, 127, 254}
    big = labels * 300  # instance-style labels above 255 go to 16-bit PNG
    back = read_mask(write_mask(big, like, tmp_path / "inst.png"))
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, big)


def test_write_mask_rejects_wrong_inputs(tmp_path: Path) -> None:
    like = _scan_2d()
    with pytest.raises(ValueError, match="does not match"):
        write_mask(np.zeros((5, 8), np.uint8), like, tmp_path / "m.png")
    with pytest.raises(ValueError, match="non-integer"):
        write_mask(np.full((6, 8), 0.5), like, tmp_path / "m.png")
    with pytest.raises(ValueError, match="lossless"):
        write_mask(np.zeros((6, 8), np.uint8), like, tmp_path / "m.jpg")
    with pytest.raises(ValueError, match="PNG/TIFF hold 2D masks"):
        write_mask(np.zeros((5, 6, 7), np.uint8), _volume(), tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []


def test_volume_mask_keeps_exact_geometry_including_direction(tmp_path: Path) -> None:
    like = _volume()
    labels = (like.array > 0).astype(np.uint8)
    back = read_scan(write_mask(labels, like, tmp_path / "m.nii.gz"))
    assert back.geometry.same_grid(like.geometry, atol=1e-6)
    np.testing.assert_array_equal(back.array, labels)


def test_atomic_write_leaves_old_file_on_failure_and_no_temp_files(tmp_path: Path) -> None:
    like = _scan_2d()
    target = write_mask(np.ones((6, 8), np.uint8), like, tmp_path / "m.png")
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
    write_mask(np.zeros((6, 8), np.uint8), like, target)  # replaces in place
    assert read_mask(target).array.max() == 0 and [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_overlay_colours_foreground_only(dsb_gray: Path, tmp_path: Path) -> None:
    scan = read_scan(dsb_gray)
    mask = np.zeros(scan.spatial_shape, np.uint8)
    mask[10:20, 30:40] = 1
    out = write_overlay(scan, mask, {1: "#ff0000"}, tmp_path / "o.png", alpha=1.0)
    rgb = read_scan(out).array
    assert rgb.shape == (*scan.spatial_shape, 3)
    assert (rgb[10:20, 30:40] == (255, 0, 0)).all()
    np.testing.assert_array_equal(rgb[mask == 0], to_display_rgb(scan.array)[mask == 0])  # untouched outside
    assert to_display_rgb(scan.array).max() == 255  # dim gray images are stretched for display


def test_volume_overlay_defaults_to_the_slice_with_most_foreground(tmp_path: Path) -> None:
    like = _volume()
    mask = np.zeros(like.array.shape, np.uint8)
    mask[3, 1:4, 1:4] = 1
    mask[1, 0, 0] = 2
    chosen = render_overlay(like, mask)
    np.testing.assert_array_equal(chosen, render_overlay(like, mask, slice_index=3))
    assert not np.array_equal(chosen, render_overlay(like, mask, slice_index=1))
    out = write_overlay(like, mask, None, tmp_path / "o.png", window=(4.0, 0.0))
    assert read_scan(out).array.shape == (6, 7, 3)


def test_probabilities_round_trip_2d_npz_and_3d_nifti(tmp_path: Path) -> None:
    like2d = _scan_2d()
    probs2d = np.random.default_rng(1).dirichlet([1, 1, 1], size=(6, 8)).transpose(2, 0, 1).astype(np.float32)
    path = write_probabilities(probs2d, like2d, tmp_path / "p2")  # no suffix: .npz for 2D
    assert path.name == "p2.npz"
    back, geometry = read_probabilities(path)
    np.testing.assert_array_equal(back, probs2d)
    assert geometry == like2d.geometry

    like3d = _volume()
    probs3d = np.random.default_rng(2).random((2, *like3d.array.shape)).astype(np.float32)
    path = write_probabilities(probs3d, like3d, tmp_path / "p3")  # no suffix: NIfTI for volumes
    assert path.name == "p3.nii.gz"
    back, geometry = read_probabilities(path)
    np.testing.assert_allclose(back, probs3d)
    assert geometry.same_grid(like3d.geometry, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(C, \*spatial\)"):
        write_probabilities(probs3d[0], like3d, tmp_path / "bad.npz")


def test_dicom_series_converts_to_nifti_matching_the_reference(
    ct_dicom_dir: Path, ct_nifti: Path, tmp_path: Path
) -> None:
    out = write_scan(read_scan(ct_dicom_dir), tmp_path / "ct.nii.gz")
    converted, reference = read_scan(out), read_scan(ct_nifti)
    assert converted.geometry.same_grid(reference.geometry)
    np.testing.assert_array_equal(converted.array, reference.array)


def test_scan_repr_hides_meta_values(ct_dicom_dir: Path) -> None:
    scan = read_scan(ct_dicom_dir / "IM0001.dcm")
    text = repr(scan)
    assert "dicom_datasets" in text and "Institution" not in text and "Petersgraben" not in text


def _overlay_one_label_at_a_time(image: np.ndarray, mask: np.ndarray, colors, alpha: float) -> np.ndarray:
    """The definition render_overlay vectorises: blend each label's pixels, then paint its outline (the pixels
    binary erosion removes) in its solid colour."""
    from scipy.ndimage import binary_erosion

    from medseg.io.overlay import label_colors, to_display_rgb

    rgb = to_display_rgb(image).astype(np.float32)
    for label, color in label_colors(np.unique(mask), colors).items():
        where = mask == label
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(color, dtype=np.float32)
        rgb[where & ~binary_erosion(where)] = color
    return rgb.round().astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, bool])
def test_overlay_equals_blending_one_label_at_a_time(dtype) -> None:
    rng = np.random.default_rng(4)
    labels = [0, 1] if dtype is bool else [0, 1, 2, 7, 40] if dtype is np.uint8 else [-3, 0, 2, 300, 70000]
    mask = rng.choice(labels, (37, 53)).astype(dtype)
    mask[5:20, 10:30] = labels[1]  # a solid block, so there is an inside as well as outlines
    colors = {int(v): c for v, c in zip(labels[1:], ["#ff0000", "#00ff00", "#0000ff", "#123456"], strict=False)}
    for image in (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rng.normal(size=(37, 53)).astype(np.float32)):
        for alpha in (0.35, 1.0):
            before = image.copy()
            want = _overlay_one_label_at_a_time(image, mask, colors, alpha)
            np.testing.assert_array_equal(render_overlay(image, mask, colors, alpha), want)
            np.testing.assert_array_equal(image, before)  # the scan itself is never painted on
    np.testing.assert_array_equal(render_overlay(image, np.zeros((37, 53), np.uint8), alpha=0.9), to_display_rgb(image))
    instances = rng.integers(0, 40, (37, 53)).astype(np.uint16)  # more labels than default colours: they cycle
    np.testing.assert_array_equal(render_overlay(image, instances), _overlay_one_label_at_a_time(image, instances, None, 0.35))
