"""Uploaded bytes -> ``Scan`` (and ground-truth label maps), through ``medseg.io`` only.

Uploads live in memory (Streamlit's ``UploadedFile``) and, while a session looks at them, in the session's private
folder (``app.session_files``: deleted with a new upload, when the session ends, or by the janitor when the
session vanishes): SimpleITK and pydicom read from disk. Staged files get neutral names (``scan.nii.gz``,
``00003.dcm``): a file name may name a patient, and nothing on disk should. Messages name the uploaded files.
A zip stays one file; the readers extract it into a private temporary folder for the length of one read.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from app.audit import sha256_of
from app.settings import AppSettings
from medseg.errors import MedsegError, ScanReadError
from medseg.io import (
    DicomSeriesInfo,
    Scan,
    collect_read_warnings,
    list_dicom_series,
    read_mask,
    read_scan,
)
from medseg.io.formats import COMPANION_SUFFIXES, SUFFIX_FORMATS, UPLOAD_EXTENSIONS, full_suffix

# Self-contained files only: a detached .mhd/.raw pair is refused by the readers' untrusted mode anyway.
SCAN_TYPES = UPLOAD_EXTENSIONS
MASK_TYPES = ("nii", "gz", "nrrd", "mha", "png", "tif", "tiff", "bmp")


class UploadError(MedsegError):
    """An upload that cannot be used as given (too large, mixed kinds of files)."""


@dataclass(frozen=True)
class UploadedBytes:
    """The uploaded files, in memory. ``sha256`` identifies the content (order and names do not matter)."""

    files: tuple[tuple[str, bytes], ...]
    sha256: str

    @classmethod
    def from_files(cls, files: list[tuple[str, bytes]]) -> UploadedBytes:
        ordered = tuple(sorted(files, key=lambda f: (sha256_of([f[1]]), f[0])))
        return cls(ordered, sha256_of(data for _, data in ordered))

    @property
    def total_bytes(self) -> int:
        return sum(len(data) for _, data in self.files)

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def collect_upload(files: Iterable[Any], settings: AppSettings) -> UploadedBytes:
    """The chosen files (Streamlit ``UploadedFile``s: ``name``, ``size``, ``getvalue()``) as one upload, checking the
    total against the cap file by file, from their sizes, before any is copied: ``UploadError`` at the first file
    that goes past it (Streamlit caps each file; the total across a folder of files is the app's to check)."""
    total, collected = 0, []
    for f in files:
        total += int(f.size)
        if total > settings.upload_bytes:
            raise UploadError(
                f"upload of more than {total / 1024**2:,.0f} MB is above this server's limit of "
                f"{settings.upload_mb:,} MB; upload fewer files"
            )
        collected.append((f.name, f.getvalue()))
    return UploadedBytes.from_files(collected)


def _safe_name(name: str) -> str:
    """The base name of an uploaded file (directory uploads send relative paths; keep none of them)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return base if base not in ("", ".", "..") else "upload"


def _neutral_suffix(name: str) -> str:
    """The suffix a staged copy keeps: a known one picks the reader; anything else (``IM0001``, ``1.2.840.1``)
    is dropped, so no part of a name that is not a format reaches the disk (DICOM is found by content)."""
    suffix = full_suffix(name)
    return suffix if suffix in SUFFIX_FORMATS or suffix in COMPANION_SUFFIXES else ""


class NameMap:
    """Staged (neutral) base names -> the uploaded files' base names, to put back into messages."""

    def __init__(self) -> None:
        self._shown: dict[str, str] = {}

    def add(self, staged: str, uploaded: str) -> str:
        self._shown[staged] = uploaded
        return staged

    def shown(self, text: str) -> str:
        for staged, uploaded in self._shown.items():
            text = re.sub(rf"(?<![\w/]){re.escape(staged)}(?!\w)", lambda _m, u=uploaded: u, text)
        return text

    def renamed(self, error: MedsegError) -> MedsegError:
        """``error`` itself (same type and attributes) with the uploaded names in its message."""
        if error.args and isinstance(error.args[0], str):
            error.args = (self.shown(error.args[0]), *error.args[1:])
        return error


class StagedUpload:
    """The upload written under neutral names into a private folder (``folder``: the session's, see
    ``app.session_files``; None: a fresh temporary one); ``source`` is what ``read_scan`` gets.

    The files are removed by ``close()``, when this object is garbage-collected, when the session's folder is
    swept, or when the interpreter exits.
    """

    def __init__(self, upload: UploadedBytes, settings: AppSettings, folder: Path | None = None):
        if upload.total_bytes > settings.upload_bytes:
            raise UploadError(
                f"upload of {upload.total_bytes / 1024**2:,.0f} MB is above this server's limit of "
                f"{settings.upload_mb:,} MB"
            )
        self.root = Path(tempfile.mkdtemp(prefix="upload-" if folder else "medseg-upload-", dir=folder))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)
        self.upload = upload
        self.names = NameMap()
        try:
            self.source: Path | list[Path] = self._write(upload)
        except BaseException:
            self.close()
            raise

    def _write(self, upload: UploadedBytes) -> Path | list[Path]:
        names = [_safe_name(n) for n, _ in upload.files]
        zips = [n for n in names if n.lower().endswith(".zip")]
        if zips and len(names) > 1:
            raise UploadError(f"{zips[0]}: upload a zip on its own, not together with other files")
        if len(names) == 1:
            path = self.root / self.names.add(f"scan{_neutral_suffix(names[0])}", names[0])
            path.write_bytes(upload.files[0][1])
            return path
        paths = []
        for i, (name, (_, data)) in enumerate(zip(names, upload.files, strict=True)):
            path = self.root / self.names.add(f"{i:05d}{_neutral_suffix(name)}", name)
            path.write_bytes(data)
            paths.append(path)
        return paths

    @property
    def alive(self) -> bool:
        """False once the files are gone (closed, or swept after the session looked ended)."""
        return self._finalizer.alive and self.root.is_dir()

    @property
    def upload_name(self) -> str:
        return _safe_name(self.upload.files[0][0]) if len(self.upload.files) == 1 else f"{len(self.upload.files)} files"

    def dicom_series(self, settings: AppSettings) -> list[DicomSeriesInfo]:
        try:
            return list_dicom_series(self.source, archive_limits=settings.archive_limits)
        except MedsegError as e:
            raise self.names.renamed(e) from None

    def close(self) -> None:
        self._finalizer()


@dataclass
class ReadResult:
    scan: Scan
    warnings: list[str] = field(default_factory=list)
    series_uid: str | None = None  # the DICOM series chosen (None: the only one, or not DICOM)


def read_staged(staged: StagedUpload, settings: AppSettings, series_uid: str | None = None,
                allow_missing_slices: bool = False) -> ReadResult:
    """Read the staged upload; ``ScanReadWarning``s (uneven spacing, slices missing when allowed...) are returned
    as text. A DICOM series with missing slices raises ``MissingSlicesError`` unless ``allow_missing_slices``.

    Raises ``MedsegError`` subclasses with one-line messages (``MultipleSeriesError`` lists the series).
    """
    with collect_read_warnings() as caught:  # this call's warnings only (not another session's)
        try:
            scan = read_scan(
                staged.source,
                series_uid,
                max_voxels=settings.max_voxels,
                max_pixels=settings.max_pixels,
                archive_limits=settings.archive_limits,
                untrusted=True,
                allow_missing_slices=allow_missing_slices,
            )
        except MedsegError as e:
            raise staged.names.renamed(e) from None
    scan.source = staged.names.shown(scan.source)
    notes = [staged.names.shown(note) for note in caught]
    return ReadResult(scan, list(dict.fromkeys(notes)))


def read_ground_truth(
    name: str,
    data: bytes,
    scan: Scan,
    labels: dict[int, dict[str, str]],
    label_map: dict[int, int],
    settings: AppSettings,
) -> np.ndarray:
    """A ground-truth label map on ``scan``'s grid, as the model's class indices ``(y, x)`` / ``(z, y, x)``.

    Values are read as the training masks were (``label_map``, e.g. 255 -> 1) when they fit it, else taken as
    class indices. Raises ``MedsegError`` naming the file when it does not fit the scan or the model.
    """
    name = _safe_name(name)
    names = NameMap()
    with tempfile.TemporaryDirectory(prefix="medseg-gt-") as tmp:
        path = Path(tmp) / names.add(f"truth{_neutral_suffix(name)}", name)
        path.write_bytes(data)
        try:
            mask = read_mask(path, max_voxels=settings.max_voxels, max_pixels=settings.max_pixels, untrusted=True)
        except MedsegError as e:
            raise names.renamed(e) from None
    array = mask.array
    if tuple(array.shape) != tuple(scan.spatial_shape):
        raise ScanReadError(
            f"{name}: ground truth is {'x'.join(map(str, array.shape))} but the scan is "
            f"{'x'.join(map(str, scan.spatial_shape))}; upload the mask made for this scan"
        )
    values = {int(v) for v in np.unique(array)}
    if label_map and values <= set(label_map):
        lut = np.zeros(max(label_map) + 1, dtype=np.uint8)
        for raw, cls in label_map.items():
            lut[raw] = cls
        return lut[array]
    if values <= set(labels):
        return array.astype(np.uint8)
    unknown = sorted(values - set(labels))[:8]
    known = ", ".join(f"{i} {v.get('name', '')}" for i, v in sorted(labels.items()))
    raise ScanReadError(f"{name}: ground truth holds values {unknown} that are not this model's labels ({known})")
