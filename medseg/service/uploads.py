"""Uploaded bytes -> ``Scan``: stored under a neutral name, hashed, read with medseg's readers and caps.

The client's file name may carry patient identifiers (``Doe_John_CT.zip``), so only its suffix is used (to pick
the reader) and the file is stored as ``upload<suffix>``; logs name an upload by its SHA-256. A name without a
known suffix is sniffed by content (zip, DICOM, PNG, JPEG, TIFF, gzip-compressed NIfTI, NIfTI).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from medseg.errors import MedsegError, ScanReadError, UnsupportedFormatError
from medseg.io import MAX_IMAGE_PIXELS, MAX_VOXELS, Scan, read_scan
from medseg.io.checks import Admit
from medseg.io.formats import SUFFIX_FORMATS, full_suffix

CHUNK = 1024 * 1024


class UploadTooLargeError(MedsegError):
    """An upload is larger than the service accepts."""


@dataclass(frozen=True)
class StoredUpload:
    path: Path
    sha256: str
    size: int


def _sniff_suffix(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return ".zip"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ".dcm"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    if head.startswith(b"\x1f\x8b"):  # gzip: the only gzip scan medseg reads is .nii.gz
        return ".nii.gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".nii"
    return None


def upload_suffix(client_name: str | None, head: bytes) -> str:
    """The suffix the upload is stored under: the client's if medseg knows it, else sniffed from ``head``."""
    suffix = full_suffix(client_name or "")
    if suffix in SUFFIX_FORMATS:
        return suffix
    sniffed = _sniff_suffix(head)
    if sniffed is None:
        raise UnsupportedFormatError(
            "upload: unrecognised file type (expected a NIfTI, NRRD, MHA, PNG/JPEG/TIFF/BMP image, a DICOM file "
            "or a .zip of a DICOM series)"
        )
    return sniffed


def store_upload(stream: BinaryIO, client_name: str | None, folder: Path, max_bytes: int) -> StoredUpload:
    """Copy ``stream`` to ``folder/upload<suffix>`` while hashing it; raises ``UploadTooLargeError`` past
    ``max_bytes`` (the request-level cap normally answers first; this one also covers chunked uploads)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".upload", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        head = b""
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                tmp.close()
                tmp_path.unlink(missing_ok=True)
                raise UploadTooLargeError(f"upload: larger than the service's limit of {max_bytes} bytes")
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            digest.update(chunk)
            tmp.write(chunk)
    if size == 0:
        tmp_path.unlink(missing_ok=True)
        raise ScanReadError("upload: the file is empty")
    try:
        suffix = upload_suffix(client_name, head)
    except ScanReadError:
        tmp_path.unlink(missing_ok=True)
        raise
    final = folder / f"upload{suffix}"
    tmp_path.replace(final)
    return StoredUpload(final, digest.hexdigest(), size)


def read_upload(upload: StoredUpload, series_uid: str | None = None, *, max_voxels: int = MAX_VOXELS,
                max_pixels: int = MAX_IMAGE_PIXELS, admit: Admit | None = None,
                allow_missing_slices: bool = False, keep: bool = False) -> Scan:
    """Read a stored upload as a Scan (errors name ``upload<suffix>`` and the problem); the file is removed
    afterwards, since the Scan holds everything prediction needs (DICOM headers included, without pixels),
    unless ``keep`` (the shared job queue: a worker on another machine reads the file again).
    Read in the readers' untrusted mode (only voxel data inside the upload itself), with the service's caps;
    ``admit`` is asked before anything is decoded (see ``read_scan``)."""
    try:
        return read_scan(upload.path, series_uid=series_uid, max_voxels=max_voxels, max_pixels=max_pixels,
                         untrusted=True, admit=admit, allow_missing_slices=allow_missing_slices)
    finally:
        if not keep:
            upload.path.unlink(missing_ok=True)
