"""Fine-tuning from the app: ``medseg finetune`` as a background process, one per model at a time, shared by every
session of this server (the job outlives the session that started it); the new version lands in the models folder,
where the model picker finds it.

With a remote inference service (``MEDSEG_INFERENCE_URL``) the service fine-tunes instead: the app uploads its review
folder as one zip (``POST /v1/finetune``, ``medseg.service.finetune``), the service trains on its own GPU and then
serves the new version, which the sidebar's version picker lists. The app and the service need not share a disk,
and the model is trained where it is served (the app's machine may have no GPU, and no copy of the bundle)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from app.escape import markdown_text
from app.settings import AppSettings
from medseg.bundle import Bundle
from medseg.engine.finetune import next_version_path, reviewed_cases
from medseg.errors import MedsegError

DEFAULT_MINUTES = 10.0


@dataclass
class FinetuneJob:
    target: Path
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def succeeded(self) -> bool:
        return self.process.poll() == 0

    @property
    def name(self) -> str:
        return self.target.name

    def last_line(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""


class FinetuneJobs:
    """The server's fine-tuning jobs by parent bundle path."""

    def __init__(self) -> None:
        self._jobs: dict[str, FinetuneJob] = {}
        self._lock = threading.Lock()

    def get(self, bundle: Path) -> FinetuneJob | None:
        return self._jobs.get(str(bundle))

    def start(self, bundle: Bundle, bundle_path: Path, settings: AppSettings, minutes: float) -> FinetuneJob:
        with self._lock:
            current = self._jobs.get(str(bundle_path))
            if current is not None and current.running:
                return current
            target = next_version_path(bundle_path, bundle, settings.models_dir)
            log = settings.models_dir / f".{target.name}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "medseg.cli", "finetune", str(bundle_path), "--data",
                     str(settings.review_dir), "--out", str(target), "--max-minutes", f"{minutes:g}"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            job = FinetuneJob(target, log, process)
            self._jobs[str(bundle_path)] = job
            return job


@dataclass
class RemoteFinetuneJob:
    """A fine-tuning job on the inference service, polled (at most once a second) through ``GET /v1/finetune/{id}``."""

    client: Any  # medseg.service.client.RemotePredictor of the service's root URL
    job_id: str
    started: float = field(default_factory=time.time)
    _status: dict[str, Any] = field(default_factory=dict)
    _polled: float = 0.0

    def status(self) -> dict[str, Any]:
        if time.monotonic() - self._polled > 1.0:
            try:
                self._status = self.client.finetune_status(self.job_id)
            except Exception as e:  # noqa: BLE001 - the service restarted (job gone) or is unreachable
                self._status = {"status": "failed", "error": str(e)}
            self._polled = time.monotonic()
        return self._status

    @property
    def running(self) -> bool:
        return self.status().get("status") == "running"

    @property
    def succeeded(self) -> bool:
        return self.status().get("status") == "done"

    @property
    def name(self) -> str:
        return str(self.status().get("model") or "the next version")

    def last_line(self) -> str:
        status = self.status()
        if status.get("status") == "done" and status.get("dice_after") is not None:
            return (f"Held-aside Dice {status['dice_before']:.3f} → {status['dice_after']:.3f}; trained on the "
                    "inference service.")
        return str(status.get("error") or "")


class RemoteFinetuneJobs:
    """The server's fine-tuning jobs on the inference service, by service URL and parent version."""

    def __init__(self) -> None:
        self._jobs: dict[str, RemoteFinetuneJob] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> RemoteFinetuneJob | None:
        return self._jobs.get(key)

    def start(self, key: str, client: Any, parent: str, review_dir: Path, minutes: float) -> RemoteFinetuneJob:
        """Upload the review folder (one zip) and start the job; raises ``MedsegError`` with the service's reason."""
        import tempfile

        from medseg.review import zip_reviews

        with self._lock:
            current = self._jobs.get(key)
            if current is not None and current.running:
                return current
            with tempfile.TemporaryDirectory(prefix="medseg-reviews-") as tmp:
                zipped = zip_reviews(review_dir, Path(tmp) / "reviews.zip")
                job_id = client.start_finetune(zipped, model=parent or None, max_minutes=minutes)
            job = RemoteFinetuneJob(client, job_id)
            self._jobs[key] = job
            return job


@st.cache_resource
def finetune_jobs() -> FinetuneJobs:
    return FinetuneJobs()


@st.cache_resource
def remote_finetune_jobs() -> RemoteFinetuneJobs:
    return RemoteFinetuneJobs()


def finetune_minutes() -> float:
    import os

    raw = os.environ.get("MEDSEG_FINETUNE_MINUTES", "").strip()
    try:
        return float(raw) if raw else DEFAULT_MINUTES
    except ValueError:
        return DEFAULT_MINUTES


def finetune_panel(model: Any, settings: AppSettings, user: str | None) -> None:
    """The sidebar's fine-tune button and the job's state (only for users allowed to fine-tune). ``model``: the
    sidebar's ``ModelChoice`` (a local bundle, or a version on the inference service)."""
    if not settings.may_finetune(user) or (model.bundle is None and not model.inference_url):
        return
    remote = model.bundle is None
    if remote:
        jobs, key = remote_finetune_jobs(), f"{settings.inference_url}#{model.remote_name}"
    else:
        jobs, key = finetune_jobs(), model.bundle_path
    job = jobs.get(key)
    n = len(reviewed_cases(settings.review_dir)) if settings.review_dir.is_dir() else 0
    minutes = finetune_minutes()
    if job is not None and job.running:
        _running(job, minutes)
        return
    if job is not None and job.succeeded:
        st.success(f"New version ready: **{markdown_text(job.name)}** — choose it above. "
                   f"{markdown_text(job.last_line())}", icon=":material/task_alt:")
    elif job is not None:
        st.error(f"Fine-tuning failed: {markdown_text(job.last_line())}", icon=":material/error:")
    where = "on the inference service" if remote else "in the background"
    if st.button(f"Fine-tune from {n} reviewed case{'s' if n != 1 else ''}", key="finetune_start",
                 icon=":material/model_training:", disabled=n < 2,
                 help=f"Trains the next version of this model on the accepted and corrected cases ({minutes:g} min "
                 f"budget), {where}; at least 2 are needed (one is held aside to compare the versions)."):
        if not remote:
            jobs.start(model.bundle, model.bundle_path, settings, minutes)
            st.rerun()
        from app.predictors import get_predictor

        try:
            jobs.start(key, get_predictor(inference_url=settings.inference_url, bundle_path=None), model.remote_name,
                       settings.review_dir, minutes)
        except MedsegError as e:  # fine-tuning off on the service, a job already running there, a refused upload
            st.error(f"Fine-tuning did not start: {markdown_text(e)}", icon=":material/error:")
            return
        st.rerun()


@st.fragment(run_every=2)
def _running(job: FinetuneJob | RemoteFinetuneJob, minutes: float) -> None:
    """Redrawn every 2 s while the job runs; when it ends, the whole page reruns so the picker lists the version."""
    if not job.running:
        st.rerun(scope="app")
    target = "the next version" if isinstance(job, RemoteFinetuneJob) else job.name
    st.info(f"Fine-tuning {markdown_text(target)}… {time.time() - job.started:.0f} s "
            f"(budget {minutes:g} min)", icon=":material/model_training:")
