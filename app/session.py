"""One session's path from upload to result, remembered in ``st.session_state`` so every step runs once.

read (per upload and series) -> predict (per upload, series, model, TTA) -> compare (per ground truth).
Errors caused by the input surface as ``MedsegError`` with a one-line message; the page shows it.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from app import session_files
from app.audit import audit_inference, configure_audit_log
from app.exports import Provenance
from app.gate import Decision
from app.measure import measurement_table
from app.predictors import ModelInfo, describe, get_predictor, run_inference
from app.results import Result
from app.settings import AppSettings
from app.sidebar import ModelChoice
from app.uploads import ReadResult, StagedUpload, UploadedBytes, read_ground_truth, read_staged
from medseg.errors import MedsegError
from medseg.io import DicomSeriesInfo

INFERENCE_RUNS = "inference_runs"  # how many times this session ran a model (tests read it; so can admins)


def session_folder(settings: AppSettings) -> Path:
    """This session's private upload folder (swept by ``app.session_files`` once the session ends)."""
    ctx = get_script_run_ctx()
    return session_files.session_folder(settings.upload_dir, ctx.session_id if ctx else "bare")


def staged(upload: UploadedBytes, settings: AppSettings) -> StagedUpload:
    """The upload on disk, written once per upload (again if the janitor removed it while the session was
    disconnected); the previous upload's files are deleted."""
    folder = session_folder(settings)  # also marks the session's folder as in use
    current: StagedUpload | None = st.session_state.get("_staged")
    if current is not None and current.upload.sha256 == upload.sha256 and current.alive:
        return current
    if current is not None:
        current.close()
    if current is None or current.upload.sha256 != upload.sha256:
        for key in ("_read", "_series", "result"):
            st.session_state.pop(key, None)
    new = StagedUpload(upload, settings, folder)
    st.session_state["_staged"] = new
    return new


def read(stage: StagedUpload, settings: AppSettings, series_uid: str | None,
         allow_missing_slices: bool = False) -> ReadResult:
    """The scan (read once per upload, series and missing-slice choice)."""
    key = (stage.upload.sha256, series_uid, allow_missing_slices)
    cached = st.session_state.get("_read")
    if cached is not None and cached[0] == key:
        return cached[1]
    result = read_staged(stage, settings, series_uid, allow_missing_slices)
    st.session_state["_read"] = (key, result)
    return result


def dicom_series(stage: StagedUpload, settings: AppSettings) -> list[DicomSeriesInfo]:
    """The DICOM series in the upload (none for other formats), listed once per upload."""
    cached = st.session_state.get("_series")
    if cached is not None and cached[0] == stage.upload.sha256:
        return cached[1]
    found = stage.dicom_series(settings)
    st.session_state["_series"] = (stage.upload.sha256, found)
    return found


def result_key(upload: UploadedBytes, series_uid: str | None, model: ModelChoice, settings: AppSettings,
               info: ModelInfo) -> tuple:
    """What a result depends on: (input, series, model location, weights, TTA)."""
    return (upload.sha256, series_uid, model.inference_url or str(model.bundle_path), info.weights_hash, model.tta)


def cached_result(key: tuple) -> Result | None:
    current: Result | None = st.session_state.get("result")
    return current if current is not None and current.key == key else None


class _RunAnyway:
    """The remote predictor, telling the service to segment a scan it finds unlike its model's training data."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def predict_scan(self) -> Any:
        return functools.partial(self._inner.predict_scan, run_anyway=True)


def predict(
    key: tuple,
    upload: UploadedBytes,
    loaded: ReadResult,
    model: ModelChoice,
    settings: AppSettings,
    on_progress: Callable[[float], None],
    decision: Decision,
    user: str | None = None,
) -> Result:
    """The segmentation of ``loaded.scan`` (``key``: see ``result_key``), computed, audited and remembered.
    ``on_progress(fraction)``: called after every slice/tile."""
    predictor = get_predictor(inference_url=model.inference_url, bundle_path=model.bundle_path,
                              version=model.remote_version)
    info = describe(predictor, model.bundle)
    if decision.run_anyway and model.bundle is None:
        predictor = _RunAnyway(predictor)
    started = time.perf_counter()
    prediction = run_inference(predictor, loaded.scan, on_progress, tta=model.tta)
    seconds = time.perf_counter() - started
    st.session_state[INFERENCE_RUNS] = st.session_state.get(INFERENCE_RUNS, 0) + 1
    audit_inference(
        configure_audit_log(settings.audit_log), input_sha256=upload.sha256, model_name=info.name,
        weights_hash=info.weights_hash, tta=model.tta, device=info.device, seconds=seconds, remote=info.remote, user=user,
        run_anyway=decision.run_anyway,
    )
    result = Result(
        key=key, scan=loaded.scan, prediction=prediction, info=info,
        provenance=Provenance(info.name, info.version or info.weights_hash, info.weights_hash, upload.sha256),
        seconds=seconds, read_warnings=loaded.warnings, decision=decision,
    )
    st.session_state["result"] = result
    return result


def attach_truth(result: Result, truth: tuple[str, bytes] | None, settings: AppSettings) -> str:
    """Read the ground truth for ``result`` (once per file) and add Dice/HD95 to its table.

    Returns "" or the reason the file cannot serve as ground truth (shown by the page; the result stays usable).
    """
    marker = (truth[0], hashlib.sha256(truth[1]).hexdigest()) if truth else None
    if result.truth_marker == marker and result.table is not None:
        return result.truth_error
    result.truth, result.truth_name, result.truth_error, result.truth_marker = None, "", "", marker
    if truth is not None:
        try:
            result.truth = read_ground_truth(
                truth[0], truth[1], result.scan, result.info.labels, result.info.label_map, settings
            )
            result.truth_name = truth[0]
        except MedsegError as e:
            result.truth_error = str(e)
    result.table = measurement_table(result.scan, result.mask, result.info.labels, result.truth)
    return result.truth_error
