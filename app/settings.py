"""The app's deployment settings, read from the environment once per run (no Streamlit here).

One place decides every size limit, so the upload cap, the zip caps and the voxel cap agree with each other
and with Streamlit's ``server.maxUploadSize`` (``medseg app`` passes ``upload_mb`` to Streamlit).

Environment:
    MEDSEG_MODELS_DIR      folder with model bundles (default ``models``, relative to the working directory)
    MEDSEG_INFERENCE_URL   use the remote inference service at this URL instead of in-process models
    MEDSEG_INFERENCE_TOKEN that service's API token, when it has one (read by RemotePredictor)
    MEDSEG_AUDIT_LOG       file that receives the audit log (JSON lines); unset: the log goes to stderr
    MEDSEG_MAX_UPLOAD_MB   largest upload, per file and in total (default 1024)
    MEDSEG_MAX_VOXELS      largest scan the server will decode (default 200 million voxels)
    MEDSEG_UPLOAD_DIR      where sessions' upload folders live (default: <tmp>/medseg-app-uploads-<uid>)
    MEDSEG_REVIEW_DIR      the review dataset accepted / corrected cases are saved into (default ``reviews``)
    MEDSEG_FINETUNE_USERS  comma-separated users allowed to fine-tune from the reviews (``*``: all; ``anonymous``:
                           anyone when sign-in is off); empty: nobody
    MEDSEG_DICOMWEB_ENDPOINTS  YAML file of the PACS (DICOMweb) endpoints to browse (``medseg.io.dicomweb``)
    MEDSEG_WORKLIST_DIR    where each user's worklist is kept (default ``worklists``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app.session_files import default_root
from medseg.io import MAX_IMAGE_PIXELS, ArchiveLimits

DEFAULT_MODELS_DIR = Path("models")
DEFAULT_REVIEW_DIR = Path("reviews")
DEFAULT_WORKLIST_DIR = Path("worklists")
DEFAULT_UPLOAD_MB = 1024
# 200 M voxels is a 512 x 512 x 760 CT; with its class probabilities that is ~2.5 GB of RAM per session.
DEFAULT_MAX_VOXELS = 200_000_000
# Compressed DICOM (JPEG 2000, deflate) rarely expands more than 4x; the cap keeps a zip bomb from filling disk.
ZIP_EXPANSION_ALLOWANCE = 4


@dataclass(frozen=True)
class AppSettings:
    models_dir: Path
    inference_url: str | None
    audit_log: Path | None
    upload_mb: int
    max_voxels: int
    upload_dir: Path = field(default_factory=default_root)
    review_dir: Path = DEFAULT_REVIEW_DIR  # accepted / corrected cases (medseg.review), a dataset medseg train reads
    finetune_users: tuple[str, ...] = ()  # who may fine-tune from the reviews ("*": everyone; "anonymous": no sign-in)
    dicomweb_endpoints: Path | None = None  # the operator's PACS endpoints (YAML); None: no PACS browser
    worklist_dir: Path = DEFAULT_WORKLIST_DIR  # one JSON file per user (named by a hash of the user name)

    def may_finetune(self, user: str | None) -> bool:
        who = user or "anonymous"
        return "*" in self.finetune_users or who in self.finetune_users

    @property
    def upload_bytes(self) -> int:
        return self.upload_mb * 1024**2

    @property
    def max_pixels(self) -> int:
        """2D cap: the voxel cap, but never above Pillow's decompression-bomb limit."""
        return min(self.max_voxels, MAX_IMAGE_PIXELS)

    @property
    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(max_total_bytes=ZIP_EXPANSION_ALLOWANCE * self.upload_bytes)

    def limits_text(self) -> str:
        """One line a user can act on, shown beside the uploader and after a size error."""
        return (
            f"Limits on this server: {self.upload_mb:,} MB per upload, "
            f"{ZIP_EXPANSION_ALLOWANCE * self.upload_mb:,} MB unpacked from a zip, "
            f"{self.max_voxels / 1e6:,.0f} million voxels per scan."
        )


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def load_settings(server_upload_mb: int | None = None) -> AppSettings:
    """Settings from the environment (see the module docstring); a malformed value raises ``ValueError``.

    ``server_upload_mb``: Streamlit's ``server.maxUploadSize``. The server refuses larger request bodies, so the
    app's own cap never exceeds it (``medseg app`` sets both to the same value; a bare ``streamlit run`` does not).
    """
    upload_mb = _positive_int("MEDSEG_MAX_UPLOAD_MB", DEFAULT_UPLOAD_MB)
    if server_upload_mb:
        upload_mb = min(upload_mb, int(server_upload_mb))
    url = os.environ.get("MEDSEG_INFERENCE_URL", "").strip() or None
    audit = os.environ.get("MEDSEG_AUDIT_LOG", "").strip()
    return AppSettings(
        models_dir=Path(os.environ.get("MEDSEG_MODELS_DIR", "").strip() or DEFAULT_MODELS_DIR),
        inference_url=url,
        audit_log=Path(audit) if audit else None,
        upload_mb=upload_mb,
        max_voxels=_positive_int("MEDSEG_MAX_VOXELS", DEFAULT_MAX_VOXELS),
        upload_dir=Path(os.environ.get("MEDSEG_UPLOAD_DIR", "").strip() or default_root()),
        review_dir=Path(os.environ.get("MEDSEG_REVIEW_DIR", "").strip() or DEFAULT_REVIEW_DIR),
        finetune_users=tuple(u.strip() for u in os.environ.get("MEDSEG_FINETUNE_USERS", "").split(",") if u.strip()),
        dicomweb_endpoints=Path(endpoints) if (endpoints := os.environ.get("MEDSEG_DICOMWEB_ENDPOINTS", "").strip())
        else None,
        worklist_dir=Path(os.environ.get("MEDSEG_WORKLIST_DIR", "").strip() or DEFAULT_WORKLIST_DIR),
    )
