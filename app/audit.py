"""Audit trail: one JSON line per inference on logger ``medseg.audit``.

A line holds when it happened, the SHA-256 of the uploaded bytes, the model's name and weights hash, the TTA
mode, the device, how long it took and, when sign-in is on, who ran it. It never holds file names, DICOM headers or anything else that could
identify a patient: the input hash is enough to match a line to a file the site keeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

AUDIT_LOGGER = "medseg.audit"
_lock = threading.Lock()  # Streamlit serves sessions from threads; handlers are added once


def sha256_of(chunks: Iterable[bytes]) -> str:
    """SHA-256 over byte strings in the given order (callers sort them so the order is the content's)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(hashlib.sha256(chunk).digest())  # hash of hashes: file boundaries count, names do not
    return h.hexdigest()


def configure_audit_log(path: Path | None) -> logging.Logger:
    """The audit logger, writing to ``path`` (appended) or to stderr; safe to call on every rerun."""
    logger = logging.getLogger(AUDIT_LOGGER)
    with _lock:
        target = str(Path(path).resolve()) if path is not None else "<stderr>"
        if getattr(logger, "_medseg_target", None) != target:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
            else:
                handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # the audit trail is its own stream, not part of the app log
            logger._medseg_target = target  # type: ignore[attr-defined]
    return logger


def audit_inference(
    logger: logging.Logger,
    *,
    input_sha256: str,
    model_name: str,
    weights_hash: str,
    tta: str,
    device: str,
    seconds: float,
    remote: bool,
    user: str | None = None,
    run_anyway: bool = False,
) -> dict:
    """Write one audit line; returns the record (what was written). ``user``: who was signed in, when sign-in
    is configured (staff, not patient data)."""
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "event": "inference",
        "input_sha256": input_sha256,
        "model": model_name,
        "weights_hash": weights_hash,
        "tta": tta,
        "device": device,
        "remote": remote,
        "seconds": round(seconds, 3),
    }
    if user:
        record["user"] = user
    if run_anyway:  # the scan did not fit the model's training data; the user chose to segment it anyway
        record["run_anyway"] = True
    logger.info(json.dumps(record, sort_keys=True))
    return record
