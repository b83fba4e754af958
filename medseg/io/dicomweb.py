"""DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) against operator-configured PACS endpoints.

Endpoints come from the operator (a YAML file, ``load_endpoints``), never from a client: callers name an
endpoint by its configured name, so nothing a user types becomes a URL the server fetches (no SSRF). An
endpoint may carry one auth header (``Authorization: Bearer ...``/``Basic ...``); its value is a pydantic
``SecretStr`` (hidden in ``repr``, logs and errors) and may be read from an environment variable instead of the
file. The HTTP work is dicomweb-client's (requests underneath).

Searches return only the attributes asked for (``STUDY_FIELDS``/``SERIES_FIELDS``, or a subset): a PACS answers
QIDO with many more (Orthanc adds patient name, birth date, accession number...), and what is not asked for is
dropped here before anything shows or logs it. Nothing in this module logs attribute values.

Retrieval is bounded: the series' instances are listed first (QIDO, SOP class and size attributes), and a
series with more than ``max_instances`` images, more than ``max_bytes`` of pixels, or any non-image object (SEG,
structured report, presentation state...) is refused before a byte of pixel data moves; while streaming, the
bytes actually written are counted against the same limit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import requests
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.dataset import Dataset

from medseg.errors import ConfigError, MedsegError

log = logging.getLogger("medseg.dicomweb")

ENDPOINTS_ENV = "MEDSEG_DICOMWEB_ENDPOINTS"  # path of the endpoints YAML (app and service)

# What a study/series listing shows. PatientName/PatientID are asked for so a clinician can tell studies apart;
# the PACS decides whether the caller may see them (it answers for the query's user), medseg shows no more.
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "ModalitiesInStudy",
                "AccessionNumber", "PatientName", "PatientID", "NumberOfStudyRelatedSeries")
SERIES_FIELDS = ("SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
                 "NumberOfSeriesRelatedInstances", "SeriesDate")
# What bounded retrieval needs to know about each instance before fetching it.
_INSTANCE_FIELDS = ("SOPInstanceUID", "SOPClassUID", "Rows", "Columns", "NumberOfFrames", "BitsAllocated",
                    "SamplesPerPixel")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_WILDCARDS = re.compile(r"[*?\\]")


class DicomWebError(MedsegError):
    """A PACS request failed or its answer is unusable; the message names the endpoint, never a secret."""


class SeriesRefusedError(DicomWebError):
    """A series is not retrieved: too many instances or bytes, or objects that are not images."""


class Endpoint(BaseModel):
    """One DICOMweb service. ``url``: the DICOMweb root (QIDO/WADO/STOW below it, e.g.
    ``http://pacs:8042/dicom-web``). ``auth_header``: the value of ``auth_header_name`` sent with every request
    (or ``auth_header_env``: the environment variable holding it). ``max_instances``/``max_bytes``: retrieval
    bounds (pixel bytes, uncompressed). ``timeout_s``: per HTTP request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    url: str = Field(pattern=r"^https?://")
    auth_header_name: str = "Authorization"
    auth_header: SecretStr | None = None
    auth_header_env: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    max_instances: int = Field(default=2000, gt=0)
    max_bytes: int = Field(default=2 * 1024**3, gt=0)
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @model_validator(mode="after")
    def _one_auth_source(self) -> Endpoint:
        if self.auth_header is not None and self.auth_header_env:
            raise ValueError("give auth_header or auth_header_env, not both")
        return self

    def headers(self) -> dict[str, str]:
        """The auth header to send (empty without one). Never log the result."""
        if self.auth_header is not None:
            return {self.auth_header_name: self.auth_header.get_secret_value()}
        if self.auth_header_env:
            value = os.environ.get(self.auth_header_env, "")
            if not value:
                raise DicomWebError(f"endpoint {self.name}: environment variable {self.auth_header_env} is not set")
            return {self.auth_header_name: value}
        return {}


class EndpointsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[Endpoint]

    @model_validator(mode="after")
    def _unique_names(self) -> EndpointsFile:
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique (got {names})")
        return self


def load_endpoints(path: str | Path | None = None) -> dict[str, Endpoint]:
    """Endpoints by name from a YAML file (``path``, else ``$MEDSEG_DICOMWEB_ENDPOINTS``; none: empty)::

        endpoints:
          - name: hospital-pacs
            url: https://pacs.example.org/dicom-web
            auth_header_env: PACS_AUTH      # e.g. "Bearer eyJ..." kept out of the file
    """
    path = path or os.environ.get(ENDPOINTS_ENV) or None
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path.name}: cannot read DICOMweb endpoints ({type(e).__name__})") from None
    try:
        parsed = EndpointsFile.model_validate(raw or {"endpoints": []})
    except ValidationError as e:
        # pydantic's message may echo the input, secrets included: keep locations and reasons only.
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path.name}: invalid DICOMweb endpoints: {problems}") from None
    return {e.name: e for e in parsed.endpoints}


def endpoint_named(endpoints: dict[str, Endpoint], name: str) -> Endpoint:
    """The configured endpoint called ``name``; an error listing the configured names otherwise."""
    try:
        return endpoints[name]
    except KeyError:
        known = ", ".join(sorted(endpoints)) or "none configured"
        raise DicomWebError(f"no DICOMweb endpoint named {name!r} (configured: {known})") from None


def check_uid(value: str, what: str) -> str:
    """``value`` if it is a syntactically valid DICOM UID (it goes into request paths)."""
    if not (0 < len(value) <= 64 and _UID.fullmatch(value)):
        raise DicomWebError(f"{what} is not a valid DICOM UID")
    return value


# ------------------------------------------------------------------------------------------------ client


class _QidoSession(requests.Session):
    """Sends QIDO wildcards as a literal ``*``: requests percent-encodes it (``%2A``), which RFC 3986 allows but
    some servers do not decode in query values (Orthanc 1.10 then matches nothing); ``*`` is legal unencoded."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        base, sep, query = (request.url or "").partition("?")
        if sep:
            request.url = f"{base}?{query.replace('%2A', '*')}"
        return super().send(request, **kwargs)


def _client(endpoint: Endpoint) -> Any:
    from dicomweb_client import DICOMwebClient

    session = _QidoSession()
    session.verify = endpoint.verify_tls
    session.trust_env = False  # proxies from the environment would see the auth header
    return DICOMwebClient(endpoint.url, session=session, headers=endpoint.headers(), timeout=endpoint.timeout_s)


def _failure(endpoint: Endpoint, action: str, err: Exception) -> DicomWebError:
    if isinstance(err, requests.HTTPError) and err.response is not None:
        reason = f"HTTP {err.response.status_code}"
        if err.response.status_code in (401, 403):
            reason += " (check the endpoint's auth header)"
    elif isinstance(err, requests.ConnectionError):
        reason = "cannot connect"
    elif isinstance(err, requests.Timeout):
        reason = f"no answer within {endpoint.timeout_s:g} s"
    else:
        reason = type(err).__name__
    return DicomWebError(f"endpoint {endpoint.name}: {action} failed: {reason}")


def _value(item: dict[str, Any], keyword: str) -> Any:
    """One attribute of a DICOM JSON object as a plain value (PN as its alphabetic string, lists joined)."""
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = item.get(tag, {}).get("Value")
    if not values:
        return None
    out = [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in values]
    return out[0] if len(out) == 1 else "\\".join(str(v) for v in out)


def _project(items: Iterable[dict[str, Any]], fields: Sequence[str]) -> list[dict[str, Any]]:
    """Only ``fields`` of each answer: what the PACS adds unasked never leaves this module."""
    return [{f: _value(item, f) for f in fields} for item in items]


def date_range(start: date | None, end: date | None) -> str | None:
    """A DICOM date range query value (``YYYYMMDD-YYYYMMDD``, open ends allowed)."""
    if start is None and end is None:
        return None
    return f"{start.strftime('%Y%m%d') if start else ''}-{end.strftime('%Y%m%d') if end else ''}"


def _contains(text: str | None) -> str | None:
    """A 'contains' match for a free-text attribute (QIDO wildcards). Case follows the PACS: DICOM matching of
    LO/SH values is case-sensitive (Orthanc's is), some PACS fold case."""
    words = _WILDCARDS.sub("", text or "").split()
    if not words:
        return None
    # Words in order with anything between them: spaces are not sent (some servers mis-decode them in queries).
    return f"*{'*'.join(words)}*"


def search_studies(endpoint: Endpoint, *, start: date | None = None, end: date | None = None,
                   modality: str | None = None, description: str | None = None, limit: int = 50,
                   fields: Sequence[str] = STUDY_FIELDS) -> list[dict[str, Any]]:
    """Studies (QIDO-RS) by study date range, modality in study and description text; at most ``limit``.
    Each result holds exactly ``fields`` (None where the PACS gave no value)."""
    filters: dict[str, Any] = {}
    if (dates := date_range(start, end)) is not None:
        filters["StudyDate"] = dates
    if modality:
        filters["ModalitiesInStudy"] = modality.strip().upper()
    if (text := _contains(description)) is not None:
        filters["StudyDescription"] = text
    try:
        answer = _client(endpoint).search_for_studies(search_filters=filters, fields=list(fields), limit=limit,
                                                      fuzzymatching=False)
    except (requests.RequestException, ValueError) as e:
        raise _failure(endpoint, "study search", e) from None
    return _project(answer[:limit], fields)


def search_series(endpoint: Endpoint, study_uid: str, *, modality: str | None = None,
                  description: str | None = None, limit: int = 200,
                  fields: Sequence[str] = SERIES_FIELDS) -> list[dict[str, Any]]:
    """The series of one study (QIDO-RS), optionally by modality and description text."""
    filters: dict[str, Any] = {}
    if modality:
        filters["Modality"] = modality.strip().upper()
    if (text := _contains(description)) is not None:
        filters["SeriesDescription"] = text
    try:
        answer = _client(endpoint).search_for_series(check_uid(study_uid, "StudyInstanceUID"),
                                                     search_filters=filters, fields=list(fields), limit=limit)
    except (requests.RequestException, ValueError) as e:
        raise _failure(endpoint, "series search", e) from None
    return _project(answer[:limit], fields)


def is_image_sop_class(sop_class_uid: str) -> bool:
    """Image storage SOP classes (CT, MR, enhanced, secondary capture...); SEG, SR, RT, PR, KO... are not."""
    name = pydicom.uid.UID(sop_class_uid).name
    return name.endswith("Image Storage") or "Image Storage -" in name


@dataclass(frozen=True)
class RetrievedSeries:
    folder: Path
    files: tuple[Path, ...]
    bytes_written: int


def retrieve_series(endpoint: Endpoint, study_uid: str, series_uid: str, folder: str | Path, *,
                    max_instances: int | None = None, max_bytes: int | None = None) -> RetrievedSeries:
    """Download one series (WADO-RS) into ``folder`` as ``000001.dcm``... (names carry no identifiers).

    Refused with ``SeriesRefusedError`` before any pixel data moves when it has more than ``max_instances``
    instances, more than ``max_bytes`` of uncompressed pixels or any non-image object; the bytes written are
    counted against ``max_bytes`` while streaming, too. Defaults: the endpoint's bounds.
    """
    max_instances = max_instances or endpoint.max_instances
    max_bytes = max_bytes or endpoint.max_bytes
    study_uid, series_uid = check_uid(study_uid, "StudyInstanceUID"), check_uid(series_uid, "SeriesInstanceUID")
    client = _client(endpoint)
    try:
        listing = client.search_for_instances(study_uid, series_uid, fields=list(_INSTANCE_FIELDS),
                                              limit=max_instances + 1)
    except (requests.RequestException, ValueError) as e:
        raise _failure(endpoint, "instance listing", e) from None
    instances = _project(listing, _INSTANCE_FIELDS)
    if not instances:
        raise DicomWebError(f"endpoint {endpoint.name}: series not found (no instances)")
    if len(instances) > max_instances:
        raise SeriesRefusedError(f"endpoint {endpoint.name}: the series has more than {max_instances} instances")
    not_images = sorted({pydicom.uid.UID(i["SOPClassUID"] or "").name or "no SOP class" for i in instances
                         if not is_image_sop_class(i["SOPClassUID"] or "")})
    if not_images:
        raise SeriesRefusedError(
            f"endpoint {endpoint.name}: the series holds objects that are not images ({', '.join(not_images)}); "
            "choose an image series"
        )
    announced = sum(int(i["Rows"] or 0) * int(i["Columns"] or 0) * int(i["NumberOfFrames"] or 1)
                    * int(i["SamplesPerPixel"] or 1) * max(1, int(i["BitsAllocated"] or 16) // 8) for i in instances)
    if announced > max_bytes:
        raise SeriesRefusedError(
            f"endpoint {endpoint.name}: the series holds {announced / 1e6:.0f} MB of pixels, more than the "
            f"{max_bytes / 1e6:.0f} MB allowed"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    written = 0
    try:
        # Any transfer syntax: the PACS sends what it stores (JPEG 2000 stays JPEG 2000; GDCM decodes it).
        stream = client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
        for ds in stream:
            if len(files) >= max_instances:
                raise SeriesRefusedError(f"endpoint {endpoint.name}: the series sent more than {max_instances} "
                                         "instances")
            path = folder / f"{len(files) + 1:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            written += path.stat().st_size
            if written > max_bytes:
                raise SeriesRefusedError(f"endpoint {endpoint.name}: the series sent more than "
                                         f"{max_bytes / 1e6:.0f} MB")
    except SeriesRefusedError:
        for f in files:
            f.unlink(missing_ok=True)
        raise
    except (requests.RequestException, ValueError) as e:
        raise _failure(endpoint, "series retrieval", e) from None
    log.info("endpoint %s: retrieved %d instance(s), %d bytes", endpoint.name, len(files), written)
    return RetrievedSeries(folder, tuple(files), written)


def store_instances(endpoint: Endpoint, datasets: Sequence[Dataset] | Sequence[str | Path]) -> list[str]:
    """Store DICOM objects (STOW-RS, one request per study); returns the SOPInstanceUIDs the PACS accepted.
    Raises ``DicomWebError`` when it refuses any of them (FailedSOPSequence)."""
    loaded = [pydicom.dcmread(d) if isinstance(d, (str, Path)) else d for d in datasets]
    by_study: dict[str, list[Dataset]] = {}
    for ds in loaded:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    client = _client(endpoint)
    stored: list[str] = []
    for study_uid, members in by_study.items():
        try:
            answer = client.store_instances(members, study_instance_uid=study_uid)
        except (requests.RequestException, ValueError) as e:
            raise _failure(endpoint, "store (STOW-RS)", e) from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise DicomWebError(f"endpoint {endpoint.name}: the PACS refused {len(failed)} object(s) "
                                f"(failure reason {', '.join(reasons)})")
        referenced = answer.get("ReferencedSOPSequence", []) if answer is not None else []
        stored += [str(item.ReferencedSOPInstanceUID) for item in referenced]
    log.info("endpoint %s: stored %d object(s)", endpoint.name, len(stored))
    return stored


def store_seg(endpoint: Endpoint, seg_path: str | Path) -> str:
    """STOW-RS one DICOM SEG file; returns its SOPInstanceUID. A SEG whose UIDs are derived from the job
    (``write_dicom_seg(uid_key=...)``) overwrites or is kept once when stored again, never duplicated."""
    ds = pydicom.dcmread(seg_path)
    if str(ds.get("Modality", "")) != "SEG":
        raise DicomWebError(f"{Path(seg_path).name}: not a DICOM SEG (Modality {ds.get('Modality', '')!r})")
    stored = store_instances(endpoint, [ds])
    if str(ds.SOPInstanceUID) not in stored:
        raise DicomWebError(f"endpoint {endpoint.name}: the PACS did not confirm the SEG")
    return str(ds.SOPInstanceUID)


def find_segs(endpoint: Endpoint, study_uid: str, source_series_uid: str | None = None) -> list[dict[str, Any]]:
    """SEG series in a study (QIDO-RS); with ``source_series_uid``, only those referencing that series
    (read from each SEG's ReferencedSeriesSequence)."""
    series = search_series(endpoint, study_uid, modality="SEG")
    if source_series_uid is None:
        return series
    out = []
    client = _client(endpoint)
    for s in series:
        try:
            for ds in client.iter_series(study_uid, s["SeriesInstanceUID"], media_types=(("application/dicom", "*"),)):
                refs = [r.SeriesInstanceUID for r in ds.get("ReferencedSeriesSequence", [])]
                if source_series_uid in refs:
                    out.append(s)
                    break
        except (requests.RequestException, ValueError) as e:
            raise _failure(endpoint, "SEG retrieval", e) from None
    return out
