"""Fine-tuning from the app: ``medseg finetune`` as a background process, one per model at a time, shared by every
session of this server (the job outlives the session that started it); the new version lands in the models folder,
where the model picker finds it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from app.escape import markdown_text
from app.settings import AppSettings
from medseg.bundle import Bundle
from medseg.engine.finetune import next_version_path, reviewed_cases

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


@st.cache_resource
def finetune_jobs() -> FinetuneJobs:
    return FinetuneJobs()


def finetune_minutes() -> float:
    import os

    raw = os.environ.get("MEDSEG_FINETUNE_MINUTES", "").strip()
    try:
        return float(raw) if raw else DEFAULT_MINUTES
    except ValueError:
        return DEFAULT_MINUTES


def finetune_panel(bundle: Bundle | None, bundle_path: Path | None, settings: AppSettings, user: str | None) -> None:
    """The sidebar's fine-tune button and the job's state (only for users allowed to fine-tune, local models)."""
    if bundle is None or bundle_path is None or not settings.may_finetune(user):
        return
    jobs = finetune_jobs()
    job = jobs.get(bundle_path)
    n = len(reviewed_cases(settings.review_dir)) if settings.review_dir.is_dir() else 0
    minutes = finetune_minutes()
    if job is not None and job.running:
        _running(job, minutes)
        return
    if job is not None and job.succeeded:
        st.success(f"New version ready: **{markdown_text(job.target.name)}** — choose it above. "
                   f"{markdown_text(job.last_line())}", icon=":material/task_alt:")
    elif job is not None:
        st.error(f"Fine-tuning failed: {markdown_text(job.last_line())}", icon=":material/error:")
    if st.button(f"Fine-tune from {n} reviewed case{'s' if n != 1 else ''}", key="finetune_start",
                 icon=":material/model_training:", disabled=n < 2,
                 help=f"Trains the next version of this model on the accepted and corrected cases ({minutes:g} min "
                 "budget), in the background; at least 2 are needed (one is held aside to compare the versions)."):
        jobs.start(bundle, bundle_path, settings, minutes)
        st.rerun()


@st.fragment(run_every=2)
def _running(job: FinetuneJob, minutes: float) -> None:
    """Redrawn every 2 s while the job runs; when it ends, the whole page reruns so the picker lists the version."""
    if not job.running:
        st.rerun(scope="app")
    st.info(f"Fine-tuning {markdown_text(job.target.name)}… {time.time() - job.started:.0f} s "
            f"(budget {minutes:g} min)", icon=":material/model_training:")
