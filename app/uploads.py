"""Uploaded bytes -> ``Scan`` (and ground-truth label maps), through ``medseg.io`` only.

Uploads live in memory (Streamlit's ``UploadedFile``) and, while a session looks at them, in a private temporary
folder: SimpleITK and pydicom read from disk, and a DICOM SEG export needs the source files. The folder is
deleted when the session lets go of it (a new upload, the session ending, or the server stopping).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from app.audit import sha256_of
from app.settings import AppSettings
from medseg.errors import MedsegError, ScanReadError
from medseg.io import (
    DicomSeriesInfo,
    Scan,
    ScanReadWarning,
    extract_zip_safely,
    list_dicom_series,
    read_mask,
    read_scan,
)

# Self-contained files only: a detached .mhd/.raw pair is refused by the readers' untrusted mode anyway.
SCAN_TYPES = ("nii", "gz", "nrrd", "mha", "dcm", "ima", "zip", "png", "jpg", "jpeg", "tif", "tiff", "bmp")
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


def _safe_name(name: str) -> str:
    """The base name of an uploaded file (directory uploads send relative paths; keep none of them)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return base if base not in ("", ".", "..") else "upload"


class StagedUpload:
    """The upload written to a private temporary folder; ``source`` is what ``read_scan`` gets.

    The folder is removed by ``close()``, or at the latest when this object is garbage-collected (Streamlit
    drops a session's state when the browser tab closes) or the interpreter exits.
    """

    def __init__(self, upload: UploadedBytes, settings: AppSettings):
        if upload.total_bytes > settings.upload_bytes:
            raise UploadError(
                f"upload of {upload.total_bytes / 1024**2:,.0f} MB is above this server's limit of "
                f"{settings.upload_mb:,} MB"
            )
        self.root = Path(tempfile.mkdtemp(prefix="medseg-upload-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)
        self.upload = upload
        try:
            self.source: Path | list[Path] = self._write(upload, settings)
        except BaseException:
            self.close()
            raise

    def _write(self, upload: UploadedBytes, settings: AppSettings) -> Path | list[Path]:
        names = [_safe_name(n) for n, _ in upload.files]
        zips = [n for n in names if n.lower().endswith(".zip")]
        if zips and len(names) > 1:
            raise UploadError(f"{zips[0]}: upload a zip on its own, not together with other files")
        if len(names) == 1:
            path = self.root / names[0]
            path.write_bytes(upload.files[0][1])
            if zips:
                # Extracted here (not inside read_scan) so the DICOM files outlive the read: SEG export needs them.
                # The folder takes the zip's name, so the reader's messages name the file the user uploaded.
                folder = extract_zip_safely(path, self.root / "extracted" / names[0], settings.archive_limits)
                path.unlink()
                return folder
            return path
        paths = []
        for i, (name, (_, data)) in enumerate(zip(names, upload.files, strict=True)):
            path = self.root / f"{i:05d}" / name  # one folder per file: DICOM folders reuse names (IM0001)
            path.parent.mkdir()
            path.write_bytes(data)
            paths.append(path)
        return paths

    @property
    def upload_name(self) -> str:
        return _safe_name(self.upload.files[0][0]) if len(self.upload.files) == 1 else f"{len(self.upload.files)} files"

    def dicom_series(self, settings: AppSettings) -> list[DicomSeriesInfo]:
        return list_dicom_series(self.source, archive_limits=settings.archive_limits)

    def close(self) -> None:
        self._finalizer()


@dataclass
class ReadResult:
    scan: Scan
    warnings: list[str] = field(default_factory=list)


def read_staged(staged: StagedUpload, settings: AppSettings, series_uid: str | None = None) -> ReadResult:
    """Read the staged upload; ``ScanReadWarning``s (missing slices, uneven spacing...) are returned as text.

    Raises ``MedsegError`` subclasses with one-line messages (``MultipleSeriesError`` lists the series).
    """
    # catch_warnings is process-wide: a warning from another session's read at the same instant could land here.
    # The reader's warnings name only the scan, so the worst case is a misplaced note, never a leak of data.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScanReadWarning)
        scan = read_scan(
            staged.source,
            series_uid,
            max_voxels=settings.max_voxels,
            max_pixels=settings.max_pixels,
            archive_limits=settings.archive_limits,
            untrusted=True,
        )
    notes = [str(w.message) for w in caught if issubclass(w.category, ScanReadWarning)]
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
    with tempfile.TemporaryDirectory(prefix="medseg-gt-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        mask = read_mask(path, max_voxels=settings.max_voxels, max_pixels=settings.max_pixels, untrusted=True)
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
