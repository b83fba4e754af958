"""DICOM header hygiene for derived objects: give UID-less series valid, deterministic UIDs, and de-identify
headers along the lines of the PS3.15 Annex E Basic Application Level Confidentiality Profile.

Both work on copies of pydicom ``Dataset`` headers (``Scan.meta["dicom_datasets"]``) and map UIDs with
:func:`derive_uid`, a one-way hash, so the same source always gets the same replacement: a SEG built from
the de-identified headers references exactly the UIDs that :func:`deidentify_file` gives the source images.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

# UIDs that identify instances/series/studies/frames of reference (PS3.15 "U" action): remapped consistently.
# Class UIDs (SOP classes, transfer syntaxes, coding schemes) are standard constants and stay.
_REMAP_UID_KEYWORDS = frozenset({
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
    "ReferencedSOPInstanceUID", "FrameOfReferenceUID", "ReferencedFrameOfReferenceUID",
    "RelatedFrameOfReferenceUID", "SynchronizationFrameOfReferenceUID", "IrradiationEventUID",
    "ConcatenationUID", "DimensionOrganizationUID", "UID", "TargetUID", "DeviceUID", "StorageMediaFileSetUID",
    "InstanceCreatorUID", "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID",
    "TransactionUID", "FiducialUID", "TrackingUID", "ContextGroupExtensionCreatorUID", "PresentationDisplayCollectionUID",
    "PresentationSequenceCollectionUID", "SourceFrameOfReferenceUID", "StudyInstanceUIDPIV",
})  # fmt: skip

# Replaced by a dummy value (type 1/2 attributes that must stay present).
_REPLACE = {
    "PatientName": "ANONYMOUS",
    "PatientID": "ANONYMOUS",
}
# Emptied (type 2: present but zero-length).
_EMPTY = (
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime", "AcquisitionDate",
    "AcquisitionTime",
)  # fmt: skip
# Removed (PS3.15 "X"/"X/Z" attributes that medseg's outputs do not need).
_REMOVE = (
    "PatientBirthTime", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientBirthName", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PregnancyStatus", "LastMenstrualDate",
    "SmokingStatus", "MedicalAlerts", "Allergies", "CountryOfResidence", "RegionOfResidence",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "PhysiciansOfRecord", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "RequestingPhysician", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "AcquisitionDateTime", "StudyDescription", "AdmittingDiagnosesDescription", "RequestAttributesSequence",
    "PerformedProcedureStepID", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepDescription", "RequestedProcedureDescription", "RequestedProcedureID",
    "ScheduledProcedureStepID", "ImageComments", "ProtocolName", "ContentCreatorName", "ReferencedStudySequence",
    "ReferencedPatientSequence", "ReferencedPerformedProcedureStepSequence", "DateOfLastCalibration",
    "TimeOfLastCalibration", "CurrentPatientLocation", "PatientInstitutionResidence", "ResponsiblePerson",
    "ResponsibleOrganization", "PersonName", "VerifyingObserverName", "InstanceCreationDate",
    "InstanceCreationTime", "ContrastBolusStartTime", "ContrastBolusStopTime",
)  # fmt: skip

DEIDENTIFICATION_METHOD = "medseg: PS3.15 Basic Profile, partial"  # LO: at most 64 characters


_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "medseg/dicom-uid")


def derive_uid(*parts: object) -> str:
    """A valid DICOM UID derived from ``parts``: ``2.25.`` + a name-based (SHA-1) UUID as an integer
    (PS3.5 B.2), so the same parts always give the same UID and the parts cannot be read back from it."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


def _uid_value(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def ensure_uids(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Copies of a series' headers with every UID a SEG needs present and valid.

    Empty SOP Class/Instance UIDs come from the file meta (Media Storage SOP Class/Instance UID) when it has
    them; what is still missing is derived deterministically from attributes that are the same for the whole
    series (study/series) or that identify the slice (instance number and position), so a re-run on the same
    files references the same UIDs. Each slice of a series gets the same Study/Series/Frame of Reference UID.
    """
    out = [copy.deepcopy(ds) for ds in datasets]
    if not out:
        return out
    first = out[0]
    series_key = (
        _uid_value(first, "FrameOfReferenceUID"), str(first.get("SeriesDate", "")), str(first.get("SeriesTime", "")),
        str(first.get("SeriesNumber", "")), str(first.get("SeriesDescription", "")), str(first.get("Modality", "")),
    )
    study = _uid_value(first, "StudyInstanceUID") or derive_uid("study", *series_key, first.get("StudyDate", ""))
    series = _uid_value(first, "SeriesInstanceUID") or derive_uid("series", *series_key)
    frame = _uid_value(first, "FrameOfReferenceUID") or derive_uid("frame", study, series)
    for ds in out:
        meta = getattr(ds, "file_meta", None)
        if not _uid_value(ds, "StudyInstanceUID"):
            ds.StudyInstanceUID = study
        if not _uid_value(ds, "SeriesInstanceUID"):
            ds.SeriesInstanceUID = series
        if not _uid_value(ds, "FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = frame
        if not _uid_value(ds, "SOPClassUID") and meta is not None and _uid_value(meta, "MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not _uid_value(ds, "SOPInstanceUID"):
            from_meta = _uid_value(meta, "MediaStorageSOPInstanceUID") if meta is not None else ""
            ds.SOPInstanceUID = from_meta or derive_uid(
                "instance", series, ds.get("InstanceNumber", ""), list(ds.get("ImagePositionPatient", []))
            )
        if meta is not None:  # keep the file meta consistent with the dataset
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return out


def _remap_uids(ds: Dataset, salt: str) -> None:
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.keyword in _REMAP_UID_KEYWORDS and elem.value:
            values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            mapped = [derive_uid("deid", salt, str(v)) for v in values]
            elem.value = mapped if len(mapped) > 1 else mapped[0]


def deidentify_dataset(ds: Dataset, salt: str = "") -> Dataset:
    """A de-identified copy of ``ds`` (headers; pixel data, if any, is kept unchanged).

    Patient name and ID become ``ANONYMOUS``; birth date, sex, dates and times, referring physician, study ID
    and accession number are emptied; other identifying attributes (addresses, institution, station, device
    serial, physicians, operators, protocol/procedure text, comments) and all private tags are removed;
    instance/series/study/frame-of-reference UIDs are replaced by :func:`derive_uid` of ``salt`` and the
    original (in sequences too), so references between de-identified objects stay consistent. Pass a secret
    ``salt`` if the hashed UIDs must not be linkable to the originals by someone who has them.
    PatientIdentityRemoved = YES and the method are recorded. Burned-in text in pixels is not checked.
    """
    out = copy.deepcopy(ds)
    out.remove_private_tags()
    for keyword in _REMOVE:
        for item in _walk(out):
            if keyword in item:
                delattr(item, keyword)
    for item in _walk(out):
        for keyword in _EMPTY:
            if keyword in item:
                item.data_element(keyword).value = ""
        for keyword, value in _REPLACE.items():
            if keyword in item:
                item.data_element(keyword).value = value
    _remap_uids(out, salt)
    if getattr(out, "file_meta", None) is not None:
        _remap_uids(out.file_meta, salt)
    out.PatientName = _REPLACE["PatientName"]
    out.PatientID = _REPLACE["PatientID"]
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = [code]
    return out


def _walk(ds: Dataset) -> Iterable[Dataset]:
    """``ds`` and every dataset nested in its sequences."""
    yield ds
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def deidentify_file(source: str | Path, target: str | Path, salt: str = "") -> Path:
    """Write a de-identified copy of one DICOM file (compressed pixel data is copied, not decoded).

    With the same ``salt``, its UIDs match those a SEG written with ``anonymize=True`` references.
    """
    ds = ensure_uids([pydicom.dcmread(source)])[0]
    out = deidentify_dataset(ds, salt)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.save_as(target, enforce_file_format=True)
    return target
