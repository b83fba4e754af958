"""Service limits and locations, with defaults that suit one GPU server; each can be set by environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "MEDSEG_SERVICE_"


@dataclass(frozen=True)
class ServiceSettings:
    """``max_upload_bytes``: larger requests get 413. ``max_queued``: jobs waiting beyond the running one; one
    more gets 429. ``job_ttl_s``: a finished job and its files are deleted this long after it finished.
    ``max_jobs``: finished jobs kept at most (oldest dropped first), so memory and disk stay bounded even
    under a burst. ``work_dir``: where job files live (None: a fresh temp folder). ``device``: auto|cpu|cuda."""

    max_upload_bytes: int = 512 * 1024 * 1024
    max_queued: int = 16
    job_ttl_s: float = 3600.0
    max_jobs: int = 1000
    work_dir: Path | None = None
    device: str = "auto"

    @classmethod
    def from_env(cls, **overrides: object) -> ServiceSettings:
        """Defaults, then ``MEDSEG_SERVICE_<FIELD>`` environment variables, then ``overrides`` (not None)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                kind = type(getattr(cls, f.name)) if getattr(cls, f.name) is not None else Path
                values[f.name] = Path(raw) if kind is Path else kind(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
