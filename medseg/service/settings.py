"""Service limits and locations, with defaults that suit one GPU server; each can be set by environment."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "MEDSEG_SERVICE_"


@dataclass(frozen=True)
class ServiceSettings:
    """``max_upload_bytes``: larger requests get 413. ``max_queued``: jobs waiting beyond the running one; one
    more gets 429. ``job_ttl_s``: a finished job and its files are deleted this long after it finished.
    ``max_jobs``: finished jobs kept at most (oldest dropped first), so memory and disk stay bounded even
    under a burst. ``work_dir``: where job files live (None: a fresh temp folder). ``device``: auto|cpu|cuda.
    ``backend``: what runs the network (auto|torch|compile|onnxruntime; None: the bundle's ``inference.backend``);
    ``compile`` repays its per-tile-shape compile on a service that predicts many scans.

    Memory and time (see ``medseg.service.budget``): ``max_voxels``: the largest scan decoded (samples; a header
    announcing more gets 413 before decoding); None: sized from the model and the machine's memory.
    ``memory_budget_bytes``: decoded bytes all queued and running jobs may hold (a scan that does not fit now
    gets 429 with Retry-After); None: a quarter of the machine's memory. ``job_timeout_s``: compute time one job
    may take; past it the job fails with a clear error and the worker takes the next one.

    Callers (see ``medseg.service.guards``): ``trusted_hosts``: Host header values accepted (comma-separated in
    the environment, ``*.example.org`` wildcards, ``*`` for any); None: the loopback names, or any host when
    ``medseg serve`` listens beyond loopback (with a warning). ``api_token``: when set, every /v1 request needs
    ``Authorization: Bearer <token>``. ``read_timeout_s``: longest wait for a request's headers (from the
    connection or the previous request) and longest pause while its body arrives;
    ``upload_timeout_s``: longest time a whole request body may take (a half-sent upload gets 408).

    Many workers (``medseg.service.shared_jobs``): ``broker``: a Redis URL (``redis://host:6379/0``); set, the
    API only queues jobs there and ``medseg worker`` processes (one per GPU, any machine) run them; None: one
    process, in-memory queue (the default). ``results_dir``: the folder every API replica and worker shares
    (uploads and result files by job id; required with a broker). ``worker_timeout_s``: a worker silent this
    long is dead: its job goes back to the queue for another worker. ``max_attempts``: deliveries of one job at
    most (a scan that kills every worker that takes it fails after that many).

    ``dicomweb_endpoints``: the YAML file of DICOMweb endpoints jobs may name (``medseg.io.dicomweb``); None:
    ``$MEDSEG_DICOMWEB_ENDPOINTS`` (the app's variable), else none. Workers read the same file to store SEGs.

    Fine-tuning (``medseg.service.finetune``): ``finetune_dir``: where fine-tuned versions of the served bundle are
    written and served from (None: fine-tuning is off); ``finetune_max_minutes``: the largest training budget a
    client may ask for."""

    max_upload_bytes: int = 512 * 1024 * 1024
    max_queued: int = 16
    job_ttl_s: float = 3600.0
    max_jobs: int = 1000
    work_dir: Path | None = None
    device: str = "auto"
    backend: str | None = None
    max_voxels: int | None = None
    memory_budget_bytes: int | None = None
    job_timeout_s: float = 600.0
    trusted_hosts: tuple[str, ...] | None = None
    api_token: str | None = None
    read_timeout_s: float = 30.0
    upload_timeout_s: float = 900.0
    broker: str | None = None
    results_dir: Path | None = None
    worker_timeout_s: float = 60.0
    max_attempts: int = 3
    dicomweb_endpoints: Path | None = None
    finetune_dir: Path | None = None
    finetune_max_minutes: float = 30.0

    @classmethod
    def from_env(cls, **overrides: object) -> ServiceSettings:
        """Defaults, then ``MEDSEG_SERVICE_<FIELD>`` environment variables, then ``overrides`` (not None).
        A malformed variable raises ``ValueError`` naming it."""
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = os.environ.get(name, "").strip()
            if raw:
                values[f.name] = _parse(hints[f.name], raw, name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _parse(hint: object, raw: str, name: str) -> object:
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    kind = kinds[0]
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        return kind(raw)  # type: ignore[operator]
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
