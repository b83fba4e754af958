"""2D raster images (PNG, JPEG, TIFF, BMP) via Pillow.

Pillow rather than SimpleITK here, on purpose: SimpleITK reads a truncated JPEG without an error (grey fill),
fails on grey+alpha PNGs, and turns a JPEG's placeholder 72 dpi into a 0.35 mm spacing. Pillow detects
truncation, converts every mode explicitly, and reads the header before decoding (pixel cap). Its one gap,
16-bit-per-channel colour (which it reduces to 8 bits), is decoded by SimpleITK instead.

Spacing: (1, 1) unless the file states a physical resolution: PNG ``pHYs`` in metres, or TIFF
``X/YResolution`` in inches or centimetres. JPEG/BMP densities are ignored: they are display placeholders.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageOps, UnidentifiedImageError

from medseg.errors import ScanReadError, ScanTooLargeError, UnsupportedFormatError
from medseg.io.checks import MAX_IMAGE_PIXELS, Admit, check_pixel_count, safe_reason
from medseg.io.formats import ScanFormat, detect_format
from medseg.io.geometry import Geometry, Scan

_MM_PER_INCH = 25.4
_TIFF_X_RESOLUTION, _TIFF_Y_RESOLUTION, _TIFF_RESOLUTION_UNIT = 282, 283, 296
_EXIF_ORIENTATION = 0x0112

_TO_RGB_MODES = {"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_TO_GRAY_MODES = {"1", "LA", "La"}
_UINT16_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_CORRUPT_DATA_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error, ZeroDivisionError,
    OverflowError,
)


def read_raster(
    path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS, as_mask: bool = False, admit: Admit | None = None
) -> Scan:
    """Read a 2D raster image.

    Returns a Scan with ``array`` ``(y, x)`` (grey: uint8, uint16, int32 or float32) or ``(y, x, 3)`` (RGB;
    alpha dropped, palette and CMYK converted). With ``as_mask`` a palette image keeps its palette indices
    (label-map PNGs) instead of being converted to colours.
    """
    name = path.name
    try:
        with Image.open(path) as im:
            # Channels are not counted here: the cap is on pixels (Pillow's limit is too); admit sees samples.
            check_pixel_count(name, (im.height, im.width), 1, max_pixels)
            if admit is not None:
                admit((im.height, im.width), len(im.getbands()))
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise UnsupportedFormatError(
                    f"{name}: multi-page image ({frames} pages) is not supported; save a volume as NIfTI "
                    "or one image per file"
                )
            spacing, spacing_from_file = _spacing_from_header(im)
            sixteen_bit_colour = _is_16bit_colour(im)  # before load(): it reads the decoder tiles
            im.load()  # decodes now, so truncation surfaces here as an OSError
            # Phones store rotation in EXIF; apply it so the array matches what every viewer shows.
            exif_rotated = im.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
            oriented = ImageOps.exif_transpose(im) if exif_rotated else im
            if sixteen_bit_colour:
                array = _read_16bit_colour(path)
            else:
                array = _pil_to_array(oriented, name, as_mask=as_mask)
    except Image.DecompressionBombError as e:  # Pillow's own check at open, for images far above its limit
        raise ScanTooLargeError(
            f"{name}: image too large, above the cap of {max_pixels:,} pixels ({safe_reason(e, path)})"
        ) from None
    except UnidentifiedImageError:
        raise ScanReadError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except _CORRUPT_DATA_ERRORS as e:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError, and damaged TIFF tags as
        # TypeError/KeyError/IndexError/struct.error (found by fuzzing, tests/reliability).
        raise ScanReadError(f"{name}: corrupt or truncated image ({safe_reason(e, path)})") from None
    geometry = Geometry(
        spacing=spacing,
        origin=(0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 1.0),
        size=(int(array.shape[0]), int(array.shape[1])),
    )
    fmt = detect_format(path) or ScanFormat.png
    meta = {"format": str(fmt), "spacing_from_file": spacing_from_file}
    if exif_rotated:
        meta["exif_rotated"] = True
    return Scan(array=array, geometry=geometry, source=name, meta=meta)


def _spacing_from_header(im: Image.Image) -> tuple[tuple[float, float], bool]:
    """(x, y) spacing in mm from a stated physical resolution, else ((1, 1), False)."""
    dpi = None
    if im.format == "PNG":
        dpi = im.info.get("dpi")  # Pillow sets it only when pHYs is in metres
    elif im.format == "TIFF":
        tags = getattr(im, "tag_v2", {})
        # Pillow fills in 1 dpi when the tags are absent; trust only explicit tags.
        if _TIFF_X_RESOLUTION in tags and _TIFF_Y_RESOLUTION in tags:
            unit = tags.get(_TIFF_RESOLUTION_UNIT, 2)  # TIFF's default unit is the inch
            per_inch = {2: 1.0, 3: 2.54}.get(int(unit))
            if per_inch is not None:
                dpi = (float(tags[_TIFF_X_RESOLUTION]) * per_inch, float(tags[_TIFF_Y_RESOLUTION]) * per_inch)
    if dpi is None:
        return (1.0, 1.0), False
    dx, dy = float(dpi[0]), float(dpi[1])
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        return (1.0, 1.0), False  # documented fix-up: a zero/negative resolution means "unknown"
    return (_MM_PER_INCH / dx, _MM_PER_INCH / dy), True


def _is_16bit_colour(im: Image.Image) -> bool:
    if im.mode not in ("RGB", "RGBA"):
        return False
    for tile in getattr(im, "tile", []):
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _read_16bit_colour(path: Path) -> np.ndarray:
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        raise ScanReadError(
            f"{path.name}: cannot decode 16-bit colour image ({safe_reason(e, path)})"
        ) from None
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array)


def _pil_to_array(im: Image.Image, name: str, *, as_mask: bool) -> np.ndarray:
    mode = im.mode
    if mode == "P" and as_mask:
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in _TO_GRAY_MODES:
        im, mode = im.convert("L"), "L"
    elif mode in _TO_RGB_MODES:
        im, mode = im.convert("RGB"), "RGB"
    if mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in _UINT16_MODES:
        return np.asarray(im).astype(np.uint16)  # also turns big-endian I;16B into native order
    if mode == "I":
        return np.asarray(im).astype(np.int32)
    if mode == "F":
        return np.asarray(im).astype(np.float32)
    raise UnsupportedFormatError(f"{name}: image mode {mode!r} is not supported")


def write_raster(array: np.ndarray, path: Path, spacing: tuple[float, ...] | None = None, *,
                 pnginfo: Any = None) -> None:
    """Write ``(y, x)`` uint8/uint16 or ``(y, x, 3)`` uint8 to PNG/TIFF at ``path`` (its suffix picks the format).

    ``spacing`` (x, y) in mm is stored as a resolution (PNG pHYs, TIFF dpi) when it is not the (1, 1) default,
    so ``read_raster`` gives it back. ``pnginfo``: PNG text chunks (a ``PIL.PngImagePlugin.PngInfo``).
    """
    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.fromarray(array)  # mode I;16
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        image = Image.fromarray(array)
    else:
        raise ValueError(
            f"raster output needs (y, x) uint8/uint16 or (y, x, 3) uint8, got {array.shape} {array.dtype}"
        )
    kwargs = {}
    if spacing is not None and any(abs(s - 1.0) > 1e-9 for s in spacing):
        kwargs["dpi"] = (_MM_PER_INCH / spacing[0], _MM_PER_INCH / spacing[1])
    fmt = "TIFF" if detect_format(path) == ScanFormat.tiff else "PNG"
    if pnginfo is not None and fmt == "PNG":
        kwargs["pnginfo"] = pnginfo
    image.save(path, format=fmt, **kwargs)
