"""The FastAPI app: upload a scan -> a job; poll the job; fetch its mask, uncertainty and measurements.

```
POST /v1/segment                 multipart: file (scan; DICOM series as one .zip), tta?, series_uid?, anonymize?,
                                 allow_missing_slices?  -> 202 {job_id}
GET  /v1/jobs/{id}               {job_id, status: queued|running|done|failed, progress 0..1, error}
GET  /v1/jobs/{id}/mask          ?format=nifti|png|dicom-seg, ?values=indices|raw  (on the scan's grid)
GET  /v1/jobs/{id}/uncertainty   ?format=nifti|npz            (normalised entropy in [0, 1])
GET  /v1/jobs/{id}/report        measurements per label (area mm² for 2D, volume mm³/mL for 3D)
POST /v1/segment/dicomweb        JSON naming a configured DICOMweb endpoint + study/series (medseg.service.pacs)
POST /v1/jobs/{id}/store         store a PACS job's DICOM SEG back (STOW-RS)
GET  /v1/models                  the loaded model: name, weights hash, labels, device
GET  /health                     liveness + queue depth
GET  /openapi.json, /docs        schema
POST /v1/finetune, GET /v1/finetune/{id}, GET /v1/versions, /versions/{name}/v1/...
                                 fine-tuning on uploaded reviews and the versions it served (``finetune_dir`` set;
                                 see ``medseg.service.finetune``)
```
POSTs need the ``X-Medseg-Client`` header, and with an API token every /v1 request its bearer token
(``medseg.service.guards``). Errors are JSON ``{"error": "..."}``: 401 no/wrong token, 403 no client header,
408 body not sent in time, 413 too large (upload bytes, or a header announcing more voxels than
``max_voxels``), 415 unknown type, 422 unreadable scan, 429 queue full or its memory budget taken (with
Retry-After), 404 unknown job, 409 job not done (or failed), 400 a format the job's input does not allow.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from medseg.bundle import RESEARCH_NOTICE
from medseg.config import TTAMode
from medseg.errors import MedsegError, ScanTooLargeError, UnsupportedFormatError
from medseg.inference import Predictor
from medseg.inference.compatibility import IncompatibleScanError, check_scan
from medseg.inference.outputs import MaskValues
from medseg.io import MAX_IMAGE_PIXELS, Scan
from medseg.io.dicomweb import Endpoint, load_endpoints
from medseg.service.budget import (
    DECODED_BYTES_PER_SAMPLE,
    MEMORY_FRACTION_QUEUED,
    BudgetFullError,
    MemoryBudget,
    default_voxel_cap,
    machine_memory_bytes,
)
from medseg.service.guards import LOOPBACK_HOSTS, CallerGuard
from medseg.service.jobs import Job, JobInput, Jobs, JobStatus, QueueFullError, make_jobs
from medseg.service.limits import RequestBodyLimits
from medseg.service.results import (
    MASK_DICOM_SEG,
    REPORT,
    UNCERTAINTY_NIFTI,
    MaskFormat,
    UncertaintyFormat,
    check_result_shape,
    mask_file,
    uncertainty_npz,
)
from medseg.service.settings import ServiceSettings
from medseg.service.uploads import UploadTooLargeError, read_upload, store_upload

log = logging.getLogger("medseg.service")

API_VERSION = "1"

# Reading a scan holds it in memory; cap how many requests do that at once (the queue caps the rest).
_PARALLEL_READS = 4


class ErrorOut(BaseModel):
    error: str


class JobOut(BaseModel):
    job_id: str
    status: JobStatus
    progress: float = Field(ge=0.0, le=1.0)
    error: str | None = None
    pacs: dict[str, Any] | None = None  # jobs from a DICOMweb endpoint: the source and the store-back outcome


class SubmittedOut(BaseModel):
    job_id: str
    status: JobStatus
    status_url: str


class LabelOut(BaseModel):
    name: str
    color: str


class ModelOut(BaseModel):
    name: str
    weights_hash: str
    labels: dict[int, LabelOut]
    label_map: dict[int, int]
    num_classes: int
    input_channels: int
    context_slices: int
    device: str
    default_tta: TTAMode
    tta_modes: list[TTAMode]
    notice: str
    model_card: str
    config: dict[str, Any]


class ModelsOut(BaseModel):
    models: list[ModelOut]


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    model: str
    device: str
    jobs: dict[str, int] = Field(description="jobs by status, of every model sharing the job store (with --broker: "
                                             "the base model and its fine-tuned versions together)")
    queue_depth: int = Field(description="jobs of this model waiting for one of its workers")
    workers: int = Field(description="live inference workers of this model (heartbeats); 1 for the in-process queue")
    shared_queue: bool = Field(description="jobs go through a broker to medseg worker processes")
    max_queued: int
    max_voxels: int
    memory_budget_bytes: int
    memory_used_bytes: int
    job_timeout_s: float


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 429)
}


def _model_info(predictor: Predictor, model_card: str) -> ModelOut:
    cfg = predictor.cfg
    config = cfg.model_dump(mode="json")
    # Server paths of the training data say nothing about the model and may name a site or a person.
    for key in ("root", "datalist", "split_file"):
        config["data"][key] = None
    return ModelOut(
        name=predictor.name, weights_hash=predictor.weights_hash,
        labels={int(k): LabelOut(**v) for k, v in predictor.labels.items()},
        label_map=dict(cfg.data.label_map), num_classes=cfg.data.num_classes,
        input_channels=cfg.data.input_channels, context_slices=cfg.data.context_slices,
        device=str(predictor.device), default_tta=predictor.tta_mode(), tta_modes=list(TTAMode),
        notice=RESEARCH_NOTICE, model_card=model_card, config=config,
    )


def _refusal(err: BaseException) -> tuple[int | None, dict[str, str] | None]:
    """HTTP status (and headers) for why an upload was not queued; None: not a refusal, a bug."""
    if isinstance(err, (UploadTooLargeError, ScanTooLargeError)):
        return 413, None
    if isinstance(err, UnsupportedFormatError):
        return 415, None
    if isinstance(err, MedsegError):
        return 422, None
    if isinstance(err, (QueueFullError, BudgetFullError)):
        return 429, {"Retry-After": str(err.retry_after)}
    return None, None


@dataclass
class Service:
    """What the routes share: the settings, the job queue, the memory budget and the model's description."""

    settings: ServiceSettings
    jobs: Jobs
    budget: MemoryBudget
    voxel_cap: int
    model_info: ModelOut
    work_dir: Path
    own_work_dir: bool
    fingerprint: dict[str, Any] | None = None  # the training data's summary, what uploads are checked against
    finetune: Any = None  # medseg.service.finetune.FinetuneJobs when fine-tuning is on
    reads: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(_PARALLEL_READS))
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # DICOMweb endpoints jobs may name

    def finished_job(self, job_id: str) -> Job:
        """The job, done; 404 when unknown, 409 when failed or not done yet."""
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} (unknown, or deleted after its time to live)")
        if job.status == JobStatus.failed:
            raise HTTPException(409, f"job {job_id} failed: {job.error}")
        if job.status != JobStatus.done:
            raise HTTPException(409, f"job {job_id} is {job.status}; poll GET /v1/jobs/{job_id} until it is done")
        return job


def load_predictor(predictor: Any, settings: ServiceSettings, model_card: str
                   ) -> tuple[Predictor, str, dict[str, Any] | None]:
    """``predictor`` as given, or loaded once from a bundle path on ``settings.device`` (with its model card);
    and the training fingerprint uploads are checked against (model-scan compatibility)."""
    if isinstance(predictor, (str, Path)):
        from medseg.bundle import load_bundle

        bundle = load_bundle(predictor)
        return (Predictor.from_bundle(bundle, device=settings.device, backend=settings.backend),
                model_card or bundle.model_card, bundle.preprocessing.get("training_fingerprint"))
    return predictor, model_card, getattr(predictor, "training_fingerprint", None)


def build_service(predictor: Predictor, settings: ServiceSettings, model_card: str,
                  fingerprint: dict[str, Any] | None = None) -> Service:
    """The job queue in its work folder, and the memory budget and voxel cap that keep a scan from taking more."""
    own_work_dir = settings.work_dir is None and not settings.broker  # with a broker: files in results_dir
    work_dir = (Path(tempfile.mkdtemp(prefix="medseg-service-")) if own_work_dir
                else Path(settings.results_dir if settings.broker else settings.work_dir))  # type: ignore[arg-type]
    jobs = make_jobs(predictor, settings, work_dir)
    memory = machine_memory_bytes()
    budget = MemoryBudget(settings.memory_budget_bytes or int(memory * MEMORY_FRACTION_QUEUED), jobs.retry_after)
    # A scan under the cap must fit into an empty budget, or a retry could never succeed.
    voxel_cap = min(settings.max_voxels or default_voxel_cap(predictor, memory),
                    budget.limit_bytes // DECODED_BYTES_PER_SAMPLE)
    return Service(settings, jobs, budget, voxel_cap, _model_info(predictor, model_card), work_dir, own_work_dir,
                   fingerprint, endpoints=load_endpoints(settings.dicomweb_endpoints))


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.jobs.start()
        info, settings = service.model_info, service.settings
        log.info("serving %s (%s) on %s; scans up to %s voxels, %.1f GB for queued scans, %g s per job",
                 info.name, info.weights_hash, info.device, f"{service.voxel_cap:,}",
                 service.budget.limit_bytes / 1e9, settings.job_timeout_s)
        try:
            yield
        finally:
            if service.finetune is not None:
                service.finetune.stop()
            service.jobs.stop()
            if service.own_work_dir:
                shutil.rmtree(service.work_dir, ignore_errors=True)

    return lifespan


def add_guards(app: FastAPI, settings: ServiceSettings) -> None:
    """Middleware, outermost last: the Host check runs first, then the caller check, then the body limits."""
    app.add_middleware(RequestBodyLimits, max_bytes=settings.max_upload_bytes, read_timeout_s=settings.read_timeout_s,
                       upload_timeout_s=settings.upload_timeout_s)
    app.add_middleware(CallerGuard, api_token=settings.api_token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.trusted_hosts or LOOPBACK_HOSTS))


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": "..."}``."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Any, exc: RequestValidationError) -> JSONResponse:
        # No "input" echoed back: it could be part of an upload.
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(problems)}, status_code=422)


def add_upload_route(app: FastAPI, service: Service) -> None:
    """``POST /v1/segment``: store, check and decode the upload within the limits, then queue it."""
    jobs, budget, settings = service.jobs, service.budget, service.settings

    @app.post("/v1/segment", status_code=202, response_model=SubmittedOut, responses=ERRORS)
    def segment(
        file: Annotated[UploadFile, File(description="A scan: NIfTI, NRRD, MHA, PNG/JPEG/TIFF/BMP, DICOM file, or a .zip of a DICOM series")],
        tta: Annotated[TTAMode | None, Form(description="Test-time augmentation for this scan; default: the bundle's")] = None,
        series_uid: Annotated[str | None, Form(description="Which DICOM series when the zip holds several")] = None,
        anonymize: Annotated[bool, Form(description="De-identify the DICOM SEG (patient and study attributes, "
                                                    "hashed UIDs)")] = False,
        allow_missing_slices: Annotated[bool, Form(description="Segment a DICOM series with gaps or unreadable "
                                                               "slices anyway (refused otherwise)")] = False,
        run_anyway: Annotated[bool, Form(description="Segment a scan that does not look like the model's training "
                                                     "data (refused with 422 otherwise; recorded in the report)")] = False,
    ) -> JSONResponse:
        """Queue a scan for segmentation; answers 202 with the job id at once (429 when the queue is full)."""
        if jobs.is_full():  # cheap refusal before reading anything
            raise HTTPException(429, "the job queue is full", headers={"Retry-After": str(jobs.retry_after())})
        job_id, folder = jobs.new_folder()
        reservation = budget.reservation()  # taken from the header, before decoding; the worker releases it
        try:
            with service.reads:
                upload = store_upload(file.file, file.filename, folder, settings.max_upload_bytes)

                def admit(shape: tuple[int, ...], components: int) -> None:
                    check_result_shape(upload.path.name, shape)
                    reservation.admit(shape, components)

                stored = JobInput(upload.path.name, series_uid, allow_missing_slices, service.voxel_cap,
                                  min(service.voxel_cap, MAX_IMAGE_PIXELS))
                try:
                    scan = read_upload(upload, series_uid, max_voxels=stored.max_voxels,
                                       max_pixels=stored.max_pixels, admit=admit,
                                       allow_missing_slices=allow_missing_slices, keep=True)
                except (MedsegError, BudgetFullError) as e:
                    log.info("rejected upload sha256=%s: %s", upload.sha256, type(e).__name__)
                    raise
            problems = compatibility_problems(service, scan, run_anyway)
            job = jobs.submit(job_id, folder, scan, upload.sha256, tta, reservation, anonymize,
                              compatibility=problems, run_anyway=run_anyway, stored_input=stored)
        except BaseException as e:
            refuse(e, reservation, folder)
        return accepted(job)


def compatibility_problems(service: Service, scan: Scan, run_anyway: bool) -> list[str]:
    """How ``scan`` differs from the model's training data (`check_scan`); a mismatch is refused
    (IncompatibleScanError, 422) unless the client sent ``run_anyway``."""
    fit = check_scan(scan, service.fingerprint, service.jobs.predictor.cfg.data)
    if not fit.ok and not run_anyway:
        raise IncompatibleScanError(f"The scan does not fit this model: {fit.text()} "
                                    "Send run_anyway=true to segment it anyway.")
    return fit.problems


def refuse(err: BaseException, reservation: Any, folder: Path, status: int | None = None) -> NoReturn:
    """A job that could not be queued: its memory reservation and folder go, and the client gets ``status``
    (else the status `_refusal` gives the error) with the error's message; anything else is re-raised."""
    reservation.release()
    shutil.rmtree(folder, ignore_errors=True)
    headers = None
    if status is None:
        status, headers = _refusal(err)
    if status is None:
        raise err
    raise HTTPException(status, str(err), headers=headers) from None


def accepted(job: Job) -> JSONResponse:
    """202 with the job's id and where to poll it."""
    url = f"/v1/jobs/{job.id}"
    body = SubmittedOut(job_id=job.id, status=job.status, status_url=url)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": url})


def add_job_routes(app: FastAPI, service: Service) -> None:
    """``GET /v1/jobs/{id}`` and its results: mask, uncertainty, report."""

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=ERRORS, response_model_exclude_unset=True)
    def job_status(job_id: str) -> dict[str, Any]:
        """Where a job stands: queued, running (with progress), done or failed (with the error)."""
        job = service.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} (unknown, or deleted after its time to live)")
        return job.public()

    @app.get("/v1/jobs/{job_id}/mask", responses={**ERRORS, 200: {"content": {
        "application/gzip": {}, "image/png": {}, "application/dicom": {}}}}, response_class=FileResponse)
    def job_mask(
        job_id: str,
        format: Annotated[MaskFormat, Query()] = MaskFormat.nifti,
        values: Annotated[MaskValues, Query(description="indices: class indices as in /v1/models labels; raw: "
                                                        "the training masks' label values (e.g. 0/255)")] = MaskValues.indices,
    ) -> FileResponse:
        """The mask on the input's grid: NIfTI (any input), PNG (2D only), DICOM SEG (DICOM only; one segment per
        class, so ``values`` does not apply)."""
        job = service.finished_job(job_id)
        if format == MaskFormat.png:
            if job.is_volume:
                raise HTTPException(400, "PNG masks are for 2D images; ask for format=nifti")
            return FileResponse(job.folder / mask_file(values, format), media_type="image/png",
                                filename=f"{job_id}_mask.png")
        if format == MaskFormat.dicom_seg:
            if not job.is_dicom:
                raise HTTPException(400, "DICOM SEG needs a DICOM input; ask for format=nifti")
            if not (job.folder / MASK_DICOM_SEG).is_file():
                why = json.loads((job.folder / REPORT).read_text()).get("dicom_seg_error", "not written")
                raise HTTPException(422, f"no DICOM SEG for job {job_id}: {why}")
            return FileResponse(job.folder / MASK_DICOM_SEG, media_type="application/dicom",
                                filename=f"{job_id}_seg.dcm")
        return FileResponse(job.folder / mask_file(values, format), media_type="application/gzip",
                            filename=f"{job_id}_mask.nii.gz")

    @app.get("/v1/jobs/{job_id}/uncertainty", responses={**ERRORS, 200: {"content": {
        "application/gzip": {}, "application/octet-stream": {}}}}, response_class=FileResponse)
    def job_uncertainty(
        job_id: str, format: Annotated[UncertaintyFormat, Query()] = UncertaintyFormat.nifti
    ) -> Response:
        """Per-voxel uncertainty (normalised entropy, 0 = certain, 1 = uniform) as NIfTI or .npz
        (arrays ``uncertainty`` and ``geometry`` JSON)."""
        job = service.finished_job(job_id)
        if format == UncertaintyFormat.npz:
            return Response(uncertainty_npz(job.folder), media_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{job_id}_uncertainty.npz"'})
        return FileResponse(job.folder / UNCERTAINTY_NIFTI, media_type="application/gzip",
                            filename=f"{job_id}_uncertainty.nii.gz")

    @app.get("/v1/jobs/{job_id}/report", responses=ERRORS, response_class=FileResponse)
    def job_report(job_id: str) -> FileResponse:
        """Measurements per label (voxels; area in mm² for 2D, volume in mm³ and mL for 3D), model and upload hash."""
        job = service.finished_job(job_id)
        return FileResponse(job.folder / REPORT, media_type="application/json")


def add_model_routes(app: FastAPI, service: Service) -> None:
    """``GET /v1/models`` and ``GET /health``."""

    @app.get("/v1/models", response_model=ModelsOut)
    def models() -> ModelsOut:
        """The model this process serves (one per process)."""
        return ModelsOut(models=[service.model_info])

    @app.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
    def health() -> JSONResponse:
        """Liveness: 200 while an inference worker runs, 503 if none does (or the broker cannot be reached)."""
        alive = service.jobs.is_alive()
        settings, budget = service.settings, service.budget
        try:
            counts, depth, workers = service.jobs.counts(), service.jobs.queue_depth(), service.jobs.live_workers()
        except Exception:  # the broker is unreachable: 503 with what is known, not a traceback
            counts, depth, workers = {}, 0, 0
        body = HealthOut(status="ok" if alive else "degraded", model=service.model_info.name,
                         device=service.model_info.device, jobs=counts, queue_depth=depth, workers=workers,
                         shared_queue=bool(settings.broker), max_queued=settings.max_queued,
                         max_voxels=service.voxel_cap, memory_budget_bytes=budget.limit_bytes,
                         memory_used_bytes=budget.used_bytes, job_timeout_s=settings.job_timeout_s)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if alive else 503)


def create_app(predictor: Any, settings: ServiceSettings | None = None, model_card: str = "") -> FastAPI:
    """The service over one loaded model. ``predictor``: a ``Predictor`` or a bundle path (loaded here, once,
    on ``settings.device``; its model card is served too). The job worker starts with the app, stops with it."""
    settings = settings or ServiceSettings()
    bundle_path = Path(predictor) if isinstance(predictor, (str, Path)) else None
    predictor, model_card, fingerprint = load_predictor(predictor, settings, model_card)
    service = build_service(predictor, settings, model_card, fingerprint)
    app = FastAPI(
        title="medseg inference service", version=API_VERSION, lifespan=_lifespan(service),
        description=f"Segment medical scans with one medseg model bundle. {RESEARCH_NOTICE}",
    )
    add_guards(app, settings)
    app.state.jobs = service.jobs
    app.state.predictor = predictor
    app.state.budget = service.budget
    app.state.voxel_cap = service.voxel_cap
    add_error_handlers(app)
    add_upload_route(app, service)
    add_job_routes(app, service)
    add_model_routes(app, service)
    from medseg.service.pacs import add_pacs_routes

    add_pacs_routes(app, service)
    if settings.finetune_dir is not None and bundle_path is not None:  # fine-tunes and serves the bundle's versions
        from medseg.service.finetune import add_finetune_routes

        service.finetune = add_finetune_routes(app, bundle_path, settings, service.work_dir, ERRORS)
    return app
