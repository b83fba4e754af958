"""2D raster images: DSB2018 PNGs (grey and RGB) and files made here (16-bit, palette, TIFF, JPEG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg.errors import ScanReadError, UnsupportedFormatError
from medseg.io import read_mask, read_scan, write_mask


def test_gray_png_reads_as_2d_uint8_with_unit_spacing(dsb_gray: Path) -> None:
    scan = read_scan(dsb_gray)
    expected = np.asarray(Image.open(dsb_gray))
    assert scan.array.shape == expected.shape == (256, 256) and scan.array.dtype == np.uint8
    np.testing.assert_array_equal(scan.array, expected)
    assert scan.geometry.spacing == (1.0, 1.0) and scan.geometry.size == (256, 256)
    assert scan.channels == 1 and not scan.is_volume and scan.meta["spacing_from_file"] is False


def test_rgb_png_reads_as_yx3(dsb_rgb: Path) -> None:
    scan = read_scan(dsb_rgb)
    assert scan.array.shape == (256, 320, 3) and scan.channels == 3
    assert scan.geometry.size == (256, 320)
    np.testing.assert_array_equal(scan.array, np.asarray(Image.open(dsb_rgb).convert("RGB")))


def test_png_mask_round_trip(dsb_gray: Path, dsb_gray_mask: Path, tmp_path: Path) -> None:
    image = read_scan(dsb_gray)
    mask = read_mask(dsb_gray_mask)
    assert set(np.unique(mask.array)) == {0, 255}
    labels = (mask.array == 255).astype(np.uint8)
    out = write_mask(labels, image, tmp_path / "pred.png")
    back = read_mask(out)
    np.testing.assert_array_equal(back.array, labels)  # values as given: class 1 is stored as 1
    assert back.geometry.same_grid(image.geometry)


def test_rgba_drops_alpha_and_palette_converts(dsb_rgb: Path, tmp_path: Path) -> None:
    rgb = np.asarray(Image.open(dsb_rgb).convert("RGB"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_scan(tmp_path / "rgba.png").array, rgb)

    palette_image = Image.fromarray(rgb).quantize(colors=16)
    palette_image.save(tmp_path / "palette.png")
    scan = read_scan(tmp_path / "palette.png")
    assert scan.array.shape == rgb.shape
    np.testing.assert_array_equal(scan.array, np.asarray(palette_image.convert("RGB")))
    # As a mask, a palette PNG means its indices (label-map PNGs), not colours.
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png").array, np.asarray(palette_image))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_keeps_full_range(suffix: str, tmp_path: Path) -> None:
    data = (np.arange(40 * 70).reshape(40, 70) * 23 % 65536).astype(np.uint16)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(data).save(path)
    scan = read_scan(path)
    assert scan.array.dtype == np.uint16
    np.testing.assert_array_equal(scan.array, data)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgb_is_not_reduced_to_8_bits(suffix: str, tmp_path: Path) -> None:
    base = (np.arange(30 * 50).reshape(30, 50) * 41 % 65536).astype(np.uint16)
    data = np.dstack([base, base // 3, 65535 - base])
    path = tmp_path / f"rgb16{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), str(path))
    scan = read_scan(path)
    assert scan.array.dtype == np.uint16 and scan.array.shape == (30, 50, 3)
    np.testing.assert_array_equal(scan.array, data)


def test_resolution_in_tiff_and_png_sets_spacing_but_jpeg_density_does_not(
    dsb_gray: Path, tmp_path: Path
) -> None:
    gray = Image.open(dsb_gray)
    gray.save(tmp_path / "scan.tif", dpi=(254, 127))
    tif = read_scan(tmp_path / "scan.tif")
    assert tif.geometry.spacing == pytest.approx((0.1, 0.2)) and tif.meta["spacing_from_file"]
    gray.save(tmp_path / "scan.png", dpi=(254, 254))
    assert read_scan(tmp_path / "scan.png").geometry.spacing == pytest.approx((0.1, 0.1), rel=1e-4)
    gray.save(tmp_path / "photo.jpg", dpi=(72, 72))  # a display placeholder, not a physical size
    assert read_scan(tmp_path / "photo.jpg").geometry.spacing == (1.0, 1.0)

    # The spacing survives a mask round trip through PNG.
    out = write_mask(np.zeros((256, 256), np.uint8), tif, tmp_path / "m.png")
    assert read_scan(out).geometry.spacing == pytest.approx((0.1, 0.2), rel=1e-4)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    data = np.zeros((20, 40, 3), np.uint8)
    data[:5, :5] = 255  # a marker in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(data).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    scan = read_scan(tmp_path / "phone.jpg")
    assert scan.array.shape == (40, 20, 3) and scan.meta["exif_rotated"]
    assert scan.array[:5, -5:].mean() > 200  # top-left went to top-right


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_image_names_the_file(dsb_rgb: Path, suffix: str, tmp_path: Path) -> None:
    full = tmp_path / f"full{suffix}"
    Image.open(dsb_rgb).convert("RGB").save(full)
    cut = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanReadError, match=rf"^cut\{suffix}: corrupt or truncated image"):
        read_scan(cut)


def test_garbage_png(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(b"definitely not a png" * 5)
    with pytest.raises(ScanReadError, match=r"^fake\.png: not a readable image") as exc:
        read_scan(path)
    assert str(tmp_path) not in str(exc.value)


def test_pixel_cap_is_checked_from_the_header(dsb_gray: Path) -> None:
    with pytest.raises(
        ScanReadError, match=r"000_00071198d059\.png: header announces 65,536 samples .* cap of 100"
    ):
        read_scan(dsb_gray, max_pixels=100)


def test_multipage_tiff_is_unsupported(dsb_gray: Path, tmp_path: Path) -> None:
    page = Image.open(dsb_gray)
    page.save(tmp_path / "stack.tif", save_all=True, append_images=[page, page])
    with pytest.raises(UnsupportedFormatError, match=r"stack\.tif: multi-page image \(3 pages\)"):
        read_scan(tmp_path / "stack.tif")


def test_colour_mask_with_distinct_channels_is_rejected(dsb_rgb: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="colour mask"):
        read_mask(dsb_rgb)
