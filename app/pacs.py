"""The PACS browser (DICOMweb): pick a configured endpoint, search studies by date, modality and description,
list a study's series and add them to the worklist; retrieve a case's series; send a reviewed SEG back (STOW-RS).

Shown are exactly the attributes asked for (``medseg.io.dicomweb.STUDY_FIELDS``/``SERIES_FIELDS``), as the PACS
returned them for this query; none of them is logged. Endpoints are the operator's (``MEDSEG_DICOMWEB_ENDPOINTS``).
"""

from __future__ import annotations

import logging
import tempfile
from datetime import date
from pathlib import Path

import pandas as pd
import streamlit as st

from app.escape import markdown_text
from app.settings import AppSettings
from app.uploads import UploadedBytes
from app.worklist import Case, Worklist
from medseg.errors import MedsegError
from medseg.io.dicomweb import (
    Endpoint,
    endpoint_named,
    load_endpoints,
    retrieve_series,
    search_series,
    search_studies,
    store_seg,
)

log = logging.getLogger("medseg.app")

STUDY_COLUMNS = {"StudyDate": "Date", "ModalitiesInStudy": "Modalities", "StudyDescription": "Description",
                 "PatientName": "Patient", "PatientID": "Patient ID", "AccessionNumber": "Accession",
                 "NumberOfStudyRelatedSeries": "Series"}
SERIES_COLUMNS = {"SeriesNumber": "No.", "Modality": "Modality", "SeriesDescription": "Description",
                  "NumberOfSeriesRelatedInstances": "Images"}
IMAGE_MODALITIES_HIDDEN = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"}


@st.cache_resource(ttl=60)
def _endpoints(path: str | None) -> dict[str, Endpoint]:
    return load_endpoints(path) if path else {}


def configured_endpoints(settings: AppSettings) -> dict[str, Endpoint]:
    try:
        return _endpoints(str(settings.dicomweb_endpoints) if settings.dicomweb_endpoints else None)
    except MedsegError as e:
        st.error(f"The PACS endpoints are misconfigured: {markdown_text(e)}", icon=":material/error:")
        return {}


def _table(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{label: ("" if r.get(key) is None else str(r[key])) for key, label in columns.items()}
                         for r in rows])


def _date_text(value: str | None) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if value and len(value) == 8 else (value or "")


def series_label(study: dict, series: dict) -> str:
    """What the worklist shows for a case: date, modality, descriptions (no patient names)."""
    parts = [_date_text(study.get("StudyDate")), series.get("Modality") or "?",
             study.get("StudyDescription") or "", series.get("SeriesDescription") or "",
             f"series {series['SeriesNumber']}" if series.get("SeriesNumber") is not None else ""]
    return " · ".join(p for p in parts if p)


def pacs_browser(settings: AppSettings, worklist: Worklist) -> None:
    """Search form, study and series tables, and "Add to worklist"."""
    endpoints = configured_endpoints(settings)
    if not endpoints:
        st.caption("No PACS is configured (the administrator sets MEDSEG_DICOMWEB_ENDPOINTS).")
        return
    name = st.selectbox("PACS", sorted(endpoints), key="pacs_endpoint")
    endpoint = endpoints[name]
    with st.form("pacs_search", border=False):
        c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
        start = c1.date_input("From", value=None, key="pacs_from", min_value=date(1980, 1, 1))
        end = c2.date_input("To", value=None, key="pacs_to", min_value=date(1980, 1, 1))
        modality = c3.text_input("Modality", key="pacs_modality", max_chars=16, placeholder="CT")
        text = c4.text_input("Description contains", key="pacs_description", max_chars=64)
        searched = st.form_submit_button("Search", icon=":material/search:")
    if searched:
        try:
            st.session_state["pacs_studies"] = (name, search_studies(endpoint, start=start, end=end,
                                                                     modality=modality, description=text))
        except MedsegError as e:
            st.error(markdown_text(e), icon=":material/error:")
            return
    found = st.session_state.get("pacs_studies")
    if not found or found[0] != name:
        return
    studies = found[1]
    if not studies:
        st.info("No study matches.", icon=":material/info:")
        return
    st.dataframe(_table(studies, STUDY_COLUMNS), hide_index=True, width="stretch", key="pacs_study_table")
    index = st.selectbox("Study", range(len(studies)), key="pacs_study", index=None, placeholder="Choose a study",
                         format_func=lambda i: " · ".join(
                             v for v in (_date_text(studies[i].get("StudyDate")),
                                         studies[i].get("ModalitiesInStudy") or "",
                                         studies[i].get("StudyDescription") or "") if v) or f"study {i + 1}")
    if index is None:
        return
    study = studies[index]
    try:
        series = [s for s in search_series(endpoint, study["StudyInstanceUID"])
                  if (s.get("Modality") or "").upper() not in IMAGE_MODALITIES_HIDDEN]
    except MedsegError as e:
        st.error(markdown_text(e), icon=":material/error:")
        return
    if not series:
        st.info("This study has no image series.", icon=":material/info:")
        return
    st.dataframe(_table(series, SERIES_COLUMNS), hide_index=True, width="stretch", key="pacs_series_table")
    chosen = st.multiselect("Series to add", range(len(series)), key="pacs_series",
                            format_func=lambda i: series_label(study, series[i]))
    if st.button("Add to worklist", key="pacs_add", icon=":material/playlist_add:", disabled=not chosen):
        for i in chosen:
            worklist.add_pacs(name, study["StudyInstanceUID"], series[i]["SeriesInstanceUID"],
                              series_label(study, series[i]))
        st.success(f"Added {len(chosen)} series to your worklist.", icon=":material/task_alt:")


def retrieve_case(case: Case, settings: AppSettings) -> UploadedBytes:
    """A PACS case's series as upload bytes (named ``000001.dcm``...), within the app's upload cap; from then on
    it goes the way of any uploaded DICOM series (staging, series check, reading, segmenting)."""
    endpoint = endpoint_named(configured_endpoints(settings), case.endpoint or "")
    with tempfile.TemporaryDirectory(prefix="medseg-pacs-") as tmp:
        got = retrieve_series(endpoint, case.study_uid or "", case.series_uid or "", Path(tmp),
                              max_bytes=min(endpoint.max_bytes, settings.upload_bytes))
        files = [(f.name, f.read_bytes()) for f in got.files]
    return UploadedBytes.from_files(files)


def send_seg(case: Case, result, settings: AppSettings) -> str:
    """Write the shown (reviewed) mask as a DICOM SEG referencing the source series and store it on the case's
    endpoint; its UIDs derive from the case id, so sending again replaces rather than duplicates it."""
    from medseg.inference.dicom_seg import write_dicom_seg

    endpoint = endpoint_named(configured_endpoints(settings), case.endpoint or "")
    with tempfile.TemporaryDirectory(prefix="medseg-seg-") as tmp:
        path = write_dicom_seg(result.scan, result.mask, result.info.labels, Path(tmp) / "seg.dcm",
                               model_name=result.info.name, model_version=result.info.weights_hash,
                               uid_key=case.case_id)
        sop_uid = store_seg(endpoint, path)
    log.info("worklist case %s: SEG stored on endpoint %s", case.case_id[:8], endpoint.name)
    return sop_uid
