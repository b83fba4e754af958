"""Scan I/O with exact geometry: read any supported input into a ``Scan``, write masks/overlays back.

Public API (see each function's docstring for shapes):
    read_scan, read_mask, read_probabilities, list_dicom_series, is_dicom_folder   (readers)
    write_mask, write_overlay, write_probabilities, write_scan          (writers)
    render_overlay                                                       (display)
    extracted_zip, extract_zip_safely, safe_extract_zip, ArchiveLimits  (safe zip handling)
    Scan, Geometry, DicomSeriesInfo, MultipleSeriesError, ScanReadWarning
"""

from __future__ import annotations

from medseg.io.archive import (
    ArchiveLimits,
    ExtractedArchive,
    extract_zip_safely,
    extracted_zip,
    safe_extract_zip,
)
from medseg.io.checks import MAX_IMAGE_PIXELS, MAX_VOXELS, ScanReadWarning
from medseg.io.dicom import DicomSeriesInfo, MultipleSeriesError
from medseg.io.formats import ScanFormat, detect_format
from medseg.io.geometry import Geometry, Scan
from medseg.io.overlay import render_overlay
from medseg.io.readers import is_dicom_folder, list_dicom_series, read_mask, read_probabilities, read_scan
from medseg.io.writers import write_mask, write_overlay, write_probabilities, write_scan

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_VOXELS",
    "ArchiveLimits",
    "DicomSeriesInfo",
    "ExtractedArchive",
    "Geometry",
    "MultipleSeriesError",
    "Scan",
    "ScanFormat",
    "ScanReadWarning",
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
