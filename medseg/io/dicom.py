"""DICOM series: find them (pydicom headers), check the slice stack, read pixels (numpy or SimpleITK).

pydicom reads headers only (``stop_before_pixels``) to group files by SeriesInstanceUID and order slices by
their position along the slice normal. Uncompressed stacks (most CT/MR exports) are then decoded by the same
pydicom read that checks each file's pixel data, so each file's pixels are read once; compressed transfer
syntaxes such as JPEG 2000 go to SimpleITK's ImageSeriesReader (GDCM) in that order. Both apply Rescale
Slope/Intercept, so CT comes back in Hounsfield units, and both give the same array, dtype and geometry
(tests/io/test_io_dicom.py compares them). The headers stay in ``Scan.meta["dicom_datasets"]`` (no pixel data), which is
what a DICOM SEG writer needs, so nothing depends on the files surviving (e.g. a zip's temporary folder).
"""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from medseg.errors import ScanReadError, UnsupportedFormatError
from medseg.io.checks import MAX_VOXELS, Admit, ScanReadWarning, check_pixel_count, safe_reason
from medseg.io.formats import SUFFIX_FORMATS, ScanFormat, full_suffix, has_dicom_magic
from medseg.io.geometry import Geometry, Scan

# Objects that are DICOM but not images to segment.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "SR", "KO", "REG", "DOC"})

# Slice-gap tolerances: relative to the median gap, plus an absolute floor for rounding in headers (mm).
MISSING_SLICE_FACTOR = 1.5
UNIFORM_SPACING_TOLERANCE = 0.01
SPACING_ABS_TOLERANCE_MM = 1e-3
_UNDEFINED_LENGTH = 0xFFFFFFFF
_VALID_VRS = frozenset(str(vr) for vr in pydicom.valuerep.VR)


class MissingSlicesError(ScanReadError):
    """A DICOM series has gaps or unreadable slice files: stacked anyway, the mask would be shifted against the
    anatomy (positions and volumes wrong). ``read_scan(..., allow_missing_slices=True)`` reads it on purpose."""


MISSING_SLICES_ADVICE = (
    "segmented as one volume, the slices after a gap would be shifted; supply the whole series, or allow missing "
    "slices explicitly (allow_missing_slices, medseg predict --allow-missing-slices)"
)


class MultipleSeriesError(ScanReadError):
    """Several DICOM series were found and none was chosen; ``series`` lists them for the caller."""

    def __init__(self, message: str, series: list[DicomSeriesInfo]):
        super().__init__(message)
        self.series = series


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One DICOM series found in a source. Holds no patient identifiers (safe to log and show).

    ``uid`` is the SeriesInstanceUID ("" when the files carry none) and is what ``read_scan(series_uid=...)``
    takes. ``size`` is the in-plane ``(rows, columns)``. ``files`` are the slice files in stack order (member
    paths inside the archive for a zip source); they are left out of ``repr`` because folder names may
    name patients.
    """

    uid: str
    description: str
    modality: str
    num_slices: int
    size: tuple[int, int]
    series_number: int | None = None
    acquired: str = ""  # "2022-12-08 14:05:39" from SeriesDate/SeriesTime (else StudyDate/StudyTime); "" if none
    files: tuple[Path, ...] = field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        uid = self.uid or "'' (no SeriesInstanceUID)"
        rows, cols = self.size
        return (
            f"{uid}: {self.modality or '?'} {self.description!r}, {self.num_slices} slices of {rows}x{cols}"
        )


@dataclass
class _Series:
    uid: str
    files: list[Path]
    datasets: list[Dataset]

    def info(self) -> DicomSeriesInfo:
        first = self.datasets[0]
        number = first.get("SeriesNumber")
        return DicomSeriesInfo(
            uid=self.uid,
            description=str(first.get("SeriesDescription", "") or ""),
            modality=str(first.get("Modality", "") or ""),
            num_slices=len(self.files),
            size=(int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)),
            series_number=int(number) if number not in (None, "") else None,
            acquired=series_datetime(first),
            files=tuple(self.files),
        )


def _dicom_date(value: object) -> str:
    """DICOM DA (``YYYYMMDD``, or ACR-NEMA ``YYYY.MM.DD``) as ``YYYY-MM-DD``; "" when it does not parse."""
    digits = str(value or "").strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return ""
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return ""


def _dicom_time(value: object) -> str:
    """DICOM TM (``HH``, ``HHMM``, ``HHMMSS[.ffffff]``, or ACR-NEMA ``HH:MM:SS``) as ``HH:MM[:SS]``; "" otherwise."""
    text = str(value or "").strip().replace(":", "").split(".")[0]
    if len(text) not in (2, 4, 6) or not text.isdigit():
        return ""
    parts = [int(text[i:i + 2]) for i in range(0, len(text), 2)]
    if parts[0] > 23 or any(p > 59 for p in parts[1:]):
        return ""
    if len(parts) == 1:
        parts.append(0)
    return ":".join(f"{p:02d}" for p in parts)


def series_datetime(ds: Dataset) -> str:
    """When the series was acquired, as a clinician tells two series of one study apart: SeriesDate (+ SeriesTime),
    else StudyDate (+ StudyTime); ``YYYY-MM-DD[ HH:MM[:SS]]``, "" when the header states no valid date. A time is
    shown only beside its own date (a study's time next to a series' date would be a time nobody recorded)."""
    for date_key, time_key in (("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        try:
            date, clock = _dicom_date(ds.get(date_key)), _dicom_time(ds.get(time_key))
        except Exception:  # noqa: BLE001 - a damaged element (unknown VR) only costs the label its date
            continue
        if date:
            return f"{date} {clock}" if clock else date
    return ""


def looks_like_dicom_candidate(path: Path) -> bool:
    """Files worth a pydicom header read: DICOM suffixes, unknown suffixes (``IM0001``, ``1.2.3.4``) and
    anything with the ``DICM`` magic. Known non-DICOM formats are skipped cheaply."""
    fmt = SUFFIX_FORMATS.get(full_suffix(path))
    return fmt is None or fmt == ScanFormat.dicom or has_dicom_magic(path)


def read_dicom_header(path: Path) -> Dataset | None:
    """The header of an image-bearing DICOM file, or None for anything else (non-DICOM, SR, DICOMDIR...)."""
    # Only files named like DICOM are forced: some writers omit the 128-byte preamble.
    force = SUFFIX_FORMATS.get(full_suffix(path)) == ScanFormat.dicom
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=force)
    except Exception:  # anything pydicom cannot parse is "not a DICOM image" to us
        return None
    try:
        if "Rows" not in ds or "Columns" not in ds:
            return None
        if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            return None
        _check_header_values(ds)
    except Exception:  # noqa: BLE001 - a value medseg relies on does not parse: a damaged header
        return None
    return ds


def _check_header_values(ds: Dataset) -> None:
    """Raise (ValueError, TypeError...) unless every header value medseg interprets parses.

    pydicom converts IS/DS strings lazily, on first access; a damaged header (bit flips found by fuzzing:
    ``'%766.5'`` in ImagePositionPatient, a garbled transfer syntax UID) would otherwise fail deep inside
    series sorting or stacking with a bare ValueError. Checked once here, such a file is "unreadable".
    """
    int(ds.Rows), int(ds.Columns)
    for keyword in ("SeriesInstanceUID", "SeriesDescription", "Modality", "PhotometricInterpretation",
                    "SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        str(ds.get(keyword, ""))  # an unknown VR (a flipped bit in the VR letters) raises here
    for keyword in ("SamplesPerPixel", "NumberOfFrames", "BitsAllocated", "SeriesNumber", "InstanceNumber"):
        value = ds.get(keyword)
        if value not in (None, ""):
            int(value)
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value not in (None, ""):
            float(value)
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient"):
        value = ds.get(keyword)
        if value is not None:
            np.asarray(value, dtype=float)
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is not None and not pydicom.uid.UID(syntax).is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax {syntax!r}")


def discover_series(files: Iterable[Path]) -> tuple[list[_Series], list[Path]]:
    """Group DICOM image files by SeriesInstanceUID, slices in stack order.

    Returns ``(series, unreadable)`` where ``unreadable`` are files named ``.dcm`` that pydicom could not parse.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    unreadable: list[Path] = []
    for path in files:
        ds = read_dicom_header(path)
        if ds is None:
            if SUFFIX_FORMATS.get(full_suffix(path)) == ScanFormat.dicom:
                unreadable.append(path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append((path, ds))
    series = []
    for uid, members in groups.items():
        members.sort(key=lambda m: _stack_sort_key(m[1], m[0]))
        series.append(_Series(uid=uid, files=[m[0] for m in members], datasets=[m[1] for m in members]))
    series.sort(key=lambda s: (s.info().series_number or 0, s.info().description, s.uid))
    return series, unreadable


def _slice_normal(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    return np.cross(row, col)


def _position_along_normal(ds: Dataset, normal: np.ndarray) -> float | None:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        return None
    return float(np.dot(np.asarray(ipp, dtype=float), normal))


def _stack_sort_key(ds: Dataset, path: Path) -> tuple[float, float, str]:
    normal = _slice_normal(ds)
    position = _position_along_normal(ds, normal) if normal is not None else None
    instance = ds.get("InstanceNumber")
    return (
        position if position is not None else math.inf,
        float(instance) if instance not in (None, "") else math.inf,
        path.name,
    )


def choose_series(series: list[_Series], series_uid: str | None, name: str) -> _Series:
    """The requested series, the only one, or an error listing the choices."""
    if not series:
        raise ScanReadError(f"{name}: no DICOM image files found")
    listing = "; ".join(str(s.info()) for s in series)
    if series_uid is None:
        if len(series) == 1:
            return series[0]
        raise MultipleSeriesError(
            f"{name}: {len(series)} DICOM series found; choose one with series_uid= ({listing})",
            [s.info() for s in series],
        )
    for s in series:
        if s.uid == series_uid:
            return s
    raise ScanReadError(f"{name}: no DICOM series with SeriesInstanceUID {series_uid!r} (found: {listing})")


def read_dicom_series(
    series: _Series, name: str, *, max_voxels: int = MAX_VOXELS, admit: Admit | None = None,
    allow_missing_slices: bool = False,
) -> Scan:
    """Decode one series into a Scan: ``(z, y, x)`` for several slices, ``(y, x)`` / ``(y, x, 3)`` for one.

    ``meta``: ``dicom_files`` (stack order), ``dicom_datasets`` (headers, same order), ``modality``,
    ``series_uid``, ``series_description``, ``slice_positions_mm`` (along the slice normal), ``window``
    ((width, level) of the first slice's VOI window, when present), ``photometric_interpretation``.
    Missing slices (gaps in the positions) raise ``MissingSlicesError`` unless ``allow_missing_slices``, which
    reads them with a ``ScanReadWarning`` (the volume then uses the average spacing); uneven spacing and gantry
    tilt are reported with ``ScanReadWarning``.
    Values are the rescaled stored values (HU for CT); MONOCHROME1 images (bright = low) are not inverted,
    ``meta["photometric_interpretation"]`` says which convention applies.
    """
    datasets = series.datasets
    first = datasets[0]
    frames = max(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
    if frames > 1:
        raise UnsupportedFormatError(
            f"{name}: multi-frame DICOM ({frames} frames in one file) is not supported; export a series of "
            "single-frame files or NIfTI"
        )
    rows, cols = int(first.Rows), int(first.Columns)
    samples = int(first.get("SamplesPerPixel", 1) or 1)
    check_pixel_count(name, (len(datasets), rows, cols), samples, max_voxels, admit)

    positions: list[float] = []
    if len(datasets) > 1:
        if samples > 1:
            raise UnsupportedFormatError(
                f"{name}: colour DICOM series ({samples} samples per pixel) is not supported"
            )
        positions = _check_stack(datasets, name, allow_missing_slices)

    native = _native_stack_dtype(datasets) if len(datasets) > 1 and samples == 1 else None
    # Uncompressed slices: the one pydicom read that checks each file's pixel data also decodes it (numpy), so
    # every file's pixels are read once; compressed ones are checked here and decoded by GDCM below.
    array = _check_pixel_data_complete(series.files, name, native, (rows, cols))
    if array is not None:
        return _scan(array, _stack_geometry(datasets, rows, cols), name, series, datasets, positions)
    files = [str(p) for p in series.files]
    try:
        if len(files) == 1:
            image = sitk.ReadImage(files[0])
            if image.GetDimension() == 3 and image.GetSize()[2] == 1:
                image = image[:, :, 0]  # one slice: a 2D scan (its 3D position stays in the header)
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            if _needs_float_output(datasets):
                reader.SetOutputPixelType(sitk.sitkFloat32)
            image = reader.Execute()
    except RuntimeError as e:
        culprit = _first_undecodable(series.files) if len(files) > 1 else series.files[0]
        which = culprit.name if culprit is not None else "a slice"
        raise ScanReadError(
            f"{name}: cannot decode {which}: corrupt or truncated DICOM pixel data ({safe_reason(e, *series.files)})"
        ) from None

    array = sitk.GetArrayFromImage(image)
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # HU need no double precision; halves memory
    return _scan(array, Geometry.from_sitk(image), name, series, datasets, positions)


def _scan(array: np.ndarray, geometry: Geometry, name: str, series: _Series, datasets: Sequence[Dataset],
          positions: list[float]) -> Scan:
    first = datasets[0]
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": str(first.get("Modality", "") or ""),
        "series_uid": series.uid,
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "dicom_files": list(series.files),
        "dicom_datasets": list(datasets),
        "photometric_interpretation": str(first.get("PhotometricInterpretation", "") or ""),
    }
    if positions:
        meta["slice_positions_mm"] = positions
    window = _first_window(first)
    if window is not None:
        meta["window"] = window
    return Scan(array=array, geometry=geometry, source=name, meta=meta)


def _native_stack_dtype(datasets: Sequence[Dataset]) -> np.dtype | None:
    """The dtype GDCM would give an uncompressed, monochrome slice stack, or None when GDCM must decode it
    (a compressed or unusual transfer syntax, odd bit depths).

    As GDCM's rescaler: stored values unchanged without a rescale; with an integral slope/intercept the
    smallest signed integer type holding ``stored * slope + intercept`` over the stored range; float32 when
    the rescale is fractional or differs between slices (`_needs_float_output`).
    """
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        syntax = pydicom.uid.UID(meta.get("TransferSyntaxUID", "")) if meta is not None else None
        if syntax not in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
            return None
    first = datasets[0]
    bits_allocated, bits_stored = int(first.get("BitsAllocated", 16)), int(first.get("BitsStored", 16) or 16)
    if bits_allocated not in (8, 16) or any(int(ds.get("BitsAllocated", 16)) != bits_allocated for ds in datasets):
        return None
    signed = int(first.get("PixelRepresentation", 0) or 0) == 1
    if any((int(ds.get("PixelRepresentation", 0) or 0) == 1) != signed for ds in datasets):
        return None
    if _needs_float_output(datasets):
        return np.dtype(np.float32)
    slope = float(first.get("RescaleSlope", 1) or 1)
    intercept = float(first.get("RescaleIntercept", 0) or 0)
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if slope == 1 and intercept == 0:
        return np.dtype(f"{'int' if signed else 'uint'}{bits_allocated}")
    ends = sorted((low * slope + intercept, high * slope + intercept))
    for candidate in (np.int8, np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= ends[0] and ends[1] <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def _stack_geometry(datasets: Sequence[Dataset], rows: int, cols: int) -> Geometry:
    """The volume geometry of a checked slice stack (sorted ascending along the normal), as ITK's
    ImageSeriesReader computes it: origin at the first slice, direction (row, column, normal) cosines,
    in-plane spacing from PixelSpacing (row spacing = y), slice spacing the mean distance between slices."""
    first, last = datasets[0], datasets[-1]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    spacing_y, spacing_x = (float(v) for v in (first.get("PixelSpacing") or (1.0, 1.0)))
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    span = float(np.linalg.norm(np.asarray(last.ImagePositionPatient, dtype=float) - origin))
    spacing_z = span / (len(datasets) - 1) if span > 0 else 1.0
    direction = np.stack([row, col, normal], axis=1)  # columns: the axes of x, y, z in patient space
    return Geometry(spacing=(spacing_x, spacing_y, spacing_z), origin=tuple(float(v) for v in origin),
                    direction=tuple(float(v) for v in direction.ravel()), size=(len(datasets), rows, cols))


def _check_stack(datasets: Sequence[Dataset], name: str, allow_missing_slices: bool = False) -> list[float]:
    """Positions along the normal; errors for stacks that cannot form one volume and (unless allowed) for gaps."""
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise UnsupportedFormatError(f"{name}: slices of different sizes in one series ({sorted(shapes)})")
    normals = [_slice_normal(ds) for ds in datasets]
    if any(n is None for n in normals) or any(ds.get("ImagePositionPatient") is None for ds in datasets):
        raise UnsupportedFormatError(
            f"{name}: slices lack ImagePositionPatient/ImageOrientationPatient, so they cannot be stacked"
        )
    normal = normals[0]
    if any(not np.allclose(n, normal, atol=1e-4) for n in normals):
        raise UnsupportedFormatError(
            f"{name}: slices with different orientations in one series (a localizer mixed in?)"
        )
    positions = [float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)) for ds in datasets]
    gaps = np.diff(positions)  # sorted ascending by discover_series
    duplicates = int(np.sum(gaps < SPACING_ABS_TOLERANCE_MM))
    if duplicates:
        raise UnsupportedFormatError(
            f"{name}: {duplicates + 1} slices share a position (several echoes/phases/acquisitions in one "
            "series?); such 4D series are not supported"
        )
    median = float(np.median(gaps))
    tolerance = max(SPACING_ABS_TOLERANCE_MM, UNIFORM_SPACING_TOLERANCE * median)
    missing = np.flatnonzero(gaps > MISSING_SLICE_FACTOR * median)
    if missing.size:
        where = ", ".join(f"{gaps[i]:.2f} mm after slice {i}" for i in missing[:5])
        count = int(sum(round(gaps[i] / median) - 1 for i in missing))
        if not allow_missing_slices:
            raise MissingSlicesError(
                f"{name}: missing slices: about {count} slice(s) absent (gaps of {where}, expected "
                f"{median:.2f} mm); {MISSING_SLICES_ADVICE}"
            )
        warnings.warn(
            f"{name}: missing slices: about {count} slice(s) absent (gaps of {where}, expected {median:.2f} mm); "
            "the volume's slice spacing is an average, so positions and volumes are approximate",
            ScanReadWarning,
            stacklevel=2,
        )
    elif float(gaps.max() - gaps.min()) > tolerance:
        warnings.warn(
            f"{name}: non-uniform slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm between slices); "
            "the volume uses the average, so positions and volumes are approximate",
            ScanReadWarning,
            stacklevel=2,
        )
    # Gantry tilt: slices stacked along a direction that is not the slice normal (sheared volume).
    first_pos = np.asarray(datasets[0].ImagePositionPatient, dtype=float)
    last_pos = np.asarray(datasets[-1].ImagePositionPatient, dtype=float)
    stack_direction = last_pos - first_pos
    length = float(np.linalg.norm(stack_direction))
    if length > 0 and abs(float(np.dot(stack_direction / length, normal))) < 1 - 1e-4:
        warnings.warn(
            f"{name}: slices are sheared (gantry tilt); the volume's geometry ignores the tilt",
            ScanReadWarning,
            stacklevel=2,
        )
    return positions


def _check_pixel_data_complete(
    files: Sequence[Path], name: str, native: np.dtype | None = None, shape: tuple[int, int] | None = None,
) -> np.ndarray | None:
    """Name the first file whose pixel data is missing or shorter than its header says.

    GDCM's own failure on such a file is slow (seconds per truncated JPEG 2000 slice) and does not say which
    file it was; a full pydicom read (no decoding) finds it in about a millisecond per file. With ``native``
    (an uncompressed stack, see `_native_stack_dtype`) the same read also decodes each slice into the
    returned ``(z, rows, cols)`` volume of that dtype, rescaled; otherwise returns None.
    """
    volume = np.empty((len(files), *shape), dtype=native) if native is not None and shape is not None else None
    for index, path in enumerate(files):
        _check_declared_lengths(path, name)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # pydicom warns "End of file reached..." before dropping the element
            try:
                ds = pydicom.dcmread(path)
                pixels = ds.get("PixelData")  # may raise too: an unknown VR on the element (damaged file)
            except Exception:  # anything pydicom cannot parse past the header is damaged
                ds = pixels = None
        if ds is None or pixels is None:
            raise ScanReadError(f"{name}: {path.name} is truncated or corrupt (no complete pixel data)")
        syntax = pydicom.uid.UID(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian))
        if not syntax.is_transfer_syntax:
            raise UnsupportedFormatError(f"{name}: {path.name} has an unknown transfer syntax")
        if not syntax.is_compressed:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            expected = (
                int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.get("BitsAllocated", 16)) // 8
            )
            if len(pixels) < expected:
                raise ScanReadError(
                    f"{name}: {path.name} is truncated ({len(pixels):,} of {expected:,} bytes of pixel data)"
                )
        if volume is not None:
            _decode_native_slice(ds, path, name, volume[index])
    return volume


def _decode_native_slice(ds: Dataset, path: Path, name: str, out: np.ndarray) -> None:
    """Stored values of an uncompressed slice, rescaled (``stored * slope + intercept``), into ``out``."""
    try:
        stored = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - a header that does not describe its pixel data
        raise ScanReadError(f"{name}: {path.name}: cannot decode the pixel data ({safe_reason(e, path)})") from None
    if stored.shape != out.shape:
        raise UnsupportedFormatError(f"{name}: {path.name}: pixel data of shape {stored.shape}, expected {out.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept == 0:
        out[...] = stored
    elif out.dtype.kind == "f":
        np.multiply(stored, slope, out=out, dtype=np.float32, casting="unsafe")
        out += np.float32(intercept)
    else:
        np.copyto(out, stored.astype(out.dtype) * int(slope) + int(intercept), casting="unsafe")


def _check_declared_lengths(path: Path, name: str) -> None:
    """Refuse a file with an element that claims more bytes than the file holds, or has no valid VR.

    Found by fuzzing (tests/reliability): GDCM allocates an element's declared length before reading it, so a
    38 KB file whose trailing element claims 3 GB made ``SimpleITK.ReadImage`` take 3.2 GB of memory (pydicom
    reads what is there); one flipped bit in a VR (``AE`` -> ``AG``) made GDCM read the value bytes as a 4-byte
    length (1.3 GB). pydicom with ``defer_size`` records every top-level element's VR, length and offset
    without reading large values, which is all this check needs (about a millisecond per file).
    """
    size = path.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, defer_size=1024, force=True)
            raws = [ds.get_item(tag, keep_deferred=True) for tag in ds.keys()]
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                raws += [meta.get_item(tag, keep_deferred=True) for tag in meta.keys()]
        except Exception:  # noqa: BLE001 - unparsable: the full read below reports it
            return
    for raw in raws:
        if not isinstance(raw, RawDataElement):
            continue
        if raw.VR is not None and raw.VR not in _VALID_VRS:
            raise ScanReadError(f"{name}: {path.name} is corrupt (element {raw.tag} has no valid VR)")
        if raw.length != _UNDEFINED_LENGTH and raw.value_tell + raw.length > size:
            raise ScanReadError(
                f"{name}: {path.name} is truncated or corrupt (element {raw.tag} claims {raw.length:,} bytes, "
                f"the file holds {size:,})"
            )


def _first_undecodable(files: Sequence[Path]) -> Path | None:
    """The first file SimpleITK cannot decode alone (only called after a series failed, to name the file)."""
    for path in files:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return path
    return None


def _needs_float_output(datasets: Sequence[Dataset]) -> bool:
    """Float output when rescale differs between slices or is fractional: an integer type would truncate."""
    pairs = {
        (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)) for ds in datasets
    }
    if len(pairs) > 1:
        return True
    slope, intercept = next(iter(pairs))
    return not (float(slope).is_integer() and float(intercept).is_integer())


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (width, center)
