"""Which reader handles a file: format detection by name, with a content check for DICOM.

File names decide first (users name their files, and ``.nii.gz`` vs ``.gz`` needs the double suffix);
DICOM files often have no suffix at all, so anything unnamed is tested for the ``DICM`` magic.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path


class ScanFormat(StrEnum):
    dicom = "dicom"
    nifti = "nifti"
    nrrd = "nrrd"
    metaimage = "metaimage"
    png = "png"
    jpeg = "jpeg"
    tiff = "tiff"
    bmp = "bmp"
    zip = "zip"


SUFFIX_FORMATS: dict[str, ScanFormat] = {
    ".nii": ScanFormat.nifti,
    ".nii.gz": ScanFormat.nifti,
    ".nrrd": ScanFormat.nrrd,
    ".nhdr": ScanFormat.nrrd,
    ".mha": ScanFormat.metaimage,
    ".mhd": ScanFormat.metaimage,
    ".png": ScanFormat.png,
    ".jpg": ScanFormat.jpeg,
    ".jpeg": ScanFormat.jpeg,
    ".tif": ScanFormat.tiff,
    ".tiff": ScanFormat.tiff,
    ".bmp": ScanFormat.bmp,
    ".dcm": ScanFormat.dicom,
    ".dicom": ScanFormat.dicom,
    ".ima": ScanFormat.dicom,
    ".zip": ScanFormat.zip,
}

VOLUME_FORMATS = frozenset({ScanFormat.nifti, ScanFormat.nrrd, ScanFormat.metaimage})  # read via SimpleITK
RASTER_FORMATS = frozenset({ScanFormat.png, ScanFormat.jpeg, ScanFormat.tiff, ScanFormat.bmp})  # via Pillow

# Data files that belong to a header file (.mhd -> .raw/.zraw, .nhdr -> .raw/.gz): not scans themselves.
COMPANION_SUFFIXES = frozenset({".raw", ".zraw", ".img"})
# Headers whose voxel data lives in such a separate file: read locally, never accepted as uploads.
DETACHED_HEADER_SUFFIXES = frozenset({".mhd", ".nhdr"})

# Archives inside an archive are never opened (bomb nesting); they are reported instead.
ARCHIVE_SUFFIXES = frozenset({".zip", ".7z", ".rar", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst"})

# The one table of suffixes, in the forms its users need (derived from SUFFIX_FORMATS, never listed again):
# single-file scans in a dataset folder or a `medseg predict` folder (longest first, so ".nii.gz" wins over
# ".nii"; DICOM slices are not cases of their own: a series is a folder or a .zip) ...
SCAN_SUFFIXES: tuple[str, ...] = tuple(
    sorted((s for s, f in SUFFIX_FORMATS.items() if f != ScanFormat.dicom), key=len, reverse=True)
)
# ... and the extensions an upload may have (Streamlit's ``type=`` list: the last suffix part; self-contained
# files only, a detached .mhd/.nhdr header would need its data file too).
UPLOAD_EXTENSIONS: tuple[str, ...] = tuple(
    sorted({s.rsplit(".", 1)[-1] for s in SUFFIX_FORMATS if s not in DETACHED_HEADER_SUFFIXES})
)

SUPPORTED_DESCRIPTION = (
    "DICOM series (folder, files or .zip), NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd), "
    "PNG, JPEG, TIFF, BMP"
)


def full_suffix(path: str | Path) -> str:
    """Lower-case suffix, keeping the double ``.nii.gz`` (``Path.suffix`` would give ``.gz``)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def has_dicom_magic(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def detect_format(path: str | Path) -> ScanFormat | None:
    """The format of one file (not a folder), or None when it is none medseg reads."""
    fmt = SUFFIX_FORMATS.get(full_suffix(path))
    if fmt is not None:
        return fmt
    return ScanFormat.dicom if has_dicom_magic(path) else None


def is_archive_member_to_skip(name: str) -> bool:
    """Archives nested in a zip (``inner.zip``, ``x.tar.gz``) but not ``scan.nii.gz``."""
    suffix = full_suffix(name)
    return suffix != ".nii.gz" and suffix in ARCHIVE_SUFFIXES
