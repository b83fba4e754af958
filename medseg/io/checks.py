"""Sanity checks every reader applies: size caps before decoding, geometry and voxel values after.

Readers call ``check_pixel_count`` with the size from the file's header *before* decoding pixels, so a
decompression bomb (a tiny file that claims a huge grid) fails fast with a clear message instead of
exhausting memory. ``finish_scan`` runs on every decoded scan so nothing downstream sees zero spacing or NaN.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medseg.errors import MedsegError, ScanReadError, ScanTooLargeError
from medseg.io.geometry import Scan

# Caps; every reader also takes them as keyword arguments.
MAX_VOXELS = 1_000_000_000  # 3D: 1e9 voxels is 4 GB as float32, far above any clinical CT/MR series
MAX_IMAGE_PIXELS = 89_478_485  # 2D: Pillow's own MAX_IMAGE_PIXELS (~ a 9459 x 9459 image)

F = TypeVar("F", bound=Callable[..., Any])
# Called with the shape (array order) and samples per pixel a header announces, after the cap passed and before
# any pixel is decoded; it may raise to refuse (the service reserves the scan's memory this way).
Admit = Callable[[tuple[int, ...], int], None]


_read_notes: ContextVar[list[str] | None] = ContextVar("medseg_read_notes", default=None)


class ScanReadWarning(UserWarning):
    """A scan was read, but something about it deserves attention (missing slices, NaN voxels fixed up).

    Each one is also handed to the ``collect_read_warnings`` block of the thread/context that raised it, when made:
    ``warnings.warn`` makes the instance before any filter is consulted, so another thread's
    ``catch_warnings``/``simplefilter("ignore")`` (process-wide state) cannot lose it or show it to someone else."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        notes = _read_notes.get()
        if notes is not None:
            notes.append(str(self))


@contextmanager
def collect_read_warnings() -> Iterator[list[str]]:
    """``with collect_read_warnings() as notes: read_scan(...)``: ``notes`` gets the texts of the
    ``ScanReadWarning``s raised in this block by this thread only (a server reading for many users at once)."""
    notes: list[str] = []
    token = _read_notes.set(notes)
    try:
        yield notes
    finally:
        _read_notes.reset(token)


def check_pixel_count(
    name: str, shape: tuple[int, ...], components: int, cap: int, admit: Admit | None = None
) -> None:
    """Raise ``ScanTooLargeError`` when a header announces more than ``cap`` samples; else ask ``admit``."""
    count = math.prod(shape) * max(1, components)
    if count > cap:
        raise ScanTooLargeError(
            f"{name}: header announces {count:,} samples (shape {tuple(shape)}), above the cap of {cap:,}; "
            "refusing to decode (raise the cap if this file is genuine)"
        )
    if admit is not None:
        admit(tuple(int(s) for s in shape), max(1, components))


def safe_reason(err: BaseException | str, *paths: str | Path) -> str:
    """One line from a library error message, with directories stripped from any file path in it.

    SimpleITK/Pillow messages embed full paths, and folder names may be patient names; messages keep
    base names only. Source-code locations (``file.cxx:249``) are dropped.
    """
    text = str(err)
    for p in paths:
        p = Path(p)
        for variant in {str(p), str(p.resolve()) if p.exists() else str(p)}:
            text = text.replace(variant, p.name)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # ITK puts "Exception thrown in ... file.cxx:123:" first and the actual reason last.
    informative = [ln for ln in lines if not re.search(r"\.(cxx|hxx|h|cpp):\d+:?$", ln)]
    line = (informative or lines or ["unknown error"])[-1]
    line = re.sub(r"^(sitk::ERROR|ITK ERROR|ERROR):\s*", "", line)
    line = re.sub(r"\w+\(0x[0-9a-f]+\):\s*", "", line)  # "PNGImageIO(0x5602...): "
    return re.sub(r"(?:/[^\s\"'/:]+)+/([^\s\"'/:]+)", r"\1", line)  # any remaining absolute path -> base name


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``): file and member names may hold line breaks."""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line_errors(func: F) -> F:
    """Decorator for public readers: a ``MedsegError`` leaves with a one-line message (same exception object,
    type and attributes; only control characters in the message are escaped)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedsegError as e:
            if e.args and isinstance(e.args[0], str) and _CONTROL_CHARS.search(e.args[0].strip()):
                e.args = (one_line(e.args[0].strip()), *e.args[1:])
            raise

    return wrapper  # type: ignore[return-value]


def validate_geometry(scan: Scan) -> None:
    """Spacing must be finite and > 0, origin and direction finite; otherwise measurements are nonsense."""
    g = scan.geometry
    spacing = np.asarray(g.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ScanReadError(
            f"{scan.source}: invalid voxel spacing {tuple(g.spacing)} in header (must be > 0)"
        )
    if not (np.all(np.isfinite(g.origin)) and np.all(np.isfinite(g.direction))):
        raise ScanReadError(f"{scan.source}: non-finite origin or direction in header")
    if tuple(scan.array.shape[: g.ndim]) != tuple(g.size):
        raise ScanReadError(
            f"{scan.source}: pixel data shape {scan.array.shape} does not match header {g.size}"
        )


def fill_nonfinite(scan: Scan) -> Scan:
    """Replace NaN/inf voxels by the minimum finite value (background in practice), with a warning.

    Research pipelines often write NaN outside a brain mask; erroring would make such files unusable,
    and keeping NaN would poison normalisation later. The count is kept in ``meta["nonfinite_voxels_filled"]``.
    """
    array = scan.array
    if not np.issubdtype(array.dtype, np.floating):
        return scan
    finite = np.isfinite(array)
    if finite.all():
        return scan
    if not finite.any():
        raise ScanReadError(f"{scan.source}: every voxel is NaN or infinite")
    bad = int(array.size - np.count_nonzero(finite))
    fill = float(array[finite].min())
    scan.array = np.where(finite, array, array.dtype.type(fill))
    scan.meta["nonfinite_voxels_filled"] = bad
    warnings.warn(
        f"{scan.source}: {bad} non-finite voxels (NaN/inf) replaced by the minimum finite value {fill:g}",
        ScanReadWarning,
        stacklevel=2,
    )
    return scan


def finish_scan(scan: Scan) -> Scan:
    """Checks every reader's result passes through (geometry validity, non-finite voxels)."""
    validate_geometry(scan)
    return fill_nonfinite(scan)
