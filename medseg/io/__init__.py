"""Scan I/O with exact geometry: read any supported input into a ``Scan``, write masks/overlays back.

Public API (see each function's docstring for shapes):
    read_scan, read_mask, read_probabilities, list_dicom_series, is_dicom_folder   (readers)
    write_mask, write_overlay, write_probabilities, write_scan          (writers)
    render_overlay                                                       (display)
    extracted_zip, extract_zip_safely, safe_extract_zip, ArchiveLimits  (safe zip handling)
    Scan, Geometry, DicomSeriesInfo, MultipleSeriesError, MissingSlicesError, ScanReadWarning

Safety limits (decompression bombs, hostile archives). Every reader checks sizes from the header before it
decodes anything, and every zip is vetted before anything is extracted; each limit is a keyword argument of
the readers (``max_voxels``, ``max_pixels``, ``archive_limits=ArchiveLimits(...)``):
    MAX_VOXELS             1e9 samples in a volume or DICOM series (4 GB as float32)
    MAX_IMAGE_PIXELS       89,478,485 pixels in a 2D image (Pillow's own limit; Pillow refuses twice that)
    MAX_MEMBERS            10,000 members in a zip
    MAX_TOTAL_BYTES        2 GiB uncompressed in a zip (declared sizes, and the bytes actually written)
    MAX_COMPRESSION_RATIO  200:1 per zip member of 1 MiB or more, for all members together, and for the bytes
                           written against the zip file's own size (checked while extracting)
Nested archives are never opened; symlinks, absolute and ``..`` member paths are refused. Beyond the caps:
truncated NIfTI/DICOM pixel data is detected before decoding, NaN/inf in a NIfTI header's geometry is refused,
MetaImage/NRRD data files must sit beside their header (``medseg.io.headers`` finds them as ITK does), and files
that are not regular files are refused.

Uploads: ``read_scan(..., untrusted=True)`` (the service and the web app) reads only voxel data stored inside
the uploaded files; detached ``.mhd``/``.nhdr``/``.raw`` files and headers pointing elsewhere are refused.
"""

from __future__ import annotations

from medseg.io.archive import (
    MAX_COMPRESSION_RATIO,
    MAX_MEMBERS,
    MAX_TOTAL_BYTES,
    ArchiveLimits,
    ExtractedArchive,
    extract_zip_safely,
    extracted_zip,
    safe_extract_zip,
)
from medseg.io.checks import MAX_IMAGE_PIXELS, MAX_VOXELS, ScanReadWarning, collect_read_warnings
from medseg.io.dicom import DicomSeriesInfo, MissingSlicesError, MultipleSeriesError
from medseg.io.formats import ScanFormat, detect_format
from medseg.io.geometry import Geometry, Scan
from medseg.io.overlay import render_overlay
from medseg.io.readers import is_dicom_folder, list_dicom_series, read_mask, read_probabilities, read_scan
from medseg.io.writers import write_mask, write_overlay, write_probabilities, write_scan

__all__ = [
    "MAX_COMPRESSION_RATIO",
    "MAX_IMAGE_PIXELS",
    "MAX_MEMBERS",
    "MAX_TOTAL_BYTES",
    "MAX_VOXELS",
    "ArchiveLimits",
    "DicomSeriesInfo",
    "ExtractedArchive",
    "Geometry",
    "MissingSlicesError",
    "MultipleSeriesError",
    "Scan",
    "ScanFormat",
    "ScanReadWarning",
    "collect_read_warnings",
    "detect_format",
    "extract_zip_safely",
    "extracted_zip",
    "is_dicom_folder",
    "list_dicom_series",
    "read_mask",
    "read_probabilities",
    "read_scan",
    "render_overlay",
    "safe_extract_zip",
    "write_mask",
    "write_overlay",
    "write_probabilities",
    "write_scan",
]
