"""Jobs shared by many API replicas and GPU workers: state in Redis, delivery by Dramatiq, files in one folder.

``SharedJobs`` (the API side of ``medseg.service.jobs.Jobs``) stores the upload in ``results_dir/<job id>/``,
writes the job's record into Redis and sends its id through Dramatiq's Redis broker; any replica answers any
job id from that record. ``SharedWorker`` (``medseg worker BUNDLE --broker URL``, one per GPU) takes one message
at a time, reads the upload again, predicts with the same ``JobRunner`` as the in-process queue and writes the
files next to the upload, where every replica reads them.

Why Dramatiq: its Redis broker acknowledges a message only after the job returns; messages a worker had taken
stay in that worker's ack set, and when the worker stops heart-beating (SIGKILL, power loss) another worker's
broker maintenance puts them back on the queue (at-least-once, ``tests/deploy/test_scale_out.py`` checks it
with SIGKILL). What Dramatiq leaves to us, done here:

* **Bounded retries**: every delivery increments the record's ``attempts``; past ``max_attempts`` (a scan that
  kills each worker that takes it) the job fails instead of going round forever. Errors inside a job (a broken
  scan, a timeout) fail it at once; they are never retried.
* **Never done twice**: a redelivered job that is already done or failed is acknowledged and skipped; a job
  finishes only for the attempt that owns it (a worker presumed dead that comes back cannot overwrite the
  record). The DICOM SEG's UIDs derive from input, mask and model with one salt shared through Redis, so a
  rerun after a kill writes the same SEG instance, and a PACS keeps one.
* **Queue depth and workers** for ``/health`` and 429: an index of job ids per status (sorted sets) and worker
  heartbeats (a sorted set of worker id -> last beat).

**One queue per model** (keyed by the bundle's weights hash): the Dramatiq queue, the index of queued jobs, the worker
heartbeats and the seconds-per-job estimate. A fine-tuned version served beside the bundle
(``medseg.service.finetune``) is another model: its jobs wait for ``medseg worker VERSION_BUNDLE`` processes and never
reach a worker that loaded other weights (which could only fail them), its ``/health`` counts its own workers, and a
version without workers fills its own queue bound, not the bundle's. Dramatiq requeues a dead worker's messages
during maintenance of that same queue, so redelivery stays among the workers of one model. Job records, the status
index behind ``/health``'s job counts, the TTL purge and the results folder stay shared by all models.

Redis keys live under ``medseg:``; Dramatiq's under ``medseg-dramatiq:``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from medseg.config import TTAMode
from medseg.errors import MedsegError
from medseg.io import Scan
from medseg.service.jobs import Job, JobInput, JobRunner, JobStatus, QueueFullError, public_error

log = logging.getLogger("medseg.service")

QUEUE = "medseg-segment"  # the Dramatiq queue of one model is QUEUE-<weights hash> (queue_name)
ACTOR = "segment"
DRAMATIQ_NAMESPACE = "medseg-dramatiq"
PREFIX = "medseg"
SALT = f"{PREFIX}:salt"  # hashes DICOM UIDs of anonymized SEGs; the same for every worker, never leaves Redis
# Longest pause between two polls of the queue (ms). Dramatiq backs off while a worker is busy too, so this is
# also the longest wait between the end of one job and the start of the next: Dramatiq's 1 s default cost
# small scans more than their compute.
POLL_MS = 100
# One broker maintenance (requeue the messages of dead workers) per this many broker calls out of a million;
# an idle worker polls up to 10 times a second, so a dead worker's job is back about a second after its timeout.
MAINTENANCE_CHANCE = 50_000
_JOB_ID = re.compile(r"[0-9a-f]{32}")
# A folder in results_dir without a job record this long after it was made: an upload whose API replica died
# before queueing it, or a purged job whose folder removal failed.
ORPHAN_FOLDER_S = 600.0

# Queue the job only while fewer than ARGV[2] of its model's jobs (KEYS[3]) are queued: one atomic step across
# all replicas. KEYS[1]: the queued index of all models (the /health counts).
_SUBMIT = """
if redis.call('zcard', KEYS[3]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], ARGV[3], ARGV[1])
redis.call('zadd', KEYS[3], ARGV[3], ARGV[1])
redis.call('hset', KEYS[2], unpack(ARGV, 4))
return 1
"""

# Move a job to a new status, only for the attempt that owns it (ARGV[2]; '' = any attempt). KEYS[2..]: the status
# index (in JobStatus order), then the job's model's queued index, which it leaves whatever the new status.
_TRANSITION = """
if ARGV[2] ~= '' and redis.call('hget', KEYS[1], 'attempts') ~= ARGV[2] then return 0 end
if redis.call('exists', KEYS[1]) == 0 then return 0 end
for i = 2, #KEYS do redis.call('zrem', KEYS[i], ARGV[1]) end
redis.call('zadd', KEYS[2 + tonumber(ARGV[3])], ARGV[4], ARGV[1])
redis.call('hset', KEYS[1], unpack(ARGV, 5))
return 1
"""


def status_key(status: JobStatus) -> str:
    return f"{PREFIX}:jobs:{status}"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def queue_name(model: str) -> str:
    """The Dramatiq queue of the model with weights hash ``model``: only workers that loaded it consume it."""
    return f"{QUEUE}-{model}"


def queued_key(model: str) -> str:
    """Sorted set: the model's queued job ids (its queue depth and queue bound)."""
    return f"{PREFIX}:queued:{model}"


def workers_key(model: str) -> str:
    """Sorted set: worker id -> unix time of its last heartbeat, for the workers of one model."""
    return f"{PREFIX}:workers:{model}"


def seconds_per_job_key(model: str) -> str:
    """The model's running estimate of seconds per job, for Retry-After."""
    return f"{PREFIX}:seconds-per-job:{model}"


def redacted(url: str) -> str:
    """The broker URL without its password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def make_broker(url: str, worker_timeout_s: float) -> Any:
    """Dramatiq's Redis broker without middleware: no Retries (a failed job is failed, a lost one comes back
    through the broker), no TimeLimit (``JobRunner`` has the time limit)."""
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=url, middleware=[], namespace=DRAMATIQ_NAMESPACE,
                       heartbeat_timeout=int(worker_timeout_s * 1000), maintenance_chance=MAINTENANCE_CHANCE)


class SharedStore:
    """Job records, their status index and the job folders in ``results_dir`` (all models); the queued index,
    worker heartbeats and seconds per job of one model (``model``: its weights hash)."""

    def __init__(self, url: str, results_dir: Path, job_ttl_s: float, max_jobs: int, worker_timeout_s: float,
                 model: str):
        import redis

        self.url = url
        self.model = model
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=10)
        self.results_dir = Path(results_dir)
        self.job_ttl_s = job_ttl_s
        self.max_jobs = max_jobs
        self.worker_timeout_s = worker_timeout_s
        self._submit = self.redis.register_script(_SUBMIT)
        self._transition = self.redis.register_script(_TRANSITION)

    def check(self) -> None:
        """Reach Redis and make the results folder, or raise ``MedsegError`` saying which failed."""
        import redis

        try:
            self.redis.ping()
        except redis.RedisError as e:
            raise MedsegError(f"broker {redacted(self.url)}: cannot reach Redis ({type(e).__name__})") from None
        try:
            self.results_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise MedsegError(f"results_dir {self.results_dir}: cannot create it ({e.strerror}); it must be a "
                              "folder every API replica and worker shares") from None

    def salt(self) -> str:
        self.redis.set(SALT, secrets.token_hex(16), nx=True)
        return str(self.redis.get(SALT))

    # ------------------------------------------------------------------------------------------- records

    def transition(self, job_id: str, status: JobStatus, fields: dict[str, Any], attempt: str = "",
                   model: str | None = None) -> bool:
        """``model``: the weights hash the job was submitted for (default this store's model)."""
        keys = [job_key(job_id), *(status_key(s) for s in JobStatus), queued_key(model or self.model)]
        args: list[Any] = [job_id, attempt, list(JobStatus).index(status), time.time(), "status", str(status)]
        for k, v in fields.items():
            args += [k, _encode(v)]
        return bool(self._transition(keys=keys, args=args))

    def save_source(self, job: Job) -> None:
        source = job.source
        if source is None:
            return
        self.redis.hset(job_key(job.id), mapping={
            "pacs_stored_sop_uid": source.stored_sop_uid or "", "pacs_seg_series_uid": source.seg_series_uid or "",
            "pacs_store_error": source.store_error or ""})

    def record(self, job_id: str) -> dict[str, str] | None:
        if not _JOB_ID.fullmatch(job_id):
            return None
        data = self.redis.hgetall(job_key(job_id))
        return data or None

    def job(self, job_id: str) -> Job | None:
        data = self.record(job_id)
        return None if data is None else job_from_record(job_id, data, self.results_dir / job_id)

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline()
        for s in JobStatus:
            pipe.zcard(status_key(s))
        return {str(s): int(n) for s, n in zip(JobStatus, pipe.execute(), strict=True)}

    def queue_depth(self) -> int:
        """Jobs of this model waiting for one of its workers."""
        return int(self.redis.zcard(queued_key(self.model)))

    # ------------------------------------------------------------------------------------------- workers

    def heartbeat(self, worker_id: str) -> None:
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.zadd(workers_key(self.model), {worker_id: now})
        pipe.zremrangebyscore(workers_key(self.model), 0, now - 10 * self.worker_timeout_s)  # long dead: forget them
        pipe.execute()

    def forget_worker(self, worker_id: str) -> None:
        self.redis.zrem(workers_key(self.model), worker_id)

    def live_workers(self) -> int:
        """Live workers of this model (a worker of other weights never takes its jobs)."""
        return int(self.redis.zcount(workers_key(self.model), time.time() - self.worker_timeout_s, "+inf"))

    def seconds_per_job(self) -> float:
        value = self.redis.get(seconds_per_job_key(self.model))
        return float(value) if value else 1.0

    def record_duration(self, seconds: float) -> None:
        self.redis.set(seconds_per_job_key(self.model), f"{0.7 * self.seconds_per_job() + 0.3 * seconds:.4f}")

    # ----------------------------------------------------------------------------------------------- TTL

    def purge(self, now: float | None = None) -> list[str]:
        """Delete finished jobs (record and folder) older than the TTL, and the oldest beyond ``max_jobs``;
        and folders no record names any more (see ``ORPHAN_FOLDER_S``)."""
        now = time.time() if now is None else now
        finished: list[tuple[str, float]] = []
        for s in (JobStatus.done, JobStatus.failed):
            finished += self.redis.zrange(status_key(s), 0, -1, withscores=True)
        finished.sort(key=lambda item: item[1])
        expired = [job_id for job_id, at in finished if now - at > self.job_ttl_s]
        overflow = sum(self.counts().values()) - self.max_jobs
        for job_id, _at in finished:
            if overflow <= len(expired):
                break
            if job_id not in expired:
                expired.append(job_id)
        if expired:
            pipe = self.redis.pipeline()
            for job_id in expired:
                pipe.delete(job_key(job_id))
                for s in JobStatus:
                    pipe.zrem(status_key(s), job_id)
            pipe.execute()
        for job_id in expired:
            shutil.rmtree(self.results_dir / job_id, ignore_errors=True)
        for folder in self.results_dir.iterdir():
            if (_JOB_ID.fullmatch(folder.name) and folder.is_dir() and now - folder.stat().st_mtime > ORPHAN_FOLDER_S
                    and not self.redis.exists(job_key(folder.name))):
                shutil.rmtree(folder, ignore_errors=True)
        if expired:
            log.info("purged %d finished job(s)", len(expired))
        return expired


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (tuple, list)):
        return "\x1f".join(str(v) for v in value)
    return "" if value is None else str(value)


def pacs_source(data: dict[str, str]) -> Any:
    """A PACS job's ``PacsSource`` from its record (None for uploads)."""
    if not data.get("pacs_endpoint"):
        return None
    from medseg.service.pacs import PacsSource

    return PacsSource(data["pacs_endpoint"], data.get("pacs_study_uid", ""), data.get("pacs_series_uid", ""),
                      data.get("pacs_store_back") == "1", stored_sop_uid=data.get("pacs_stored_sop_uid") or None,
                      seg_series_uid=data.get("pacs_seg_series_uid") or None,
                      store_error=data.get("pacs_store_error") or None)


def job_from_record(job_id: str, data: dict[str, str], folder: Path) -> Job:
    finished = data.get("finished")
    return Job(
        id=job_id, folder=folder, sha256=data.get("sha256", ""),
        tta=TTAMode(data["tta"]) if data.get("tta") else None, anonymize=data.get("anonymize") == "1",
        compatibility=tuple(p for p in data.get("compatibility", "").split("\x1f") if p),
        run_anyway=data.get("run_anyway") == "1", status=JobStatus(data.get("status", "queued")),
        progress=float(data.get("progress") or 0.0), error=data.get("error") or None,
        created=float(data.get("created") or 0.0), finished=float(finished) if finished else None,
        is_volume=data.get("is_volume") == "1", is_dicom=data.get("is_dicom") == "1", source=pacs_source(data),
    )


def job_input(data: dict[str, str]) -> JobInput:
    return JobInput(upload=data["upload"], series_uid=data.get("series_uid") or None,
                    allow_missing_slices=data.get("allow_missing_slices") == "1",
                    max_voxels=int(data["max_voxels"]) if data.get("max_voxels") else None,
                    max_pixels=int(data["max_pixels"]) if data.get("max_pixels") else None)


class SharedJobs:
    """The API side: queue jobs in Redis for ``SharedWorker``s, answer any job from its record.

    ``predictor`` describes the model (config, labels, hashes) to the routes; it never runs here. Uploads and
    results live in ``settings.results_dir/<job id>/`` (``0700``, files ``0600``), which every replica and worker
    must mount at the same path or its own (the folder is found by job id)."""

    def __init__(self, predictor: Any, settings: Any):
        if not settings.results_dir:
            raise MedsegError("MEDSEG_SERVICE_RESULTS_DIR: required with a broker (a folder every API replica and "
                              "worker shares)")
        self.predictor = predictor
        self.settings = settings
        self.store = SharedStore(settings.broker, Path(settings.results_dir), settings.job_ttl_s,
                                 settings.max_jobs, settings.worker_timeout_s, predictor.weights_hash)
        self.store.check()  # here, so that `medseg serve` names a missing broker before it starts listening
        self.broker = make_broker(settings.broker, settings.worker_timeout_s)
        self.max_queued = settings.max_queued

    def start(self) -> None:
        log.info("jobs go to the shared queue at %s; results in %s", redacted(self.store.url),
                 self.store.results_dir.name)

    def stop(self, timeout: float = 30.0) -> None:
        self.broker.close()

    def is_alive(self) -> bool:
        """The broker answers and at least one worker is alive."""
        try:
            return self.store.live_workers() > 0
        except Exception:  # redis.RedisError and socket errors: the broker is not reachable
            return False

    def new_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        folder = self.store.results_dir / job_id
        folder.mkdir(mode=0o700)
        folder.chmod(0o700)
        return job_id, folder

    def queue_depth(self) -> int:
        return self.store.queue_depth()

    def live_workers(self) -> int:
        return self.store.live_workers()

    def is_full(self) -> bool:
        return self.queue_depth() >= self.max_queued

    def retry_after(self) -> int:
        workers = max(1, self.live_workers())
        return max(1, math.ceil(self.store.seconds_per_job() * (self.queue_depth() + 1) / workers))

    def submit(self, job_id: str, folder: Path, scan: Scan, sha256: str, tta: TTAMode | None,
               reservation: Any = None, anonymize: bool = False, compatibility: tuple[str, ...] = (),
               run_anyway: bool = False, source: Any = None, after_results: Any = None,
               stored_input: JobInput | None = None) -> Job:
        """Record the job and send its id to the workers; raises ``QueueFullError``. The scan itself stays
        here (a worker reads ``stored_input`` again), so ``reservation`` is released at once. ``source``: a
        PACS job's ``PacsSource``, recorded; ``after_results`` (a closure of this process) is not sent: the
        worker stores the SEG back itself when ``source.store_back``."""
        import dramatiq

        if stored_input is None:
            raise ValueError("a shared job needs its stored input file (stored_input)")
        if reservation is not None:
            reservation.release()
        job = Job(job_id, folder, sha256, tta, anonymize, tuple(compatibility), run_anyway,
                  is_volume=scan.is_volume, is_dicom=scan.meta.get("format") == "dicom", source=source)
        record = {
            "status": str(JobStatus.queued), "progress": 0.0, "error": "", "created": job.created, "sha256": sha256,
            "tta": str(tta) if tta else "", "anonymize": anonymize, "compatibility": list(compatibility),
            "run_anyway": run_anyway, "is_volume": job.is_volume, "is_dicom": job.is_dicom, "attempts": 0,
            "weights_hash": self.predictor.weights_hash, "upload": stored_input.upload,
            "series_uid": stored_input.series_uid, "allow_missing_slices": stored_input.allow_missing_slices,
            "max_voxels": stored_input.max_voxels, "max_pixels": stored_input.max_pixels,
        }
        if source is not None:
            record.update(pacs_endpoint=source.endpoint, pacs_study_uid=source.study_uid,
                          pacs_series_uid=source.series_uid, pacs_store_back=source.store_back)
        args: list[Any] = [job_id, self.max_queued, job.created]
        for k, v in record.items():
            args += [k, _encode(v)]
        model = self.predictor.weights_hash
        if not self.store._submit(keys=[status_key(JobStatus.queued), job_key(job_id), queued_key(model)], args=args):
            raise QueueFullError(self.retry_after())
        try:
            self.broker.enqueue(dramatiq.Message(queue_name=queue_name(model), actor_name=ACTOR, args=(job_id,),
                                                 kwargs={}, options={}))
        except Exception:
            self.store.redis.delete(job_key(job_id))
            self.store.redis.zrem(status_key(JobStatus.queued), job_id)
            self.store.redis.zrem(queued_key(model), job_id)
            raise
        log.info("job %s queued (shared): upload sha256=%s tta=%s", job_id, sha256, tta or "default")
        return job

    def get(self, job_id: str) -> Job | None:
        return self.store.job(job_id)

    def save_source(self, job: Job) -> None:
        """Record a PACS job's store outcome (``POST /v1/jobs/{id}/store`` on any replica)."""
        self.store.save_source(job)

    def counts(self) -> dict[str, int]:
        return self.store.counts()


class SharedWorker:
    """One worker process's job loop: Dramatiq's worker with one thread and no prefetch (a job waits in the
    queue, where any idle worker can take it, not in a busy worker's memory).

    A PACS job with ``store_back`` has its SEG stored on the endpoint of that name in the worker's own endpoints
    file (``settings.dicomweb_endpoints``, the API's file), at most once per job: the record's
    ``pacs_stored_sop_uid`` marks a stored SEG, and a rerun (after a worker died between storing and finishing)
    skips the store; its SEG would carry the same UIDs anyway (derived from the job id)."""

    def __init__(self, predictor: Any, settings: Any, worker_id: str | None = None):
        import dramatiq

        if not settings.broker or not settings.results_dir:
            raise MedsegError("a worker needs a broker URL (--broker, MEDSEG_SERVICE_BROKER) and the shared results "
                              "folder (--results-dir, MEDSEG_SERVICE_RESULTS_DIR)")
        self.predictor = predictor
        self.settings = settings
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = SharedStore(settings.broker, Path(settings.results_dir), settings.job_ttl_s,
                                 settings.max_jobs, settings.worker_timeout_s, predictor.weights_hash)
        self.runner = JobRunner(predictor, settings.job_timeout_s)
        from medseg.io.dicomweb import load_endpoints

        self.endpoints = load_endpoints(getattr(settings, "dicomweb_endpoints", None))
        self.broker = make_broker(settings.broker, settings.worker_timeout_s)
        # Its model's queue only: jobs for other weights (a fine-tuned version) wait for their own workers.
        dramatiq.actor(self._segment, actor_name=ACTOR, queue_name=queue_name(predictor.weights_hash),
                       broker=self.broker)
        self.worker = dramatiq.Worker(self.broker, worker_threads=1, worker_timeout=POLL_MS)
        self.worker.queue_prefetch = 1
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="medseg-worker-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.check()
        self._salt = self.store.salt()
        self.store.heartbeat(self.id)
        self._beat.start()
        self.worker.start()
        log.info("worker %s: %s (%s) on %s, taking jobs for these weights from %s", self.id, self.predictor.name,
                 self.predictor.weights_hash, self.predictor.device, redacted(self.store.url))

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the running job, then stop (its message is acknowledged; nothing is requeued twice)."""
        self.worker.stop(timeout=int(timeout_s * 1000))
        self._stop.set()
        self._beat.join(10)
        self.store.forget_worker(self.id)
        self.runner.close()
        self.broker.close()

    def wait(self) -> None:
        self._stop.wait()

    def _heartbeat(self) -> None:
        interval = max(0.5, self.settings.worker_timeout_s / 4)
        last_purge = 0.0
        while not self._stop.wait(interval):
            try:
                self.store.heartbeat(self.id)
                if time.monotonic() - last_purge > 30:
                    last_purge = time.monotonic()
                    self.store.purge()
            except Exception as e:  # Redis away for a moment: keep beating when it is back
                log.warning("worker %s: heartbeat failed: %s", self.id, type(e).__name__)

    # ----------------------------------------------------------------------------------------------- job

    def _segment(self, job_id: str) -> None:
        """Run one delivery of ``job_id`` (Dramatiq's actor). Never raises for the job's own failures."""
        store = self.store
        data = store.record(job_id)
        if data is None:
            log.info("job %s: no record (purged); skipped", job_id)
            return
        if data.get("status") in (JobStatus.done, JobStatus.failed):
            log.info("job %s: already %s; redelivery skipped", job_id, data["status"])
            return
        attempt = str(store.redis.hincrby(job_key(job_id), "attempts", 1))
        model = data.get("weights_hash") or None  # whose queued index the job leaves
        folder = store.results_dir / job_id
        job = job_from_record(job_id, data, folder)
        if int(attempt) > self.settings.max_attempts:
            store.transition(job_id, JobStatus.failed, {
                "error": f"the job was started {self.settings.max_attempts} times and its worker stopped each time "
                         "(killed or out of memory); it is not retried again",
                "finished": time.time()}, attempt, model)
            self._delete_upload(folder, data)
            log.warning("job %s failed: its workers died %d times", job_id, self.settings.max_attempts)
            return
        store.transition(job_id, JobStatus.running, {"progress": 0.05, "worker": self.id}, attempt, model)
        if int(attempt) > 1:
            log.info("job %s: attempt %s (a previous worker stopped mid-job)", job_id, attempt)
        start = time.time()
        try:
            if data.get("weights_hash") != self.predictor.weights_hash:
                raise MedsegError(f"the worker serves model {self.predictor.weights_hash}, the job was submitted "
                                  f"for {data.get('weights_hash')} (queues are per model: a misrouted message)")
            scan = self._read(folder, job_input(data))

            def progress(value: float) -> None:
                store.redis.hset(job_key(job_id), "progress", f"{value:.4f}")

            store_back = job.source is not None and job.source.store_back
            self.runner.run(job, scan, progress, self._salt, self._store_back if store_back else None)
            owned = store.transition(job_id, JobStatus.done, {"progress": 1.0, "finished": time.time()}, attempt,
                                     model)
            log.info("job %s done in %.2f s%s", job_id, time.time() - start,
                     "" if owned else " (another attempt owns it now; its record is left alone)")
        except Exception as e:  # a broken scan or a writer bug fails this job, never the worker
            store.transition(job_id, JobStatus.failed, {"error": public_error(e), "finished": time.time()}, attempt,
                             model)
            log.warning("job %s failed: %s", job_id, type(e).__name__)
        self._delete_upload(folder, data)
        store.record_duration(time.time() - start)

    def _store_back(self, job: Job, _files: dict[str, Path]) -> None:
        """STOW-RS the job's SEG unless an earlier attempt did; the outcome goes into the record."""
        from medseg.io.dicomweb import DicomWebError, endpoint_named
        from medseg.service.pacs import store_job_seg

        source = job.source
        done_before = (self.store.record(job.id) or {}).get("pacs_stored_sop_uid")
        if done_before:
            log.info("job %s: its SEG was stored by an earlier attempt; not stored again", job.id)
            return
        try:
            endpoint = endpoint_named(self.endpoints, source.endpoint)
        except DicomWebError as e:
            source.store_error = f"this worker cannot store the SEG: {e}"
        else:
            store_job_seg(endpoint, source, job.folder)
        self.store.save_source(job)

    def _read(self, folder: Path, source: JobInput) -> Scan:
        from medseg.io import MAX_IMAGE_PIXELS, MAX_VOXELS, read_scan

        return read_scan(folder / source.upload, series_uid=source.series_uid,
                         max_voxels=source.max_voxels or MAX_VOXELS, max_pixels=source.max_pixels or MAX_IMAGE_PIXELS,
                         untrusted=True, allow_missing_slices=source.allow_missing_slices)

    @staticmethod
    def _delete_upload(folder: Path, data: dict[str, str]) -> None:
        if data.get("upload"):
            path = folder / data["upload"]
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def run_worker(bundle: Path, settings: Any) -> None:
    """``medseg worker``: load ``bundle`` once on ``settings.device`` and work the shared queue until SIGTERM or
    SIGINT (the running job is finished first; SIGKILL leaves it to another worker)."""
    import signal

    from medseg.service.app import load_predictor

    predictor, _card, _fingerprint = load_predictor(Path(bundle), settings, "")
    worker = SharedWorker(predictor, settings)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    try:
        stop.wait()
    finally:
        log.info("worker %s: stopping after the running job", worker.id)
        worker.stop()
