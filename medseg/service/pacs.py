"""Jobs whose scan comes from a PACS: the client names a configured DICOMweb endpoint and a series, the service
retrieves it into the job's folder (bounded, ``medseg.io.dicomweb``) and queues it like an upload; with
``store_back`` the worker stores the job's DICOM SEG on the same endpoint (STOW-RS) once it is written.

```
GET  /v1/dicomweb/endpoints          the configured endpoint names (no URLs, no auth)
POST /v1/segment/dicomweb            JSON {endpoint, study_uid, series_uid, store_back?, tta?, run_anyway?,
                                     allow_missing_slices?}  -> 202 {job_id}
POST /v1/jobs/{id}/store             store a done job's SEG on its endpoint (again: same UIDs, one SEG kept)
```
Endpoints are the operator's (``ServiceSettings.dicomweb_endpoints``, a YAML file); a client can only name
one, so no request makes the service fetch a URL of the client's choosing. The SEG's Series/SOP Instance UIDs
derive from the job id, so a store repeated for one job overwrites (or is ignored by) the PACS, never duplicates.
Errors: 404 unknown endpoint, 422 a series refused (too large, not images) or unreadable, 502 the PACS failed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from medseg.config import TTAMode
from medseg.errors import MedsegError
from medseg.inference.compatibility import IncompatibleScanError
from medseg.io import MAX_IMAGE_PIXELS, read_scan
from medseg.io.dicomweb import (
    DicomWebError,
    Endpoint,
    SeriesRefusedError,
    check_uid,
    endpoint_named,
    retrieve_series,
    store_seg,
)
from medseg.service.budget import DECODED_BYTES_PER_SAMPLE
from medseg.service.jobs import JobInput
from medseg.service.results import MASK_DICOM_SEG, check_result_shape

log = logging.getLogger("medseg.service")


class PacsJobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(description="A configured endpoint's name (GET /v1/dicomweb/endpoints)", max_length=64)
    study_uid: str = Field(description="StudyInstanceUID", max_length=64)
    series_uid: str = Field(description="SeriesInstanceUID of the image series to segment", max_length=64)
    store_back: bool = Field(False, description="Store the DICOM SEG on the endpoint when the job is done")
    tta: TTAMode | None = None
    run_anyway: bool = False
    allow_missing_slices: bool = False


@dataclass
class PacsSource:
    """Where a job's scan came from, and what became of storing its SEG back (no patient data)."""

    endpoint: str
    study_uid: str
    series_uid: str
    store_back: bool
    stored_sop_uid: str | None = None
    seg_series_uid: str | None = None
    store_error: str | None = None

    def public(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "study_uid": self.study_uid, "series_uid": self.series_uid,
                "store_back": self.store_back, "stored": self.stored_sop_uid is not None,
                "seg_sop_uid": self.stored_sop_uid, "seg_series_uid": self.seg_series_uid,
                "store_error": self.store_error}


def store_job_seg(endpoint: Endpoint, source: PacsSource, folder: Path) -> None:
    """STOW-RS the job's SEG; the outcome goes into ``source`` (a PACS failure leaves the results usable)."""
    seg = folder / MASK_DICOM_SEG
    if not seg.exists():
        source.store_error = "no DICOM SEG was written for this job"
        return
    try:
        source.stored_sop_uid = store_seg(endpoint, seg)
        import pydicom

        source.seg_series_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SeriesInstanceUID)
        source.store_error = None
    except (DicomWebError, OSError) as e:
        source.store_error = str(e)
        log.warning("storing a SEG on endpoint %s failed: %s", endpoint.name, type(e).__name__)


def _status(err: BaseException) -> int | None:
    if isinstance(err, DicomWebError) and not isinstance(err, SeriesRefusedError):
        return 502
    if isinstance(err, (SeriesRefusedError, IncompatibleScanError)):
        return 422
    return None


def add_pacs_routes(app: FastAPI, service: Any) -> None:
    """The DICOMweb job source over ``service`` (``medseg.service.app.Service``, with ``endpoints``)."""
    from medseg.service.app import SubmittedOut, accepted, compatibility_problems, refuse

    jobs, budget = service.jobs, service.budget

    @app.get("/v1/dicomweb/endpoints")
    def endpoints() -> dict[str, list[str]]:
        """The names a job may name (configured by the operator)."""
        return {"endpoints": sorted(service.endpoints)}

    @app.post("/v1/segment/dicomweb", status_code=202, response_model=SubmittedOut)
    def segment_from_pacs(body: PacsJobIn) -> JSONResponse:
        """Retrieve a series from a configured endpoint and queue it (202 with the job id)."""
        try:
            endpoint = endpoint_named(service.endpoints, body.endpoint)
            check_uid(body.study_uid, "study_uid"), check_uid(body.series_uid, "series_uid")
        except DicomWebError as e:
            raise HTTPException(404 if "no DICOMweb endpoint" in str(e) else 422, str(e)) from None
        if jobs.is_full():
            raise HTTPException(429, "the job queue is full", headers={"Retry-After": str(jobs.retry_after())})
        job_id, folder = jobs.new_folder()
        reservation = budget.reservation()
        try:
            with service.reads:
                # Compressed bytes never exceed what the voxel cap allows decoded (JPEG 2000 is smaller still).
                max_bytes = min(endpoint.max_bytes, service.voxel_cap * DECODED_BYTES_PER_SAMPLE)
                got = retrieve_series(endpoint, body.study_uid, body.series_uid, folder / "series",
                                      max_bytes=max_bytes)
                digest = hashlib.sha256()
                for f in got.files:
                    digest.update(f.read_bytes())

                def admit(shape: tuple[int, ...], components: int) -> None:
                    check_result_shape("series", shape)
                    reservation.admit(shape, components)

                # The series stays in the job folder until the queue takes the job: the in-process queue deletes
                # it (the Scan holds pixels and headers), a shared queue's worker reads it again.
                stored = JobInput("series", body.series_uid, body.allow_missing_slices, service.voxel_cap,
                                  min(service.voxel_cap, MAX_IMAGE_PIXELS))
                scan = read_scan(folder / "series", body.series_uid, max_voxels=stored.max_voxels,
                                 max_pixels=stored.max_pixels, untrusted=True, admit=admit,
                                 allow_missing_slices=body.allow_missing_slices)
            problems = compatibility_problems(service, scan, body.run_anyway)
            source = PacsSource(endpoint.name, body.study_uid, body.series_uid, body.store_back)
            after = (lambda job, _written: store_job_seg(endpoint, source, job.folder)) if body.store_back else None
            job = jobs.submit(job_id, folder, scan, digest.hexdigest(), body.tta, reservation,
                              compatibility=problems, run_anyway=body.run_anyway, source=source,
                              after_results=after, stored_input=stored)
        except BaseException as e:
            refuse(e, reservation, folder, _status(e))
        return accepted(job)

    @app.post("/v1/jobs/{job_id}/store")
    def store_job(job_id: str) -> dict[str, Any]:
        """Store a done PACS job's SEG on its endpoint (e.g. after a clinician confirmed it)."""
        job = service.finished_job(job_id)
        if job.source is None:
            raise HTTPException(400, f"job {job_id} did not come from a DICOMweb endpoint")
        try:
            endpoint = endpoint_named(service.endpoints, job.source.endpoint)
        except MedsegError as e:
            raise HTTPException(404, str(e)) from None
        store_job_seg(endpoint, job.source, job.folder)
        service.jobs.save_source(job)  # a shared queue's record, so every replica shows the outcome
        if job.source.store_error is not None:
            raise HTTPException(502, job.source.store_error)
        return job.public()
