"""``read_scan``: one entry point for every input a user can give, dispatching to the format readers.

Sources: a file (NIfTI, NRRD, MetaImage, PNG/JPEG/TIFF/BMP, a DICOM file, a .zip), a folder, or a list of
files. Folders, zips and file lists are classified the same way: any DICOM image files make it a DICOM
source (other files, e.g. JPEG thumbnails on a CD, are ignored); otherwise exactly one image file is read.
Every result passes ``checks.finish_scan`` (valid spacing, no NaN voxels).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import ScanReadError, UnsupportedFormatError
from medseg.io.archive import ArchiveLimits, ExtractedArchive, extracted_zip
from medseg.io.checks import (
    MAX_IMAGE_PIXELS,
    MAX_VOXELS,
    Admit,
    ScanReadWarning,
    finish_scan,
    one_line_errors,
    safe_reason,
)
from medseg.io.dicom import (
    MISSING_SLICES_ADVICE,
    DicomSeriesInfo,
    MissingSlicesError,
    choose_series,
    discover_series,
    looks_like_dicom_candidate,
    read_dicom_header,
    read_dicom_series,
)
from medseg.io.formats import (
    COMPANION_SUFFIXES,
    RASTER_FORMATS,
    SUFFIX_FORMATS,
    SUPPORTED_DESCRIPTION,
    VOLUME_FORMATS,
    ScanFormat,
    detect_format,
    full_suffix,
)
from medseg.io.geometry import Geometry, Scan
from medseg.io.raster import read_raster
from medseg.io.volume import UPLOAD_FORMS, read_volume

PathLike = str | os.PathLike[str]
ScanSource = PathLike | Sequence[PathLike]

_JUNK_NAMES = frozenset({"DICOMDIR", "Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class _Caps:
    max_voxels: int
    max_pixels: int
    archive_limits: ArchiveLimits | None
    untrusted: bool = False  # an upload: only self-contained files (see read_scan)
    admit: Admit | None = None  # asked before decoding (see read_scan)
    allow_missing_slices: bool = False  # read DICOM series with gaps or unreadable slices (see read_scan)


@one_line_errors
def read_scan(
    source: ScanSource,
    series_uid: str | None = None,
    *,
    max_voxels: int = MAX_VOXELS,
    max_pixels: int = MAX_IMAGE_PIXELS,
    archive_limits: ArchiveLimits | None = None,
    untrusted: bool = False,
    admit: Admit | None = None,
    allow_missing_slices: bool = False,
) -> Scan:
    """Read a scan with its geometry.

    ``source``: a file, a folder, a ``.zip``, or a list of files (a DICOM series).
    ``series_uid``: which DICOM series to read when the source holds several (see ``list_dicom_series``);
    with several series and no ``series_uid`` a ``MultipleSeriesError`` lists them.

    Returns a Scan with ``array`` ``(y, x)`` / ``(y, x, 3)`` for 2D images and ``(z, y, x)`` for volumes
    (CT in Hounsfield units). ``meta["format"]`` names the format; DICOM adds ``dicom_files``,
    ``dicom_datasets`` (headers without pixels, stack order), ``modality`` and more (see
    ``medseg.io.dicom.read_dicom_series``). For a zip, ``dicom_files`` are member paths inside the archive
    (the extraction was temporary) and ``meta["archive"]`` is the zip's name; use ``extracted_zip`` when
    the files themselves are needed.

    ``untrusted``: the source is an upload from someone else (the service, the web app). Only data stored inside
    the files is read: MetaImage with ``ElementDataFile = LOCAL``, NRRD with attached data, NIfTI, DICOM, raster
    images; detached ``.mhd``/``.nhdr``/``.raw`` files and headers that point at other files are refused
    (``UnsupportedFormatError``), without looking whether the file they name exists. Local files named by
    the user (``untrusted=False``) may reference data files in their own folder.

    ``max_voxels``/``max_pixels``: caps on the samples a header announces (volumes and DICOM series / 2D
    images), checked before anything is decoded (``ScanTooLargeError``). ``admit(shape, samples_per_pixel)``:
    called once the cap passed, still before decoding; it may raise to refuse (the service checks the shape
    and reserves memory for the scan).

    A DICOM series with gaps between slice positions, or beside ``.dcm`` files that cannot be parsed, raises
    ``MissingSlicesError``: stacked anyway, the mask would be shifted against the anatomy. With
    ``allow_missing_slices`` it is read (the unreadable files left out) with a ``ScanReadWarning``.

    Raises ``ScanReadError`` (unreadable, corrupt, truncated, too large), ``UnsupportedFormatError``
    (4D, vector volumes, unknown formats) or ``UnsafeArchiveError``, each naming the file and the problem.
    """
    caps = _Caps(max_voxels, max_pixels, archive_limits, untrusted, admit, allow_missing_slices)
    return finish_scan(_read_source(source, series_uid, caps, as_mask=False))


@one_line_errors
def read_mask(
    source: ScanSource,
    *,
    max_voxels: int = MAX_VOXELS,
    max_pixels: int = MAX_IMAGE_PIXELS,
    archive_limits: ArchiveLimits | None = None,
    untrusted: bool = False,
    admit: Admit | None = None,
) -> Scan:
    """Read a label map: ``(y, x)`` or ``(z, y, x)`` of non-negative integers, values as stored.

    Differences from ``read_scan``: a palette PNG gives its palette indices (not colours); an RGB(A) mask whose
    channels are equal becomes one channel; a float file must hold whole numbers and is cast to an integer
    type. A colour mask with distinct channels raises ``UnsupportedFormatError``. ``untrusted``, ``admit``: as in
    ``read_scan``.
    """
    caps = _Caps(max_voxels, max_pixels, archive_limits, untrusted, admit)
    scan = finish_scan(_read_source(source, None, caps, as_mask=True))
    array = scan.array
    if array.ndim == scan.spatial_ndim + 1:
        colour = array[..., :3] if array.shape[-1] >= 3 else array
        if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
            raise UnsupportedFormatError(
                f"{scan.source}: colour mask (channels differ); convert it to a label map of class indices"
            )
        array = colour[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.mod(array, 1) == 0):
            raise ScanReadError(f"{scan.source}: mask holds non-integer values (is it a probability map?)")
        array = array.astype(np.int64)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.size and int(array.min()) < 0:
        raise ScanReadError(f"{scan.source}: mask holds negative labels (min {int(array.min())})")
    scan.array = _smallest_unsigned(array)
    return scan


@one_line_errors
def list_dicom_series(
    source: ScanSource, *, archive_limits: ArchiveLimits | None = None
) -> list[DicomSeriesInfo]:
    """The DICOM image series in a folder, a list of files, a single file or a ``.zip`` (possibly empty).

    Each ``DicomSeriesInfo`` gives ``uid`` (pass it to ``read_scan(series_uid=...)``), description, modality,
    number of slices and in-plane size; none carries patient identifiers.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        _require_exists(path)
        if path.is_file() and detect_format(path) == ScanFormat.zip:
            with extracted_zip(path, archive_limits) as archive:
                series, _ = discover_series(_dicom_candidates(archive.files))
                return [_info_with_member_paths(s.info(), archive) for s in series]
        files = _list_folder(path) if path.is_dir() else [path]
    else:
        files = [Path(p) for p in source]
    series, _ = discover_series(_dicom_candidates(files))
    return [s.info() for s in series]


def is_dicom_folder(path: PathLike, *, recursive: bool = True) -> bool:
    """True when ``path`` is a folder holding at least one DICOM image file (stops at the first one found).

    ``recursive=False`` looks at the folder's own files only: a batch folder with DICOM series in
    sub-folders beside other scans is not itself one DICOM input.
    """
    folder = Path(path)
    if not folder.is_dir():
        return False
    files = _list_folder(folder) if recursive else sorted(
        f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.name not in _JUNK_NAMES
    )
    return any(read_dicom_header(f) is not None for f in _dicom_candidates(files))


@one_line_errors
def read_probabilities(path: PathLike) -> tuple[np.ndarray, Geometry]:
    """Read what ``write_probabilities`` wrote: ``(C, *spatial)`` float32 probabilities and their Geometry."""
    path = Path(path)
    _require_exists(path)
    if full_suffix(path) == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:  # never unpickle user files
                probs = np.asarray(data["probabilities"], dtype=np.float32)
                geometry = Geometry.from_dict(json.loads(str(data["geometry"])))
        except (OSError, ValueError, KeyError) as e:
            raise ScanReadError(
                f"{path.name}: not a medseg probability file ({safe_reason(e, path)})"
            ) from None
        return probs, geometry
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ScanReadError(f"{path.name}: cannot read probabilities ({safe_reason(e, path)})") from None
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    probs = np.moveaxis(array, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else array[None]
    return probs, Geometry.from_sitk(image)


# ------------------------------------------------------------------------------------------- dispatch


def _read_source(source: ScanSource, series_uid: str | None, caps: _Caps, *, as_mask: bool) -> Scan:
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(p) for p in source]
        if not paths:
            raise ScanReadError("no files given")
        if len(paths) == 1:
            return _read_source(paths[0], series_uid, caps, as_mask=as_mask)
        for p in paths:
            _require_exists(p)
        return _read_file_set(
            paths, f"{paths[0].name} (+{len(paths) - 1} files)", series_uid, caps, as_mask=as_mask
        )

    path = Path(source)
    _require_exists(path)
    if path.is_dir():
        files = _list_folder(path)
        if not files:
            raise ScanReadError(f"{path.name}: folder is empty")
        return _read_file_set(files, path.name, series_uid, caps, as_mask=as_mask)

    fmt = detect_format(path)
    if fmt == ScanFormat.zip:
        return _read_zip(path, series_uid, caps, as_mask=as_mask)
    if fmt == ScanFormat.dicom:
        series, _ = discover_series([path])
        if not series:
            raise ScanReadError(f"{path.name}: not a readable DICOM image file")
        return read_dicom_series(
            choose_series(series, series_uid, path.name), path.name, max_voxels=caps.max_voxels, admit=caps.admit,
            allow_missing_slices=caps.allow_missing_slices,
        )
    if series_uid is not None:
        raise ScanReadError(f"{path.name}: series_uid {series_uid!r} given, but this is not a DICOM source")
    return _read_image_file(path, caps, as_mask=as_mask)


def _read_image_file(path: Path, caps: _Caps, *, as_mask: bool) -> Scan:
    fmt = detect_format(path)
    if fmt in RASTER_FORMATS:
        return read_raster(path, max_pixels=caps.max_pixels, as_mask=as_mask, admit=caps.admit)
    if fmt in VOLUME_FORMATS:
        return read_volume(path, max_voxels=caps.max_voxels, untrusted=caps.untrusted, admit=caps.admit)
    suffix = full_suffix(path) or "(none)"
    if suffix in COMPANION_SUFFIXES:
        wanted = f"upload one self-contained file: {UPLOAD_FORMS}" if caps.untrusted else "read its header instead"
        raise UnsupportedFormatError(f"{path.name}: {suffix} holds the voxels of a detached header; {wanted}")
    raise UnsupportedFormatError(
        f"{path.name}: unsupported file type {suffix!r}; medseg reads {SUPPORTED_DESCRIPTION}"
    )


def _read_zip(path: Path, series_uid: str | None, caps: _Caps, *, as_mask: bool) -> Scan:
    with extracted_zip(path, caps.archive_limits) as archive:
        if not archive.files and not archive.skipped_archives:
            raise ScanReadError(f"{path.name}: archive is empty")
        scan = _read_file_set(
            archive.files,
            path.name,
            series_uid,
            caps,
            as_mask=as_mask,
            skipped_archives=archive.skipped_archives,
        )
        scan.source = path.name
        scan.meta["archive"] = path.name
        if "dicom_files" in scan.meta:
            # The temporary folder disappears with this block; keep paths that still mean something.
            scan.meta["dicom_files"] = [archive.member_name(p) for p in scan.meta["dicom_files"]]
        return scan


def _read_file_set(
    files: list[Path],
    name: str,
    series_uid: str | None,
    caps: _Caps,
    *,
    as_mask: bool,
    skipped_archives: Sequence[str] = (),
) -> Scan:
    """Classify the files of a folder / zip / list: a DICOM series if there is one, else the one image file."""
    images = [f for f in files if SUFFIX_FORMATS.get(full_suffix(f)) in VOLUME_FORMATS | RASTER_FORMATS]
    image_set = set(images)
    series, unreadable = discover_series(_dicom_candidates([f for f in files if f not in image_set]))
    if series:
        if unreadable:
            what = f"{len(unreadable)} .dcm file(s) could not be parsed"
            if not caps.allow_missing_slices:
                raise MissingSlicesError(
                    f"{name}: {what} (e.g. {unreadable[0].name}), a slice of the series perhaps; {MISSING_SLICES_ADVICE}"
                )
            warnings.warn(
                f"{name}: {what} and were skipped (e.g. {unreadable[0].name})", ScanReadWarning, stacklevel=2
            )
        return read_dicom_series(
            choose_series(series, series_uid, name), name, max_voxels=caps.max_voxels, admit=caps.admit,
            allow_missing_slices=caps.allow_missing_slices,
        )
    if series_uid is not None:
        raise ScanReadError(f"{name}: series_uid {series_uid!r} given, but no DICOM series was found")
    if len(images) == 1:
        return _read_image_file(images[0], caps, as_mask=as_mask)
    if len(images) > 1:
        examples = ", ".join(p.name for p in images[:3])
        raise UnsupportedFormatError(
            f"{name}: {len(images)} image files and no DICOM series ({examples}, ...); give one file at a time"
        )
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} .dcm file(s) could not be parsed (e.g. {unreadable[0].name})")
    if skipped_archives:
        problems.append(f"nested archive(s) are not opened ({', '.join(skipped_archives[:3])})")
    detail = "; ".join(problems) if problems else f"{len(files)} file(s) checked"
    raise ScanReadError(f"{name}: no DICOM series or image file found ({detail})")


def _dicom_candidates(files: Sequence[Path]) -> list[Path]:
    return [f for f in files if full_suffix(f) not in COMPANION_SUFFIXES and looks_like_dicom_candidate(f)]


def _list_folder(folder: Path) -> list[Path]:
    """Regular files below ``folder`` (recursively: DICOM exports nest folders), without hidden/OS clutter."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel_parts = path.relative_to(folder).parts
        if any(part.startswith(".") or part == "__MACOSX" for part in rel_parts):
            continue
        if path.name in _JUNK_NAMES or not path.is_file():
            continue
        files.append(path)
    return files


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise ScanReadError(f"{path.name or path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):  # a FIFO or device would block or never end
        raise ScanReadError(f"{path.name or path}: not a regular file or folder")


def _info_with_member_paths(info: DicomSeriesInfo, archive: ExtractedArchive) -> DicomSeriesInfo:
    return replace(info, files=tuple(archive.member_name(p) for p in info.files))


def _smallest_unsigned(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.uint64, copy=False)
