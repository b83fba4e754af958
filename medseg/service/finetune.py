"""Fine-tuning on the inference service (issue 16): the app uploads its reviewed cases, the service trains the next
version of its model where the GPU is, and then serves that version beside the first.

```
POST /v1/finetune                multipart: reviews (a .zip of a review folder: images/, masks/, reviews.csv),
                                 model? (a version's name from /v1/versions; default the served bundle),
                                 max_minutes?  -> 202 {job_id, status, status_url}
GET  /v1/finetune/{id}           {status: running|done|failed, version, model, weights_hash, dice_before,
                                  dice_after, error, seconds}
GET  /v1/versions                the served bundle and every fine-tuned version: name, version, weights hash,
                                 held-aside Dice before/after, base_path
/versions/{name}/v1/...          the whole API (segment, jobs, mask, models...) for that version
```

Why upload the reviews rather than share a folder: the app and the service usually run on different machines (the
service on a GPU host), and a shared folder would couple their deployments; the review dataset is small (the cases
clinicians looked at). Fine-tuning is off unless ``medseg serve --finetune-dir`` (``MEDSEG_SERVICE_FINETUNE_DIR``)
names a writable folder: versions land there (``<model>-v2``, ``-v3``…) and are served again after a restart.

A job runs ``medseg finetune`` in a child process (its own session, logged to the job folder): training for minutes
must not block the inference worker's thread, and a crash of the training cannot take the service down. One job at
a time (a second gets 409). Each version is served by the same ``create_app`` as the service itself, with its own
job queue in ``<work_dir>/versions/<name>``, loaded on first use; so every route, limit and check is the same. With a
shared queue (``--broker``) a version's jobs go to that version's own queue (``medseg.service.shared_jobs`` keys queues
by weights hash) and are run by workers started on the version's bundle, ``medseg worker <finetune_dir>/<name>``.

Uploads are untrusted: the zip is vetted member by member (``medseg.io.archive``), and only the files a review folder
holds are kept (``images/`` and ``masks/`` as PNG or NIfTI, which cannot point at other files, and ``reviews.csv``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from pydantic import BaseModel
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from medseg.bundle import find_bundles, load_bundle
from medseg.errors import MedsegError
from medseg.io.archive import ArchiveLimits, safe_extract_zip
from medseg.io.checks import safe_reason
from medseg.service.settings import ServiceSettings
from medseg.service.uploads import store_upload

log = logging.getLogger("medseg.service")

REVIEW_FILE = re.compile(r"(images|masks)/case_[0-9a-f]{16}\.(png|nii\.gz)")
REVIEWS_CSV = "reviews.csv"
MAX_REVIEW_FILES = 20_000


class FinetuneOut(BaseModel):
    job_id: str
    status: Literal["running", "done", "failed"]
    parent: str
    version: int | None = None
    model: str | None = None  # the new version's name (what /v1/versions lists and /versions/{name} serves)
    weights_hash: str | None = None
    dice_before: float | None = None
    dice_after: float | None = None
    error: str | None = None
    seconds: float


class FinetuneSubmittedOut(BaseModel):
    job_id: str
    status: str
    status_url: str


class VersionOut(BaseModel):
    name: str
    version: int
    weights_hash: str
    parent_weights_hash: str | None = None
    dice_before: float | None = None
    dice_after: float | None = None
    base_path: str  # "" for the served bundle; "/versions/<name>" for a fine-tuned one


class VersionsOut(BaseModel):
    versions: list[VersionOut]


@dataclass
class FinetuneJob:
    id: str
    folder: Path
    parent: str
    target: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if self.finished is None:
            self.finished = time.time()
        return "done" if code == 0 and (self.target / "config.yaml").is_file() else "failed"

    def last_line(self) -> str:
        """The log's last line without paths (what a client may see of why it failed)."""
        try:
            lines = [ln for ln in (self.folder / "finetune.log").read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return safe_reason(lines[-1])[:300] if lines else ""


def _bundle_version(preprocessing: dict[str, Any]) -> int:
    try:
        return int(preprocessing.get("version") or 1)
    except (TypeError, ValueError):
        return 1


class ServedVersions:
    """The served bundle's fine-tuned versions in ``finetune_dir``, each served (once loaded) by its own app."""

    def __init__(self, bundle: Path, settings: ServiceSettings, work_dir: Path) -> None:
        self.bundle = Path(bundle)
        self.name = load_bundle(self.bundle).name
        self.settings = settings
        self.folder = Path(settings.finetune_dir)  # type: ignore[arg-type]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(work_dir) / "versions"
        self._apps: dict[str, FastAPI] = {}
        self._lock = threading.Lock()

    def paths(self) -> dict[str, Path]:
        """Version name -> bundle folder, for the bundles of this model in the versions folder."""
        out = {}
        for path in find_bundles(self.folder):
            try:
                if load_bundle(path).name == self.name:
                    out[path.name] = path
            except MedsegError:  # a half-written or damaged bundle is no version
                continue
        return out

    def listing(self) -> list[VersionOut]:
        served = load_bundle(self.bundle)
        rows = [VersionOut(name=self.bundle.name.removesuffix(".zip"), version=_bundle_version(served.preprocessing),
                           weights_hash=served.weights_hash, base_path="")]
        for name, path in self.paths().items():
            bundle = load_bundle(path)
            lineage = bundle.preprocessing.get("lineage") or {}
            rows.append(VersionOut(name=name, version=_bundle_version(bundle.preprocessing),
                                   weights_hash=bundle.weights_hash, parent_weights_hash=lineage.get("parent_weights_hash"),
                                   dice_before=lineage.get("dice_before"), dice_after=lineage.get("dice_after"),
                                   base_path=f"/versions/{name}"))
        return sorted(rows, key=lambda r: (r.version, r.name))

    def app(self, name: str) -> FastAPI | None:
        """The app serving version ``name`` (created and its worker started on first use); None when unknown."""
        with self._lock:
            if name in self._apps:
                return self._apps[name]
            path = self.paths().get(name)
            if path is None:
                return None
            from medseg.service.app import create_app

            # The same service for the version: its own job folder (and queue); no fine-tuning from inside it. With
            # a broker it keeps the broker: the shared queue is per model (weights hash), so the version's jobs wait
            # for `medseg worker <finetune_dir>/<name>` workers and its /health counts only those.
            settings = replace(self.settings, work_dir=self.work_dir / name, finetune_dir=None)
            app = create_app(path, settings)
            app.state.jobs.start()  # a mounted app's lifespan does not run: its worker is started here
            self._apps[name] = app
            log.info("serving fine-tuned version %s", name)
            return app

    def stop(self) -> None:
        with self._lock:
            for app in self._apps.values():
                app.state.jobs.stop()
            self._apps.clear()


class VersionDispatch:
    """ASGI app mounted at ``/versions/{name}``: hands the request to that version's app (404 when unknown)."""

    def __init__(self, versions: ServedVersions) -> None:
        self.versions = versions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = str(scope.get("path_params", {}).get("name", ""))
        app = self.versions.app(name) if scope["type"] == "http" else None
        if app is None:
            from starlette.responses import JSONResponse

            await JSONResponse({"error": f"no fine-tuned version {name!r}; see GET /v1/versions"},
                               status_code=404)(scope, receive, send)
            return
        await app(scope, receive, send)


class FinetuneJobs:
    """Fine-tuning jobs: one ``medseg finetune`` child process at a time."""

    def __init__(self, versions: ServedVersions, work_dir: Path, device: str, max_minutes: float,
                 max_upload_bytes: int) -> None:
        self.versions = versions
        self.work_dir = Path(work_dir) / "finetune-jobs"
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.device = device
        self.max_minutes = max_minutes
        self.max_upload_bytes = max_upload_bytes
        self._jobs: dict[str, FinetuneJob] = {}
        self._lock = threading.Lock()

    def running(self) -> FinetuneJob | None:
        return next((j for j in self._jobs.values() if j.state() == "running"), None)

    def get(self, job_id: str) -> FinetuneJob | None:
        return self._jobs.get(job_id)

    def _parent(self, model: str | None) -> Path:
        if not model or model == self.versions.bundle.name.removesuffix(".zip"):
            return self.versions.bundle
        path = self.versions.paths().get(model)
        if path is None:
            raise HTTPException(404, f"no version {model!r} to fine-tune; see GET /v1/versions")
        return path

    def _target(self) -> Path:
        """The next free version after the newest one: fine-tuning v1 when v3 exists gives v4, never overwrites."""
        stem = re.sub(r"-v\d+$", "", self.versions.bundle.name.removesuffix(".zip"))
        taken = [v.version for v in self.versions.listing()]
        return self.versions.folder / f"{stem}-v{max(taken, default=1) + 1}"

    def _store_reviews(self, file: UploadFile, folder: Path) -> Path:
        upload = store_upload(file.file, "reviews.zip", folder, self.max_upload_bytes)
        raw = folder / "unpacked"
        raw.mkdir()
        try:
            archive = safe_extract_zip(upload.path, raw, ArchiveLimits(max_members=MAX_REVIEW_FILES,
                                                                        max_total_bytes=4 * self.max_upload_bytes))
        except MedsegError as e:
            raise HTTPException(422, f"reviews: {safe_reason(e)}") from None
        reviews = folder / "reviews"
        kept = 0
        for path in archive.files:
            member = archive.member_name(path).as_posix()
            if member == REVIEWS_CSV or REVIEW_FILE.fullmatch(member):
                (reviews / member).parent.mkdir(parents=True, exist_ok=True)
                path.rename(reviews / member)
                kept += member != REVIEWS_CSV
            else:  # a review folder holds nothing else; anything more is not what the app sends
                raise HTTPException(422, f"reviews: unexpected member {Path(member).name!r} (a review folder holds "
                                         "images/ and masks/ as PNG or NIfTI, and reviews.csv)")
        shutil.rmtree(raw, ignore_errors=True)
        upload.path.unlink()
        if not (reviews / REVIEWS_CSV).is_file() or not kept:
            raise HTTPException(422, "reviews: not a review folder (no reviews.csv, or no images/ and masks/)")
        return reviews

    def submit(self, file: UploadFile, model: str | None, max_minutes: float | None) -> FinetuneJob:
        from medseg.engine.finetune import MIN_REVIEWED, reviewed_cases

        with self._lock:
            if self.running() is not None:
                raise HTTPException(409, "a fine-tuning job is running; try again when it has finished")
            minutes = min(self.max_minutes, max_minutes or self.max_minutes)
            if minutes <= 0:
                raise HTTPException(422, "max_minutes must be positive")
            parent = self._parent(model)
            job_id = uuid.uuid4().hex
            folder = self.work_dir / job_id
            folder.mkdir(mode=0o700)
            try:
                reviews = self._store_reviews(file, folder)
                n = len(reviewed_cases(reviews))
                if n < MIN_REVIEWED:
                    raise HTTPException(422, f"reviews: {n} accepted or corrected case(s); fine-tuning needs at least "
                                             f"{MIN_REVIEWED}")
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            target = self._target()
            with open(folder / "finetune.log", "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "medseg.cli", "finetune", str(parent), "--data", str(reviews),
                     "--out", str(target), "--max-minutes", f"{minutes:g}", "--device", self.device],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                )
            job = FinetuneJob(job_id, folder, parent.name, target, process)
            self._jobs[job_id] = job
            log.info("fine-tuning job %s: %s -> %s (%d reviewed cases, %g min)", job_id, parent.name, target.name, n,
                     minutes)
            return job

    def public(self, job: FinetuneJob) -> FinetuneOut:
        state = job.state()
        out = FinetuneOut(job_id=job.id, status=state, parent=job.parent,  # type: ignore[arg-type]
                          seconds=round((job.finished or time.time()) - job.started, 1))
        if state == "done":
            bundle = load_bundle(job.target)
            lineage = bundle.preprocessing.get("lineage") or {}
            out.version, out.model, out.weights_hash = _bundle_version(bundle.preprocessing), job.target.name, \
                bundle.weights_hash
            out.dice_before, out.dice_after = lineage.get("dice_before"), lineage.get("dice_after")
        elif state == "failed":
            out.error = job.last_line() or f"medseg finetune exited with code {job.process.returncode}"
        return out

    def stop(self) -> None:
        for job in self._jobs.values():
            if job.process.poll() is None:
                os.killpg(job.process.pid, signal.SIGTERM)
                try:
                    job.process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(job.process.pid, signal.SIGKILL)


def add_finetune_routes(app: FastAPI, bundle: Path, settings: ServiceSettings, work_dir: Path,
                        errors: dict[int | str, dict[str, Any]]) -> FinetuneJobs:
    """The fine-tuning routes, ``GET /v1/versions`` and the versions' own APIs under ``/versions/{name}``."""
    versions = ServedVersions(bundle, settings, work_dir)
    device = settings.device
    jobs = FinetuneJobs(versions, work_dir, device, settings.finetune_max_minutes, settings.max_upload_bytes)

    @app.post("/v1/finetune", status_code=202, response_model=FinetuneSubmittedOut, responses=errors)
    def finetune(
        reviews: Annotated[UploadFile, File(description="A .zip of a review folder (images/, masks/, reviews.csv)")],
        model: Annotated[str | None, Form(description="The version to start from (a name from /v1/versions); "
                                                      "default: the served bundle")] = None,
        max_minutes: Annotated[float | None, Form(description="Training budget; at most the service's "
                                                              "finetune_max_minutes")] = None,
    ) -> Any:
        """Train the next version on the uploaded reviews, in the background; 409 while another job runs."""
        from fastapi.responses import JSONResponse

        job = jobs.submit(reviews, model, max_minutes)
        url = f"/v1/finetune/{job.id}"
        body = FinetuneSubmittedOut(job_id=job.id, status="running", status_url=url)
        return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})

    @app.get("/v1/finetune/{job_id}", response_model=FinetuneOut, responses=errors)
    def finetune_status(job_id: str) -> FinetuneOut:
        """Where a fine-tuning job stands; when done, the new version's name, weights hash and held-aside Dice."""
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no fine-tuning job {job_id}")
        return jobs.public(job)

    @app.get("/v1/versions", response_model=VersionsOut)
    def list_versions() -> VersionsOut:
        """The served bundle and its fine-tuned versions, oldest first; a version's API is at its base_path."""
        return VersionsOut(versions=versions.listing())

    app.router.routes.append(Mount("/versions/{name}", app=VersionDispatch(versions)))
    return jobs

