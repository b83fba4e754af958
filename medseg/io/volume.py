"""NIfTI, NRRD and MetaImage via SimpleITK: header first (caps, dimensionality), then pixels.

Two gaps in SimpleITK are closed here rather than trusted away:
* a truncated ``.nii``/``.nii.gz`` is read without any error (the missing voxels come back as zeros), so the
  data length is checked against the header before decoding;
* MetaImage/NRRD headers may point their voxel data at any file (``ElementDataFile: /etc/shadow``), and
  SimpleITK follows it. ``medseg.io.headers`` finds the reference as ITK's parsers do; a local file may only
  reference data files in its own folder, and an upload (``untrusted=True``) only data inside itself.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import ScanReadError, UnsupportedFormatError
from medseg.io.checks import MAX_VOXELS, Admit, check_pixel_count, safe_reason
from medseg.io.formats import DETACHED_HEADER_SUFFIXES, ScanFormat, detect_format, full_suffix
from medseg.io.geometry import Geometry, Scan
from medseg.io.headers import metaimage_data_reference, nrrd_data_reference

# Suffixes SimpleITK writes a single self-contained file for (".mhd" would need a second data file).
WRITABLE_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

_COMPLEX_PIXEL_IDS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}
# The one ITK reader for each format: never left to ITK's guess by file name or content.
_IMAGE_IO = {ScanFormat.nifti: "NiftiImageIO", ScanFormat.nrrd: "NrrdImageIO", ScanFormat.metaimage: "MetaImageIO"}
_DATA_REFERENCE_PARSERS = {ScanFormat.metaimage: metaimage_data_reference, ScanFormat.nrrd: nrrd_data_reference}
UPLOAD_FORMS = ".mha (ElementDataFile = LOCAL), .nrrd with attached data, or NIfTI"


def read_volume(
    path: Path, *, max_voxels: int = MAX_VOXELS, untrusted: bool = False, admit: Admit | None = None
) -> Scan:
    """Read a NIfTI/NRRD/MetaImage file.

    Returns a Scan with ``array`` ``(z, y, x)`` for volumes, ``(y, x)`` (or ``(y, x, C)``) for 2D files.
    A 4D file whose 4th axis has length 1 is read as 3D; real 4D+ data and vector volumes raise
    ``UnsupportedFormatError``. Inherited from ITK: a NIfTI volume with a single slice is read as 2D, and
    ITK's NIfTI reader turns NaN voxels into 0 (other formats keep NaN for ``checks.fill_nonfinite``).

    ``admit``: see ``read_scan``. ``untrusted`` (uploads): the voxel data must be inside the file; detached ``.mhd``/``.nhdr`` headers and
    headers that reference other files raise ``UnsupportedFormatError`` whether or not the file exists.
    """
    name = path.name
    fmt = detect_format(path)
    if untrusted and full_suffix(path) in DETACHED_HEADER_SUFFIXES:
        raise UnsupportedFormatError(
            f"{name}: a detached header ({full_suffix(path)} with a separate data file) is not accepted for "
            f"uploads; upload one self-contained file: {UPLOAD_FORMS}"
        )
    if fmt in _DATA_REFERENCE_PARSERS:
        _check_data_location(path, fmt, untrusted)
    if fmt == ScanFormat.nifti:
        _check_nifti_geometry_fields(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if fmt in _IMAGE_IO:
        reader.SetImageIO(_IMAGE_IO[fmt])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ScanReadError(f"{name}: not a readable {fmt} file ({safe_reason(e, path)})") from None

    size_xyz = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    shape = tuple(reversed(size_xyz))  # array order, what users see from numpy
    squeeze_time = len(size_xyz) == 4 and size_xyz[3] == 1
    if len(size_xyz) > 3 and not squeeze_time:
        raise UnsupportedFormatError(
            f"{name}: {len(size_xyz)}D image of shape {shape} (array order) is not supported; "
            "medseg reads 2D images and 3D volumes (split the series into 3D files)"
        )
    spatial_dims = 3 if squeeze_time else len(size_xyz)
    if spatial_dims == 3 and components > 1:
        raise UnsupportedFormatError(
            f"{name}: vector volume ({components} components per voxel, shape {shape[-3:]}) is not supported"
        )
    if reader.GetPixelID() in _COMPLEX_PIXEL_IDS:
        raise UnsupportedFormatError(f"{name}: complex-valued pixels are not supported")
    check_pixel_count(name, shape, components, max_voxels, admit)
    if fmt == ScanFormat.nifti:
        _check_nifti_data_length(path, reader)

    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ScanReadError(f"{name}: corrupt or truncated {fmt} file ({safe_reason(e, path)})") from None
    if squeeze_time:
        image = image[:, :, :, 0]
    array = sitk.GetArrayFromImage(image)
    return Scan(array=array, geometry=Geometry.from_sitk(image), source=name, meta={"format": str(fmt)})


# NIfTI-1 / NIfTI-2 header layouts: (float format, [(field, offset, count)]) for the geometry fields.
_NIFTI_GEOMETRY_LAYOUTS = {
    348: ("f", [("pixdim", 80, 3), ("quatern", 256, 3), ("qoffset", 268, 3), ("srow_x", 280, 4),
                ("srow_y", 296, 4), ("srow_z", 312, 4)]),
    540: ("d", [("pixdim", 112, 3), ("quatern", 352, 3), ("qoffset", 376, 3), ("srow_x", 400, 4),
                ("srow_y", 432, 4), ("srow_z", 464, 4)]),
}


def _check_nifti_geometry_fields(path: Path) -> None:
    """Refuse NaN/inf in a NIfTI header's spacing, quaternion, offsets and affine rows, before ITK sees them.

    Found by fuzzing (tests/reliability): ITK's NIfTI reader never returns from ``ReadImageInformation`` on a
    non-orthogonal sform with an infinite offset (SimpleITK 2.5.7); other non-finite values it silently
    replaces. Such a header is damaged either way.
    """
    try:
        opener = gzip.open if full_suffix(path) == ".nii.gz" else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        return  # unreadable: ITK's own error names the problem
    if len(head) < 348:
        return
    for endian in ("<", ">"):
        (size,) = struct.unpack_from(endian + "i", head, 0)
        if size in _NIFTI_GEOMETRY_LAYOUTS and len(head) >= size:
            break
    else:
        return  # not a NIfTI header layout we know; ITK decides
    fmt, fields = _NIFTI_GEOMETRY_LAYOUTS[size]
    for field_name, offset, count in fields:
        values = struct.unpack_from(f"{endian}{count}{fmt}", head, offset)
        if not all(math.isfinite(v) for v in values):
            raise ScanReadError(
                f"{path.name}: non-finite value in the NIfTI header's {field_name} {values}; the geometry is damaged"
            )


def _check_nifti_data_length(path: Path, reader: sitk.ImageFileReader) -> None:
    """Raise when the file holds fewer voxel bytes than its header promises (SimpleITK would zero-fill)."""
    keys = set(reader.GetMetaDataKeys())
    if not {"vox_offset", "bitpix", "dim[0]"} <= keys:
        return  # not the NIfTI header layout we know; SimpleITK's own checks are all we have
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]
        expected = (
            int(float(reader.GetMetaData("vox_offset")))
            + math.prod(dims) * int(reader.GetMetaData("bitpix")) // 8
        )
    except (ValueError, OverflowError, RuntimeError):  # NaN/inf offset, missing dim[i]: ITK judges the rest
        return
    if full_suffix(path) == ".nii.gz":
        available = _gzip_length_up_to(path, expected)
    else:
        available = path.stat().st_size
    if available < expected:
        raise ScanReadError(
            f"{path.name}: truncated NIfTI file ({available:,} bytes of the {expected:,} its header promises)"
        )


def _gzip_length_up_to(path: Path, limit: int) -> int:
    """Decompressed length of a gzip file, counting no further than ``limit`` bytes (bounded work)."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < limit:
                chunk = f.read(min(1 << 20, limit - total))
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        pass  # a truncated or damaged stream: report what could be decompressed
    return total


def _check_data_location(path: Path, fmt: ScanFormat, untrusted: bool) -> None:
    """Voxel data inside the file always; in other files only for local files, and only files in the
    header's folder (plain names, a ``LIST`` of them, or a ``%d`` pattern of one)."""
    try:
        reference = _DATA_REFERENCE_PARSERS[fmt](path)
    except OSError as e:
        raise ScanReadError(f"{path.name}: cannot open ({safe_reason(e, path)})") from None
    if reference.inline:
        return
    if untrusted:
        # The same answer whether or not the referenced file exists: no probing the server's files.
        raise UnsupportedFormatError(
            f"{path.name}: the header keeps its voxel data in another file ({reference.field}); uploads must "
            f"hold their voxel data inside the file: {UPLOAD_FORMS}"
        )
    for name in reference.names or ("",):
        if not _is_beside(path, name, must_exist=reference.kind != "pattern"):
            shown = re.split(r"[/\\]", name)[-1]
            raise UnsupportedFormatError(
                f"{path.name}: header points its voxel data at {shown!r} elsewhere; only data files in the same "
                "folder (or data inside the file) are accepted"
            )


def _is_beside(header: Path, name: str, *, must_exist: bool) -> bool:
    plain = bool(name) and not re.search(r"[/\\\x00]", name) and name not in (".", "..")
    return plain and (not must_exist or (header.parent / name).is_file())


NIFTI_DESCRIP_BYTES = 80  # the NIfTI-1 header's descrip field


def write_volume(array: np.ndarray, geometry: Geometry, path: Path, *, is_vector: bool = False,
                 notes: str | None = None) -> None:
    """Write ``array`` (spatial axes in array order, plus a trailing channel axis when ``is_vector``)
    with ``geometry`` stamped on, via SimpleITK; the suffix of ``path`` picks the format. ``notes``: a free-text
    header note (ITK_FileNotes: the NIfTI descrip field, 80 bytes, cut there)."""
    if full_suffix(path) not in WRITABLE_VOLUME_SUFFIXES:
        raise ValueError(f"{path.name}: volume output must end with one of {WRITABLE_VOLUME_SUFFIXES}")
    spatial = array.shape[:-1] if is_vector else array.shape
    if tuple(spatial) != tuple(geometry.size):
        raise ValueError(
            f"array spatial shape {tuple(spatial)} does not match the geometry size {geometry.size}"
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
    geometry.apply_to_sitk(image)
    if notes is not None:
        image.SetMetaData("ITK_FileNotes", notes.encode()[:NIFTI_DESCRIP_BYTES].decode(errors="ignore"))
    # .nii.gz compresses by its name; NRRD/MHA only when asked.
    sitk.WriteImage(image, str(path), useCompression=True)
