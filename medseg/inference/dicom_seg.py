"""DICOM Segmentation objects (highdicom) for predictions on DICOM input, referencing the source images.

The SEG is built from the source headers kept in ``Scan.meta["dicom_datasets"]`` (stack order, the scan's
z order), so it can be written after a zip's temporary folder is gone. Series whose files lack UIDs get
deterministic ones (`medseg.inference.deidentify.ensure_uids`); with ``anonymize=True`` the headers are
de-identified first and the SEG references the hashed UIDs that `deidentify_file` gives the source files.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from medseg.bundle import RESEARCH_NOTICE
from medseg.errors import MedsegError
from medseg.inference.deidentify import deidentify_dataset, derive_uid, ensure_uids
from medseg.io import Scan
from medseg.io.writers import atomic_path

# RESEARCH_NOTICE in DICOM's default character set (ISO-IR 6 has no em dash), without the full stop.
RESEARCH_ONLY = RESEARCH_NOTICE.replace("—", "-").rstrip(".")


class DicomSegError(MedsegError):
    """A DICOM SEG cannot be written for this scan (not DICOM, or headers highdicom cannot use)."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medseg")
    except Exception:  # not installed as a distribution (e.g. a source checkout)
        return "0"


def _segment(number: int, name: str, color: str | None, model_name: str, model_version: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:64] or f"label {number}",
        # Generic codes: medseg labels are free text from the bundle; a site maps them to SNOMED if it needs.
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model_name[:64] or "medseg", family=codes.cid7162.ArtificialIntelligence,
            version=model_version[:64] or "0",
        ),
        display_color=hd.color.CIELabColor.from_string(color) if color else None,
    )


def write_dicom_seg(
    scan: Scan,
    mask: np.ndarray,
    labels: Mapping[int, Any],
    path: str | Path,
    *,
    anonymize: bool = False,
    model_name: str = "medseg",
    model_version: str = "",
    salt: str = "",
    uid_key: str | None = None,
) -> Path:
    """Write ``mask`` (class indices on ``scan``'s grid: ``(z, y, x)`` or ``(y, x)``) as a binary DICOM SEG.

    ``labels``: index -> name or ``{"name", "color"}``; each label > 0 becomes a segment (numbered 1..N in
    label order) with the bundle's name and colour; frames with no voxels of a segment are omitted.
    ``anonymize``: de-identify patient/study attributes and hash UIDs (see `deidentify_dataset`, same
    ``salt``). SeriesDescription and ContentDescription say "Research use only". ``uid_key`` (e.g. a job id):
    the SEG's Series/SOP Instance UIDs derive from it and the source series alone, so a retried job writes the
    same UIDs even if its mask differs and a PACS it is stored to keeps one SEG. Returns the path written.
    """
    path = Path(path)
    datasets = scan.meta.get("dicom_datasets")
    if not datasets:
        raise DicomSegError(f"{scan.source or path.name}: DICOM SEG needs a DICOM input (no DICOM headers)")
    mask = np.asarray(mask)
    if tuple(mask.shape) != tuple(scan.spatial_shape):
        raise DicomSegError(f"{scan.source}: mask shape {mask.shape} != scan shape {scan.spatial_shape}")
    frames = mask[None] if mask.ndim == 2 else mask
    if frames.shape[0] != len(datasets):
        raise DicomSegError(f"{scan.source}: {frames.shape[0]} mask slices for {len(datasets)} DICOM images")

    sources = ensure_uids(datasets)
    if anonymize:
        sources = [deidentify_dataset(ds, salt) for ds in sources]

    indices = sorted(int(i) for i in labels if int(i) > 0)
    lut = np.zeros(max([int(mask.max()), *indices]) + 1, dtype=np.uint8)
    for number, index in enumerate(indices, start=1):
        lut[index] = number  # segment numbers must run 1..N; label indices need not
    seg_array = lut[frames]
    descriptions = []
    for number, index in enumerate(indices, start=1):
        entry = labels[index]
        name = str(entry.get("name", index)) if isinstance(entry, Mapping) else str(entry)
        color = entry.get("color") if isinstance(entry, Mapping) else None
        descriptions.append(_segment(number, name, color, model_name, model_version))

    # Same input, same mask, same model -> same UIDs (reproducible outputs); anything else -> new UIDs.
    digest = hashlib.sha256(np.ascontiguousarray(seg_array).tobytes()).hexdigest()
    key = (sources[0].SeriesInstanceUID, digest, model_name, model_version, anonymize, salt)
    if uid_key is not None:
        key = (sources[0].SeriesInstanceUID, "uid-key", uid_key, anonymize, salt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # highdicom's notes on optional attributes
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=seg_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=derive_uid("seg-series", *key),
                series_number=9000 + int(sources[0].get("SeriesNumber") or 0) % 1000,
                sop_instance_uid=derive_uid("seg-instance", *key),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=model_name[:64] or "medseg",
                software_versions=_version(),
                device_serial_number=model_version[:64] or "0",
                content_description=RESEARCH_ONLY,
                content_label="MEDSEG",
                series_description=f"{RESEARCH_ONLY} ({model_name})"[:64],
            )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DicomSegError(f"{scan.source}: cannot build a DICOM SEG from these headers ({e})") from None
    if anonymize:
        seg.PatientIdentityRemoved = "YES"
        seg.DeidentificationMethod = sources[0].DeidentificationMethod
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
