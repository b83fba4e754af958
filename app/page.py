"""The app's page: banner, sidebar (scan, model), then the result view. Called by ``app/streamlit_app.py``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import streamlit as st

from app import gate, progress, session, session_files
from app.auth import require_login
from app.escape import markdown_text
from app.finetune_jobs import finetune_panel
from app.measure import physical_units
from app.predictors import describe, get_predictor
from app.review_panel import REVIEWER
from app.settings import load_settings
from app.sidebar import choose_files, choose_model, model_details, no_model_message
from app.upload_guard import show_rejected_uploads
from app.viewer import results_view
from app.worklist_panel import segment_case, send_panel, worklist_panel
from medseg.bundle import RESEARCH_NOTICE
from medseg.errors import MedsegError
from medseg.io import MissingSlicesError

log = logging.getLogger("medseg.app")
ALLOW_MISSING_SLICES = "Segment this series anyway: slices are missing, so positions and volumes are approximate"


def banner() -> None:
    # Shown first on every run, above anything the model produced.
    st.warning(f"**{RESEARCH_NOTICE}** Check every result; this software is not a medical device.",
               icon=":material/science:")


def input_error(message: str) -> NoReturn:
    # Messages name uploaded files and quote bundles: shown as text, never as markup.
    st.error(markdown_text(message), icon=":material/error:")
    st.stop()


def welcome(settings) -> None:
    st.subheader("Segment a scan")
    st.markdown(
        "Upload a scan in the sidebar: a **PNG, JPG or TIFF** image, a **NIfTI** (`.nii`, `.nii.gz`), NRRD or MHA "
        "volume, the **files of a DICOM series**, a **DICOM folder**, or a **.zip** of one. "
        "Optionally add a ground-truth mask to see Dice and HD95.\n\n"
        "The model's mask appears over the image; move through slices, change the window, hide labels, and "
        "download the mask (NIfTI on the scan's grid, PNG, or DICOM SEG for DICOM inputs)."
    )
    st.caption(settings.limits_text() + " Uploads stay in this session and are deleted when it ends.")


@st.cache_resource
def _upload_janitor(root: str) -> session_files.Janitor:
    """One janitor per server process: deletes the upload folders of sessions that ended."""
    return session_files.Janitor(Path(root)).start()


def main() -> None:
    """The whole page, top to bottom (Streamlit reruns it on every interaction outside the viewer fragment).
    Each step draws its part and returns what the next needs, or stops the page with the reason shown."""
    st.set_page_config(page_title="medseg · segmentation", page_icon=":material/biotech:", layout="wide")
    banner()
    settings = _settings()
    show_rejected_uploads(settings)
    _upload_janitor(str(settings.upload_dir))
    user = require_login()
    st.session_state[REVIEWER] = user or "anonymous"
    upload, truth, model = _sidebar(settings)
    predictor = _load_model(settings, model)
    worklist, case, case_images = worklist_panel(settings, user, upload)
    if case_images is not None:  # an open worklist case is the scan segmented, whatever the sidebar holds
        upload = case_images
    if upload is None:
        welcome(settings)
        st.stop()
    loaded = _read_scan(upload, settings)
    info = describe(predictor, model.bundle)
    decision = gate.check(loaded.scan, model.bundle, upload.sha256, info.weights_hash)
    result = segment_case(worklist, case, lambda: _segment(upload, loaded, model, settings, info, decision, user))
    gate.note(result.decision)
    truth_problem = session.attach_truth(result, truth, settings)
    if truth_problem:
        st.error(f"Ground truth not used: {markdown_text(truth_problem)}", icon=":material/error:")
    st.caption(f"{describe_scan(loaded.scan)} · segmented by **{markdown_text(info.name)}** "
               f"{version_text(info)} in {result.seconds:.1f} s on {markdown_text(info.device)}")
    results_view()
    send_panel(worklist, case, result, settings)


def version_text(info) -> str:
    """``version 3 (weights 1a2b3c…)``: which model version produced the result."""
    weights = f"weights {markdown_text(info.weights_hash)}"
    return f"version {markdown_text(info.version)} ({weights})" if info.version else f"({weights})"


def _settings():
    try:
        return load_settings(st.get_option("server.maxUploadSize"))
    except ValueError as e:
        input_error(f"The app is misconfigured: {e}")
        raise  # not reached: input_error stops the page


def _sidebar(settings):
    with st.sidebar:
        st.header("medseg", divider="gray")
        upload, truth = choose_files(settings)
        st.subheader("Model")
        model = choose_model(settings)
    if model is None:
        st.info(no_model_message(settings.models_dir), icon=":material/info:")
        st.stop()
    return upload, truth, model


def _load_model(settings, model):
    try:
        predictor = get_predictor(inference_url=settings.inference_url, bundle_path=model.bundle_path)
    except MedsegError as e:
        input_error(f"The model cannot be loaded: {e}")
    except Exception as e:  # remote service down, corrupt weights: say what, keep the page alive
        log.warning("model loading failed: %s", type(e).__name__)
        input_error(f"The model cannot be loaded ({type(e).__name__}). Ask your administrator to check the server.")
    with st.sidebar:
        model_details(describe(predictor, model.bundle))
        finetune_panel(model.bundle, model.bundle_path, settings, st.session_state.get(REVIEWER))
    return predictor


def series_label(s) -> str:
    """A series as a clinician recognises it: description, modality, slice count, size (the UID last, short)."""
    rows, cols = s.size
    number = f"series {s.series_number} · " if s.series_number is not None else ""
    uid = f" · …{s.uid[-8:]}" if s.uid else ""
    return f"{s.description or 'no description'} · {s.modality or '?'} · {s.num_slices} slices of {rows}×{cols} · " \
           f"{number}".rstrip(" ·") + uid


def _choose_series(upload, series) -> str | None:
    if len(series) <= 1:
        return None
    # Always drawn while this upload is shown, so the choice persists and can be changed.
    series_uid = st.selectbox(
        f"This upload holds {len(series)} DICOM series. Which one should be segmented?",
        [s.uid for s in series], index=None, placeholder="Choose a series",
        format_func=lambda uid: next(series_label(s) for s in series if s.uid == uid),
        key=f"series_uid_{upload.short_hash}",
    )
    if series_uid is None:
        st.stop()
    return series_uid


def _read_scan(upload, settings):
    """The scan, after the series choice and the missing-slices question; its read warnings shown."""
    try:
        stage = session.staged(upload, settings)
        series = session.dicom_series(stage, settings)
    except MedsegError as e:
        input_error(str(e))
    series_uid = _choose_series(upload, series)
    # Missing DICOM slices are refused unless the user says so here, knowing the slices after a gap are stacked as
    # if adjacent. Once ticked, the box stays drawn while this upload is shown, so the choice persists.
    allow_key = f"allow_missing_{upload.short_hash}"
    allow_missing = bool(st.session_state.get(allow_key))
    if allow_missing:
        st.checkbox(ALLOW_MISSING_SLICES, key=allow_key)
    try:
        loaded = session.read(stage, settings, series_uid, allow_missing)
    except MissingSlicesError as e:
        st.error(markdown_text(str(e)), icon=":material/error:")
        st.checkbox(ALLOW_MISSING_SLICES, key=allow_key)
        st.stop()
    except MedsegError as e:
        input_error(str(e))
    except Exception as e:  # a reader bug on an odd file: name the file, never dump a traceback on the page
        log.warning("unexpected error reading an upload: %s", type(e).__name__)
        input_error(f"{stage.upload_name}: could not be read ({type(e).__name__}).")
    loaded.series_uid = series_uid
    for note in loaded.warnings:
        st.warning(markdown_text(note), icon=":material/warning:")
    return loaded


def _segment(upload, loaded, model, settings, info, decision, user):
    """The result: remembered, or computed with progress and Cancel (see ``app.progress``)."""
    key = session.result_key(upload, loaded.series_uid, model, settings, info)
    cached = session.cached_result(key)
    if cached is not None:
        return cached
    if progress.was_cancelled(key):
        progress.show_cancelled(key)
    display = progress.ProgressDisplay(key)
    try:
        result = session.predict(key, upload, loaded, model, settings, display.callback, decision, user)
    except MedsegError as e:
        display.close()
        if gate.REFUSED_BY_SERVICE in str(e) and not decision.run_anyway:  # the service checked the scan
            gate.ask((str(e),), gate.choice_key(upload.sha256, info.weights_hash))
        input_error(str(e))
    except Exception as e:  # out of memory, a service gone away: say so in one line, keep the page alive
        display.close()
        log.warning("segmentation failed: %s", type(e).__name__)
        input_error(f"{loaded.scan.source}: segmentation failed ({type(e).__name__}). Try again, or ask your "
                    "administrator to check the server's log.")
    display.close()
    return result


def describe_scan(scan) -> str:
    shape = " × ".join(str(s) for s in scan.spatial_shape)
    kind = markdown_text(scan.meta.get("modality") or str(scan.meta.get("format", "")).upper())
    source = markdown_text(scan.source)
    if not physical_units(scan):
        return f"**{source}** · {kind} · {shape} pixels (the file states no pixel size)"
    spacing = " × ".join(f"{s:.2f}" for s in scan.geometry.spacing_zyx)
    return f"**{source}** · {kind} · {shape} {'voxels' if scan.is_volume else 'pixels'} at {spacing} mm"
