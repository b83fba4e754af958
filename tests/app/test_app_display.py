"""The viewer's drawing: planes with superior up, physical aspect ratio, window presets, hidden labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from app import display
from app.display import Plane
from medseg.io import read_scan


@pytest.fixture(scope="module")
def ct(datasets_dir: Path):
    return read_scan(datasets_dir / "dicom_ct_series" / "images" / "ct.nii.gz")


def test_coronal_and_sagittal_keep_the_physical_aspect_ratio(ct) -> None:
    z, y, x = ct.spatial_shape  # 20 slices of 2 mm, 512 x 512 of 0.977 mm
    assert display.pixel_spacing(ct, Plane.coronal) == pytest.approx((2.0, 0.977), abs=1e-3)
    height, width = display.display_size((z, x), display.pixel_spacing(ct, Plane.coronal))
    assert height / width == pytest.approx((z * 2.0) / (x * 0.977), rel=0.01)  # 40 mm tall, 500 mm wide
    view = display.to_screen(np.zeros((z, x, 3), np.uint8), (height, width))
    assert view.shape == (height, width, 3)


def test_planes_cut_the_volume_with_superior_on_top(ct) -> None:
    volume = ct.array
    assert np.array_equal(display.take_plane(volume, Plane.axial, 5), volume[5])
    assert np.array_equal(display.take_plane(volume, Plane.coronal, 100)[0], volume[-1, 100])
    assert np.array_equal(display.take_plane(volume, Plane.sagittal, 7)[-1], volume[0, :, 7])
    assert [display.slice_count(ct, p) for p in Plane] == [20, 512, 512]


def test_window_presets_are_the_radiology_values(ct) -> None:
    ct.meta["modality"] = "CT"
    options = display.window_options(ct)
    assert options[0] == display.AUTO_WINDOW and options[-1] == display.MANUAL_WINDOW
    assert display.window_for("Lung", ct) == (1500, -600)
    assert display.window_for("Bone", ct) == (2500, 480)
    assert display.window_for("Brain", ct) == (80, 40)
    assert display.window_for("Liver", ct) == (150, 90)
    assert display.window_for("Soft tissue", ct) == (400, 40)
    assert display.window_for(display.MANUAL_WINDOW, ct, (10.0, 5.0)) == (10.0, 5.0)
    assert display.default_window_option(ct) == "Soft tissue"
    # The lung window shows air (-1000 HU) dark grey, not black: -1000 is inside [-1350, 150].
    rgb = display.compose(np.full((4, 4), -1000.0), None, {}, alpha=0.5, window=(1500, -600))
    assert rgb[0, 0, 0] == round((-1000 + 1350) / 1500 * 255)


def _gradient(n: int) -> np.ndarray:
    return np.tile(np.linspace(0, 255, n).astype(np.uint8), (n, 1))


def test_hidden_labels_are_not_drawn() -> None:
    image = _gradient(6)
    plain = display.compose(image, None, {}, alpha=0.5, window=None)
    mask = np.zeros((6, 6), np.uint8)
    mask[:3], mask[3:] = 1, 2
    colors = {1: "#ff0000", 2: "#00ff00"}
    both = display.compose(image, mask, colors, alpha=0.5, window=None)
    only_two = display.compose(image, mask, colors, alpha=0.5, window=None, visible={2})
    assert not np.array_equal(both[:3], plain[:3])
    assert np.array_equal(only_two[:3], plain[:3])  # label 1 hidden: the image as is
    assert np.array_equal(only_two[3:], both[3:])


def test_uncertainty_and_truth_outline_layers() -> None:
    image = _gradient(8)
    plain = display.compose(image, None, {}, alpha=0.5, window=None)
    mask = np.zeros((8, 8), np.uint8)
    uncertainty = np.zeros((8, 8), np.float32)
    uncertainty[2, 2] = 1.0
    truth = np.zeros((8, 8), np.uint8)
    truth[4:7, 4:7] = 1
    rgb = display.compose(image, mask, {}, alpha=0.5, window=None, uncertainty=uncertainty, truth_outline=truth)
    assert not np.array_equal(rgb[2, 2], plain[2, 2])  # heat where the model hesitates
    assert np.array_equal(rgb[0, 1], plain[0, 1])  # nothing where it is sure
    assert np.array_equal(rgb[4, 4], display.TRUTH_OUTLINE_RGB)  # edge of the truth
    assert np.array_equal(rgb[5, 5], plain[5, 5])  # inside the truth: only the outline is drawn


def test_auto_window_is_one_scale_for_the_whole_volume(ct) -> None:
    width, level = display.volume_window(ct)
    low, high = np.percentile(ct.array, (0.5, 99.5))
    spread = high - low
    assert abs((level - width / 2) - low) < 0.02 * spread and abs((level + width / 2) - high) < 0.02 * spread
    # The same HU value looks the same on two different slices.
    a = display.compose(ct.array[0], None, {}, alpha=0.5, window=(width, level))
    b = display.compose(ct.array[-1], None, {}, alpha=0.5, window=(width, level))
    value = ct.array[0].flat[0]
    where = np.argwhere(ct.array[-1] == value)[0]
    assert np.array_equal(a[0, 0], b[tuple(where)])


# ------------------------------------------------------------------- bundle and service text (issue 15)

HOSTILE = '<style>.stAlert{display:none}</style><input placeholder="password"> [sign in](http://x) $x$ :red[y]'


def test_label_names_and_colours_cannot_inject_markup() -> None:
    from app.escape import markdown_text
    from app.viewer import swatch_html

    swatch = swatch_html(HOSTILE, "#ff0000")
    assert "<style" not in swatch and "<input" not in swatch and "&lt;style&gt;" in swatch
    assert swatch.count("<div") == 1 and swatch.count('"') == 4  # one element, two quoted attributes
    text = markdown_text(HOSTILE)
    for raw in ("[sign in](", "$x$", ":red[", "<style>"):
        assert raw not in text
    # A colour a bundle or a service sends that is not #rrggbb/#rgb falls back to medseg's default.
    colours = display.legend_colors({0: {"name": "bg"}, 1: {"name": "a", "color": "red;position:fixed"},
                                     2: {"name": "b", "color": "#0f0"}})
    assert colours[2] == "#00ff00" and colours[1].startswith("#") and len(colours[1]) == 7


def test_orientation_labels_follow_the_scan_direction(datasets_dir: Path) -> None:
    """Issue 16: R/L/A/P/S/I on the edges of volume planes, from the scan's direction cosines."""
    from medseg.io import read_scan

    ct = read_scan(datasets_dir / "dicom_ct_series" / "dicom")  # a standard axial CT: identity direction (LPS)
    assert display.orientation_labels(ct, Plane.axial) == {"right": "L", "left": "R", "bottom": "P", "top": "A"}
    assert display.orientation_labels(ct, Plane.coronal) == {"right": "L", "left": "R", "bottom": "I", "top": "S"}
    assert display.orientation_labels(ct, Plane.sagittal) == {"right": "P", "left": "A", "bottom": "I", "top": "S"}
    flipped = dataclasses.replace(ct.geometry, direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # RAS-stored
    ct.geometry = flipped
    assert display.orientation_labels(ct, Plane.axial) == {"right": "R", "left": "L", "bottom": "A", "top": "P"}
    view = display.draw_orientation(np.zeros((200, 200, 3), np.uint8), {"top": "A"})
    assert view[:30, 80:120].max() == 255 and view[100:].max() == 0  # the letter is drawn at the top edge only


def test_truth_outline_has_a_dark_rim_on_bright_tissue_and_8bit_grey_gets_a_window() -> None:
    image = np.full((10, 10), 250, np.uint8)  # bright tissue: a white line alone would vanish
    truth = np.zeros((10, 10), np.uint8)
    truth[3:7, 3:7] = 1
    rgb = display.compose(image, None, {}, alpha=0.5, window=None, truth_outline=truth)
    assert np.array_equal(rgb[3, 3], display.TRUTH_OUTLINE_RGB)
    assert np.array_equal(rgb[2, 4], display.TRUTH_RIM_RGB)  # just outside the truth
    from medseg.io import Geometry, Scan

    assert display.has_intensity_window(Scan(image, Geometry.identity(image.shape)))  # 8-bit MRI, X-ray, EM
