"""Jobs: one interface (``JobQueue``'s methods, the ``Jobs`` protocol) with two implementations, chosen by
``make_jobs`` from the settings:

* ``JobQueue`` (default, one machine): a bounded FIFO in memory worked by one thread that owns the model, and
  a TTL on everything a job leaves. One worker thread per process: the model is loaded once and a GPU runs one
  scan at a time anyway, so more threads would only add contention.
* ``medseg.service.shared_jobs.SharedJobs`` (``MEDSEG_SERVICE_BROKER=redis://...``): jobs in Redis through
  Dramatiq, worked by ``medseg worker`` processes (one per GPU, any machine), files in a shared folder.

Both run a job with ``JobRunner`` (predict, time limit, result files), so a job's files are the same either way.

Time limit: the model runs in the worker thread, which Python cannot interrupt from outside, so cancellation
is cooperative. A job's deadline is checked by its progress callback (after every model pass: each TTA view,
ensemble member and 2.5D slice batch) and by a forward pre-hook on every ensemble member (before every
network call: every tile batch of a large image; members run through ``torch.compile`` may skip the hook, and
then stop at the next pass). Past ``job_timeout_s`` the check raises ``JobTimeoutError``:
the job fails with that message and the worker takes the next job. Work between two checks (post-processing,
writing the result files) is bounded by the voxel cap.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import queue
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from medseg.config import TTAMode
from medseg.errors import MedsegError
from medseg.io import Scan
from medseg.io.checks import safe_reason
from medseg.service.results import write_results

log = logging.getLogger("medseg.service")

_JOB_FOLDER = re.compile(r"[0-9a-f]{32}")
LOCK_FILE = ".medseg-service.lock"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


def _lock_work_dir(work_dir: Path) -> Any:
    """An exclusive lock on ``work_dir`` for this process's lifetime (the start-up purge would delete another
    live process's jobs)."""
    handle = open(work_dir / LOCK_FILE, "a")  # noqa: SIM115 - held open until JobQueue.stop
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise MedsegError(
            f"{work_dir.name}: this work_dir is in use by another medseg service process; give each process its own"
        ) from None
    os.chmod(work_dir / LOCK_FILE, 0o600)
    return handle


def public_error(err: BaseException) -> str:
    """What a client sees of a failure: one line, no paths, no heap addresses; ours as written, others typed."""
    if isinstance(err, (JobTimeoutError, MedsegError)):
        return safe_reason(err)
    return f"{type(err).__name__}: {safe_reason(err)}"


class JobTimeoutError(Exception):
    """A job ran past the service's compute time limit."""


class QueueFullError(Exception):
    """No room for another job; ``retry_after`` is a whole-second estimate of when there will be."""

    def __init__(self, retry_after: int):
        super().__init__(f"the job queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class JobInput:
    """How a worker reads the job's stored input again (a worker on another machine gets the file, not the Scan):
    ``upload``: its file (or folder: a series retrieved from a PACS) in the job folder; the reader options the
    API used."""

    upload: str
    series_uid: str | None = None
    allow_missing_slices: bool = False
    max_voxels: int | None = None
    max_pixels: int | None = None


@dataclass
class Job:
    id: str
    folder: Path
    sha256: str
    tta: TTAMode | None  # None: the bundle's default
    anonymize: bool = False  # de-identify the DICOM SEG
    compatibility: tuple[str, ...] = ()  # how the scan differs from the training data (run anyway when non-empty)
    run_anyway: bool = False
    status: JobStatus = JobStatus.queued
    progress: float = 0.0
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    is_volume: bool = False
    is_dicom: bool = False
    scan: Scan | None = None  # dropped once the result files are written
    reservation: Any = None  # its share of the memory budget (``budget.Reservation``), released when it ends
    # A job from a PACS (``medseg.service.pacs.PacsSource``): its SEG's UIDs derive from the job id, and
    # ``after_results(job, written)`` runs once the result files exist (storing the SEG back).
    source: Any = None
    after_results: Callable[[Job, dict[str, Path]], None] | None = None

    def public(self) -> dict[str, Any]:
        out = {"job_id": self.id, "status": str(self.status), "progress": round(self.progress, 4), "error": self.error}
        if self.source is not None:
            out["pacs"] = self.source.public()
        return out


class Jobs(Protocol):
    """What the routes use of a job queue; ``JobQueue`` and ``SharedJobs`` implement it."""

    predictor: Any  # the model's description (config, labels, hashes); only workers run it

    def start(self) -> None: ...
    def stop(self, timeout: float = 30.0) -> None: ...
    def is_alive(self) -> bool: ...
    def new_folder(self) -> tuple[str, Path]: ...
    def is_full(self) -> bool: ...
    def retry_after(self) -> int: ...
    def submit(self, job_id: str, folder: Path, scan: Scan, sha256: str, tta: TTAMode | None,
               reservation: Any = None, anonymize: bool = False, compatibility: tuple[str, ...] = (),
               run_anyway: bool = False, source: Any = None,
               after_results: Callable[[Job, dict[str, Path]], None] | None = None,
               stored_input: JobInput | None = None) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def counts(self) -> dict[str, int]: ...
    def queue_depth(self) -> int: ...
    def live_workers(self) -> int: ...
    def save_source(self, job: Job) -> None: ...


class JobRunner:
    """Runs one job at a time on ``predictor`` and writes its result files; enforces the compute time limit.

    The deadline is checked by the progress callback and by a forward pre-hook on every ensemble member, but
    only in the thread running the job (another thread using the same predictor is not stopped)."""

    def __init__(self, predictor: Any, job_timeout_s: float = math.inf):
        self.predictor = predictor
        self.job_timeout_s = job_timeout_s
        self._deadline: float | None = None  # of the running job (monotonic clock); None while idle
        self._owner: threading.Thread | None = None
        self._hooks = [
            member.register_forward_pre_hook(self._check_deadline_hook)
            for member in getattr(predictor, "members", None) or []
            if hasattr(member, "register_forward_pre_hook")
        ]

    def close(self) -> None:
        for hook in self._hooks:  # the predictor may outlive the queue (tests, reloads)
            hook.remove()
        self._hooks = []

    def check_deadline(self) -> None:
        deadline = self._deadline
        if deadline is not None and time.monotonic() > deadline and threading.current_thread() is self._owner:
            raise JobTimeoutError(
                f"the job ran past the service's compute time limit of {self.job_timeout_s:g} s "
                "(job_timeout_s) and was stopped"
            )

    def _check_deadline_hook(self, _module: Any, _inputs: Any) -> None:
        self.check_deadline()

    def run(self, job: Job, scan: Scan, progress: Callable[[float], None], salt: str,
            after_results: Callable[[Job, dict[str, Path]], None] | None = None) -> None:
        """Predict ``scan`` and write the files into ``job.folder``; ``progress(fraction)`` gets 0.05..0.95.
        ``after_results(job, files)`` runs inside the time limit (storing the SEG back to a PACS). A job from a
        PACS (``job.source``) gets SEG UIDs derived from its id, so a rerun writes the same SEG instance.
        Raises what failed."""
        self._owner = threading.current_thread()
        self._deadline = time.monotonic() + self.job_timeout_s if math.isfinite(self.job_timeout_s) else None

        def report(fraction: float) -> None:
            self.check_deadline()
            progress(min(0.95, 0.05 + 0.9 * float(fraction)))  # 1.0 only once the files are written

        try:
            pred = self.predictor.predict_scan(scan, tta=job.tta, progress=report)
            self.check_deadline()
            progress(0.95)
            info = {
                "job_id": job.id, "upload_sha256": job.sha256, "model": self.predictor.name,
                "weights_hash": self.predictor.weights_hash, "tta": str(self.predictor.tta_mode(job.tta)),
                "run_anyway": job.run_anyway, "compatibility_problems": list(job.compatibility),
            }
            files = write_results(job.folder, scan, pred.mask, pred.uncertainty, self.predictor.labels, info,
                                  label_map=self.predictor.cfg.data.label_map, anonymize=job.anonymize, salt=salt,
                                  uid_key=job.id if job.source is not None else None)
            if after_results is not None:
                after_results(job, files)
        finally:
            self._deadline = None
            self._owner = None


class JobQueue:
    """``submit`` a scan, the worker predicts it and writes the result files into the job's folder.

    ``predictor``: a ``medseg.inference.Predictor`` (``predict_scan(scan, tta=, progress=)``, ``tta_mode``,
    ``name``, ``weights_hash``, ``labels``; never changed here: the job's TTA goes to each call).

    ``work_dir`` belongs to this queue alone (a lock file says so; a second process gets ``MedsegError``). Jobs
    live in memory, so job folders found there at start-up are from a process that died: they are deleted
    (they may hold DICOM SEGs with patient data). Folders are ``0700``, files ``0600``.
    """

    def __init__(self, predictor: Any, work_dir: Path, max_queued: int, job_ttl_s: float, max_jobs: int,
                 job_timeout_s: float = math.inf):
        self.predictor = predictor
        self.job_timeout_s = job_timeout_s
        self.salt = secrets.token_hex(16)  # hashes DICOM UIDs of anonymized SEGs; never leaves this process
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.work_dir.chmod(0o700)
        except PermissionError:  # a mounted folder owned by someone else: its owner decides
            log.warning("work_dir %s: cannot make it private (0700)", self.work_dir.name)
        self._lock_file = _lock_work_dir(self.work_dir)
        stale = [p for p in self.work_dir.iterdir() if p.is_dir() and _JOB_FOLDER.fullmatch(p.name)]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        if stale:
            log.info("deleted %d job folder(s) left by a previous service process", len(stale))
        self.job_ttl_s = job_ttl_s
        self.max_jobs = max_jobs
        self._pending: queue.Queue[Job] = queue.Queue(maxsize=max_queued)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seconds_per_job = 1.0  # running estimate for Retry-After
        self._thread = threading.Thread(target=self._work, name="medseg-inference", daemon=True)
        self._runner = JobRunner(predictor, job_timeout_s)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._runner.close()
        self._lock_file.close()  # releases the work_dir lock

    # --------------------------------------------------------------------------------------------- API

    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id and its folder (the upload is stored there before the job exists)."""
        job_id = uuid.uuid4().hex
        folder = self.work_dir / job_id
        folder.mkdir(mode=0o700)
        folder.chmod(0o700)  # mkdir's mode passes through the umask
        return job_id, folder

    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds_per_job * (self._pending.qsize() + 1)))

    def is_full(self) -> bool:
        return self._pending.full()

    def submit(self, job_id: str, folder: Path, scan: Scan, sha256: str, tta: TTAMode | None,
               reservation: Any = None, anonymize: bool = False, compatibility: tuple[str, ...] = (),
               run_anyway: bool = False, source: Any = None,
               after_results: Callable[[Job, dict[str, Path]], None] | None = None,
               stored_input: JobInput | None = None) -> Job:
        """Queue a scan for prediction; raises ``QueueFullError`` (the caller deletes ``folder`` and releases
        ``reservation``; once queued, the worker releases it when the job ends). The worker here gets ``scan``
        itself, so the stored input file (``stored_input``) is deleted at once."""
        if stored_input is not None:
            _delete(folder / stored_input.upload)
        job = Job(job_id, folder, sha256, tta, anonymize, is_volume=scan.is_volume,
                  is_dicom=scan.meta.get("format") == "dicom", scan=scan, reservation=reservation,
                  compatibility=tuple(compatibility), run_anyway=run_anyway, source=source,
                  after_results=after_results)
        with self._lock:
            self._jobs[job.id] = job
        try:
            self._pending.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise QueueFullError(self.retry_after()) from None
        log.info("job %s queued: upload sha256=%s tta=%s", job.id, sha256, tta or "default")
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {str(s): 0 for s in JobStatus}
            for j in self._jobs.values():
                out[str(j.status)] += 1
        return out

    def queue_depth(self) -> int:
        return self._pending.qsize()

    def live_workers(self) -> int:
        return int(self._thread.is_alive())

    def save_source(self, job: Job) -> None:
        """Nothing to do: the job lives in this process's memory."""

    # ---------------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._pending.get(timeout=1.0)
            except queue.Empty:
                self.purge()
                continue
            self._run(job)
            self.purge()

    def _run(self, job: Job) -> None:
        start = time.time()
        job.status, job.progress = JobStatus.running, 0.05
        scan = job.scan
        assert scan is not None

        def progress(value: float) -> None:
            job.progress = value

        try:
            self._runner.run(job, scan, progress, self.salt, job.after_results)
            job.status, job.progress = JobStatus.done, 1.0
            log.info("job %s done in %.2f s", job.id, time.time() - start)
        except Exception as e:  # a broken scan or a writer bug fails this job, never the worker
            job.status, job.error = JobStatus.failed, public_error(e)
            log.warning("job %s failed: %s", job.id, type(e).__name__)
        finally:
            job.scan = None  # free the pixels (and DICOM headers) now; the files stay until the TTL
            if job.reservation is not None:
                job.reservation.release()
            job.finished = time.time()
            self._seconds_per_job = 0.7 * self._seconds_per_job + 0.3 * (job.finished - start)

    # ------------------------------------------------------------------------------------------- TTL

    def purge(self, now: float | None = None) -> list[str]:
        """Delete finished jobs older than the TTL, and the oldest finished ones beyond ``max_jobs``."""
        now = time.time() if now is None else now
        with self._lock:
            finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished or 0)
            expired = [j for j in finished if now - (j.finished or now) > self.job_ttl_s]
            overflow = max(0, len(self._jobs) - self.max_jobs)
            for j in finished:
                if overflow <= len(expired):
                    break
                if j not in expired:
                    expired.append(j)
            for j in expired:
                self._jobs.pop(j.id, None)
        for j in expired:
            shutil.rmtree(j.folder, ignore_errors=True)
        if expired:
            log.info("purged %d finished job(s)", len(expired))
        return [j.id for j in expired]


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def make_jobs(predictor: Any, settings: Any, work_dir: Path) -> Jobs:
    """The shared queue when ``settings.broker`` is set (``SharedJobs``), else the in-process ``JobQueue``."""
    if settings.broker:
        from medseg.service.shared_jobs import SharedJobs

        return SharedJobs(predictor, settings)
    return JobQueue(predictor, work_dir, settings.max_queued, settings.job_ttl_s, settings.max_jobs,
                    settings.job_timeout_s)
